"""What every `ilr` command prints through: the consoles, the error line, the metrics file."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from data.config import DataConfig, data_config
from data.errors import IlrError

_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)


def _fail(e: IlrError) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
    raise typer.Exit(2)


def _write_metrics(path: Optional[Path], metrics: dict) -> None:
    if path:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")


def _data_cfg(**overrides) -> DataConfig:
    return data_config(**overrides)

"""`ilr data ...`: generate, ingest, versions, checkout, validate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flows.console import _data_cfg, console, err

data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate, ingest, validate, version.")


@data_app.command("generate")
def data_generate(size: str = typer.Option("tiny", help="tiny | small | medium"),
                  out: Path = typer.Option(..., help="output folder"),
                  seed: int = typer.Option(0)):
    """Generate the embedded synthetic multi-domain dataset into a folder (no versioning)."""
    from data import synthetic

    t0 = time.perf_counter()
    df = synthetic.generate(out, size, seed=seed, workers=2)
    console.print(f"generated synthetic-{size} (seed {seed}): {len(df)} images in {time.perf_counter() - t0:.1f}s "
                  f"-> {out}")


@data_app.command("ingest")
def data_ingest(source: str = typer.Argument(..., help="dataset folder (or, for synthetic, a size: tiny|small|medium)"),
                fmt: str = typer.Option(..., "--format", help="gldv2 | roxford | folder | met | sop | synthetic"),
                name: str = typer.Option(..., help="dataset name, e.g. synthetic-small"),
                domain: Optional[str] = typer.Option(None, help="folder format: landmark|artwork|product|other"),
                queries: Optional[Path] = typer.Option(None, help="folder format: file listing query images"),
                seed: int = typer.Option(0, help="synthetic: generator seed"),
                gnd: Optional[str] = typer.Option(None, help="roxford: which gnd_<NAME>.pkl, when the folder has several"),
                mini: bool = typer.Option(False, help="met: the mini database (mini_MET_database.json)"),
                link: bool = typer.Option(False, help="hard-link images into the store instead of copying")):
    """Read, validate (Great Expectations) and version (DVC) a dataset; prints NAME@VERSION."""
    from data.versioning import ingest

    opts = {k: v for k, v in {"domain": domain, "queries": queries, "seed": seed, "gnd": gnd,
                              "mini": mini or None}.items() if v is not None}
    t0 = time.perf_counter()
    version, report = ingest(fmt, source, name, _data_cfg(link=link or None), log=console.print, **opts)
    dup = report.summary.get("near_duplicates", {})
    console.print(f"validated: {sum(v for k, v in version.counts.items() if k.startswith('split/'))} images, "
                  f"{dup.get('query_vs_index', 0)} query/index near-duplicates; Data Docs: {report.docs_path}")
    state = "unchanged, already" if version.unchanged else "new version"
    console.print(f"{state} [bold]{version.ref}[/] (git {version.git_rev[:10]}, dvc {version.dvc_md5}) "
                  f"in {time.perf_counter() - t0:.1f}s")


@data_app.command("versions")
def data_versions(name: str):
    """List the versions of a dataset: git rev, DVC hash, counts per split and domain."""
    from data.versioning import versions

    found = versions(name)
    if not found:
        err.print(f"no versions of {name!r}")
        raise typer.Exit(1)
    t = Table(title=f"dataset {name}")
    for col in ("version", "git rev", "dvc md5", "created", "splits", "domains"):
        t.add_column(col)
    for v in found:
        splits = " ".join(f"{k[6:]}={n}" for k, n in v.counts.items() if k.startswith("split/"))
        domains = " ".join(f"{k[7:]}={n}" for k, n in v.counts.items() if k.startswith("domain/"))
        t.add_row(v.version, v.git_rev[:10], v.dvc_md5, v.created[:19], splits, domains)
    console.print(t)


@data_app.command("checkout")
def data_checkout(ref: str = typer.Argument(..., help="NAME@VERSION (vN, a git rev, or latest)")):
    """Restore a dataset version into the store."""
    from data.versioning import checkout

    v, folder = checkout(ref)
    console.print(f"checked out {v.ref} (git {v.git_rev[:10]}, dvc {v.dvc_md5}) -> {folder}")


@data_app.command("validate")
def data_validate(folder: Path = typer.Argument(..., help="a dataset folder with manifest.parquet"),
                  report: Optional[Path] = typer.Option(None, help="write a JSON report here")):
    """Validate a dataset folder with the Great Expectations suite (no versioning)."""
    from data import manifest
    from data.validate import validate

    df = manifest.read(folder)
    r = validate(df, folder, manifest.read_info(folder).get("name", folder.name), _data_cfg(),
                 report_path=report)
    console.print(f"valid: {len(df)} images; Data Docs: {r.docs_path}")

"""Where things live, and the data layer's settings (from params.yaml, section `data`)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import yaml

DOMAINS = ("landmark", "artwork", "product", "other")
SPLITS = ("train", "val", "index", "query")
NO_LABEL = "__none__"  # label of distractors / non-landmark images: never a positive


def ilr_home() -> Path:
    """Runtime state (MLflow DB, Milvus data, Prefect home, DVC remote, GX context): $ILR_HOME or ./.ilr."""
    home = Path(os.environ.get("ILR_HOME", ".ilr")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def repo_root() -> Path:
    """The git + DVC repository that versions datasets: $ILR_REPO, else the git top level of the cwd."""
    if env := os.environ.get("ILR_REPO"):
        return Path(env).expanduser().resolve()
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else Path.cwd().resolve()


@lru_cache(maxsize=8)
def _read_params(path: str) -> dict:
    p = Path(path)
    return yaml.safe_load(p.read_text()) or {} if p.exists() else {}


def params(section: str) -> dict:
    """One section of params.yaml ($ILR_PARAMS, else <repo>/params.yaml); {} when absent."""
    path = os.environ.get("ILR_PARAMS") or str(repo_root() / "params.yaml")
    return dict(_read_params(path).get(section) or {})


def from_params(cls, section: str, **overrides):
    """Build a config dataclass from a params.yaml section; unknown keys are ignored."""
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in params(section).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


@dataclass
class DataConfig:
    store_dir: str = "data/store"            # under the repo root; payloads tracked by DVC, never by git
    min_side_px: int = 32
    max_pixels: int = 40_000_000             # larger images are refused before decoding (decompression bombs)
    max_file_mb: float = 50.0
    domains: tuple[str, ...] = DOMAINS
    near_duplicate_bits: int = 2             # pHash Hamming distance counted as a near-duplicate
    link: bool = False                       # hard-link source images into the store instead of copying
    val_fraction: float = 0.1                # for formats without a validation split (GLDv2, SOP)
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 2))

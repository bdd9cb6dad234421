"""Where things live, and the data layer's settings (from params.yaml, section `data`)."""
from __future__ import annotations

import logging
import os
import subprocess
import types
import typing
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import yaml

from data.errors import IlrError

DOMAINS = ("landmark", "artwork", "product", "other")
SPLITS = ("train", "val", "index", "query")
NO_LABEL = "__none__"  # label of distractors / non-landmark images: never a positive


DEFAULT_MODEL_NAME = "ilr-delg"   # registered model name unless ILR_MODEL_NAME says otherwise

# The workspace settings every process of one run must agree on. The driver resolves them (worker_env) and
# hands exactly these to every worker it starts: Ray Tune trials, Ray Data actors, Serve replicas, and the
# background processes (service, retrain). Nothing in a worker resolves them from its current directory.
WORKSPACE_ENV = ("ILR_REPO", "ILR_HOME", "ILR_PARAMS", "MLFLOW_TRACKING_URI", "MILVUS_URI", "MILVUS_TOKEN",
                 "ILR_MODEL_NAME", "ILR_API_TOKEN")


def ilr_home_path() -> Path:
    """Where ilr_home() is, without creating it: $ILR_HOME, else .ilr at the git top level of the current
    folder, so that a command run from a subfolder of a checkout finds the same workspace (it made a new,
    empty one there: no models, no service to stop); outside any git repository, ./.ilr. (Not ILR_REPO's:
    a data repository elsewhere does not move the workspace.)"""
    if env := os.environ.get("ILR_HOME"):
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    return (_git_top(cwd) or cwd) / ".ilr"


def ilr_home() -> Path:
    """Runtime state (MLflow DB, Milvus data, Prefect home, DVC remote, GX context): $ILR_HOME, else .ilr at
    the git top level of the current folder."""
    home = ilr_home_path()
    if not home.is_dir():  # private: it holds the API token, the Prefect password and every store
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)
    return home


def repo_root() -> Path:
    """The git + DVC repository that versions datasets: $ILR_REPO, else the git top level of the cwd."""
    if env := os.environ.get("ILR_REPO"):
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    return _git_top(cwd) or cwd


_GIT_TOPS: dict[Path, Path] = {}


def _git_top(cwd: Path) -> Path | None:
    """The git top level of cwd, asked once per folder and process while it stays a repository (ilr_home() is
    asked often)."""
    top = _GIT_TOPS.get(cwd)
    if top is not None and (top / ".git").exists():
        return top
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, cwd=cwd)
    except OSError:  # no git on this machine: no repository
        return None
    if out.returncode != 0:
        _GIT_TOPS.pop(cwd, None)
        return None
    _GIT_TOPS[cwd] = top = Path(out.stdout.strip()).resolve()
    return top


def params_path() -> Path:
    """The params file: $ILR_PARAMS, else <repo>/params.yaml."""
    env = os.environ.get("ILR_PARAMS")
    return Path(env).expanduser().resolve() if env else repo_root() / "params.yaml"


def default_tracking_uri() -> str:
    return f"sqlite:///{ilr_home() / 'mlflow.db'}"


def worker_env(**extra: str) -> dict[str, str]:
    """The workspace resolved to absolute values, for handing to workers (WORKSPACE_ENV keys only).
    `extra` adds values the caller resolved itself (MILVUS_URI, known once a Milvus server runs)."""
    env = {k: os.environ[k] for k in WORKSPACE_ENV if os.environ.get(k)}
    env.update(ILR_REPO=str(repo_root()), ILR_HOME=str(ilr_home()), ILR_PARAMS=str(params_path()))
    env.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    env.setdefault("ILR_MODEL_NAME", DEFAULT_MODEL_NAME)
    env.update({k: v for k, v in extra.items() if k in WORKSPACE_ENV and v})
    return env


QUIET = {"GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
         "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_libraries() -> None:
    """No analytics, telemetry or progress bars from Great Expectations, DVC and MLflow (nothing may phone
    home; a user's own setting wins). Called where the workspace is pinned or adopted and before those
    libraries are used, never at import."""
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def pin_workspace(**extra: str) -> dict[str, str]:
    """Resolve the workspace once, in the driver, and export it: every child process and every worker
    that applies worker_env() then sees the same absolute repo, home, params file and stores."""
    quiet_libraries()
    env = worker_env(**extra)
    os.environ.update(env)
    return env


def apply_worker_env(env: dict[str, str]) -> None:
    """In a worker: adopt the driver's workspace (see WORKSPACE_ENV)."""
    quiet_libraries()
    os.environ.update({k: v for k, v in env.items() if k in WORKSPACE_ENV and v})


@lru_cache(maxsize=8)
def _read_params(path: str, mtime_ns: int) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise IlrError(f"params file is not valid YAML: {e}", where=path) from None
    if not isinstance(doc, dict):
        raise IlrError("params file must be a mapping of sections", where=path)
    return doc


def params_doc() -> dict:
    """The whole params file ({} when absent), read once per change of the file."""
    path = params_path()
    return _read_params(str(path), path.stat().st_mtime_ns) if path.exists() else {}


def params(section: str) -> dict:
    """One raw section of the params file ({} when absent). Prefer from_params(): it types and checks it."""
    value = params_doc().get(section) or {}
    if not isinstance(value, dict):
        raise IlrError(f"section {section!r} must be a mapping", where=str(params_path()))
    return dict(value)


def check_ranges(section: str, obj, at_least: dict | None = None, positive: tuple = (),
                 at_most: dict | None = None) -> None:
    """IlrError for a setting of a typed section out of range (from params.yaml, or a command's option of the
    same name), called by the settings' __post_init__: a negative step count would otherwise train nothing
    and register the untrained model, a port above 65535 fail deep inside the server's start."""
    bad = [(n, f"at least {low}") for n, low in (at_least or {}).items() if getattr(obj, n) < low]
    bad += [(n, f"at most {high}") for n, high in (at_most or {}).items() if getattr(obj, n) > high]
    bad += [(n, "above 0") for n in positive if not getattr(obj, n) > 0]
    if bad:
        name, rule = bad[0]
        raise IlrError(f"{section}.{name} must be {rule}, got {getattr(obj, name)!r}",
                       hint=f"`{section}.{name}` in params.yaml, or the command's --{name.replace('_', '-')} option "
                            "where it has one")


def from_params(cls, section: str, **overrides):
    """The typed settings of one params.yaml section: dataclass defaults <- the file <- non-None overrides.
    Every setting of every layer is read through here. An unknown key is an error, not a silent no-op."""
    names = {f.name for f in fields(cls)}
    values = params(section)
    unknown = sorted(set(values) - names)
    if unknown:
        raise IlrError(f"unknown setting(s) {', '.join(unknown)} in section {section!r}", where=str(params_path()),
                       hint=f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {k: _typed(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def _typed(value, kind, name: str):
    """A params-file value as the setting's type: ints and floats as such (an integral float is an int, an
    int a float), lists as tuples where a tuple is wanted; anything else that does not fit is an error that
    names the setting (`train.seed: 1.5` would otherwise fail deep inside a library, or pass silently)."""
    def bad(want: str):
        return IlrError(f"setting {name} is {value!r} ({type(value).__name__}); it must be {want}",
                        where=str(params_path()))

    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), name)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = args[0] if args else object
        if len(args) > 1 and args[1] is not Ellipsis and len(value) != len(args):
            raise bad(f"a list of {len(args)}")
        return tuple(_typed(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind in (str, list, dict) and not isinstance(value, kind):
        raise bad({str: "a string", list: "a list", dict: "a mapping"}[kind])
    return value


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


@dataclass
class SyntheticConfig:
    """`dvc repro`'s generate stage (params.yaml `synthetic`)."""
    size: str = "small"
    seed: int = 0

    def __post_init__(self):
        check_size("synthetic", self.size)


SYNTHETIC_SIZES = ("tiny", "small", "medium")   # the embedded generator's sizes (data.synthetic.SIZES)


def check_size(section: str, size: str) -> None:
    if size not in SYNTHETIC_SIZES:
        raise IlrError(f"{section}.size must be one of {', '.join(SYNTHETIC_SIZES)}, got {size!r}",
                       hint=f"`{section}.size` in params.yaml, or the command's --size option where it has one")


def data_config(**kw) -> DataConfig:
    return from_params(DataConfig, "data", **kw)

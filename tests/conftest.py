"""Shared fixtures: a throw-away git + DVC workspace, and small real images."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def make_image(path: Path, seed: int = 0, size=(96, 72), fmt: str | None = None, mode: str = "RGB") -> Path:
    """A textured random image (distinct per seed) written in the format implied by the suffix."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def jpeg_bytes(seed: int = 0, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture(autouse=True)
def _workspace_env_restored():
    """The CLI pins the workspace into os.environ (data.config.pin_workspace): undo it after every test."""
    from data.config import WORKSPACE_ENV

    before = {k: os.environ.get(k) for k in WORKSPACE_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _init_repo(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "commit", "-q", "--allow-empty", "-m", "init")
    return repo


def workspace_env(root: Path) -> dict[str, str]:
    """The test workspace under root: repo/ (git + DVC), home/ (ILR_HOME), and no params file."""
    return {"ILR_REPO": str(root / "repo"), "ILR_HOME": str(root / "home"), "ILR_PARAMS": str(root / "no-params.yaml")}


def copy_workspace(src: Path, dst: Path) -> None:
    """A copy of a prepared workspace (repo + home); the DVC remote is re-pointed at the copy's home."""
    shutil.copytree(src / "repo", dst / "repo", symlinks=True)
    shutil.copytree(src / "home", dst / "home", symlinks=True)
    local = dst / "repo" / ".dvc" / "config.local"
    if local.exists():
        local.write_text(local.read_text().replace(str(src / "home"), str(dst / "home")))


def _enter(root: Path, monkeypatch) -> Path:
    for key, value in workspace_env(root).items():
        monkeypatch.setenv(key, value)
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: never let one test's store leak into the next
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root / "repo"


def _leave() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from serving import milvus_server

    milvus_server.stop()  # a Milvus Lite server a flow started for this workspace


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty git repository as ILR_REPO and a fresh ILR_HOME; yields the repo path."""
    _init_repo(tmp_path / "repo")
    yield _enter(tmp_path, monkeypatch)
    _leave()


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory, tiny_synthetic) -> Path:
    """A workspace with the embedded `tiny` dataset ingested (validated, versioned) once per session."""
    from data.versioning import ingest

    root = tmp_path_factory.mktemp("tiny-template")
    _init_repo(root / "repo")
    saved = {k: os.environ.get(k) for k in (*workspace_env(root), "MLFLOW_TRACKING_URI")}
    os.environ.update(workspace_env(root))
    try:
        ingest("synthetic", str(tiny_synthetic), "tiny", log=lambda *_: None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return root


@pytest.fixture
def tiny_workspace(tmp_path, monkeypatch, tiny_template):
    """Like `workspace`, with `tiny@v1` already ingested (a copy of the session's template)."""
    copy_workspace(tiny_template, tmp_path)
    yield _enter(tmp_path, monkeypatch)
    _leave()


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """The embedded `tiny` dataset, generated once per test session."""
    from data import synthetic

    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    synthetic.generate(out, "tiny", seed=0, workers=2)
    return out


# The longest files first, each alone with a short one beside it (scripts/test runs xdist with
# --no-loadscope-reorder, so files are handed out in this order, two to each worker at the start): the
# fresh-clone demo (~6 min) starts at once on one worker while the other works through the rest.
FIRST = ("tests/flows/test_e2e.py", "tests/cluster/test_multinode.py", "tests/servers/test_servers.py",
         "tests/test_layout.py",
         "tests/models/test_registry_tune.py", "tests/serving/test_service.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(FIRST)))  # stable: the rest as collected


def pytest_configure(config):
    for rule in ("ignore::DeprecationWarning", "ignore:An input example was not provided:UserWarning"):
        config.addinivalue_line("filterwarnings", rule)

"""ilr against servers instead of its embedded defaults: an MLflow tracking server, a Prefect server and the
Milvus standalone of the dev extra (servers_check.py runs the lifecycle through them)."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_workspace, workspace_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# small: one trial of two steps, the gate on the target dataset only (the golden suites have their own tests)
PARAMS = {"tune": {"trials": 1, "steps": 2, "val_every": 1, "cpus_per_trial": 1,
                   "space": {"lr": ["choice", [0.01]], "dim": ["choice", [64]], "image_size": ["choice", [96]]}},
          "train": {"batch_size": 8, "workers": 1},
          "gate": {"suites": []},
          "index": {"chunk": 4, "min_recall": 0.9}}


def _private_netns() -> str | None:
    """Why the Milvus standalone cannot run here (it listens on every interface: only inside a private network
    namespace), or None."""
    if importlib.util.find_spec("milvus") is None:
        return "the `milvus` package (dev extra) is not installed"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "`unshare` / `ip` are missing"
    r = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    return f"no private network namespace here: {r.stderr.strip()}" if r.returncode else None


def test_lifecycle_against_mlflow_prefect_and_milvus_servers(tmp_path, tiny_template):
    copy_workspace(tiny_template, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    work = tmp_path / "servers"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MILVUS_URI", "RAY_ADDRESS") and not k.startswith("PREFECT_")}
    env.update(workspace_env(tmp_path), ILR_PARAMS=str(tmp_path / "params.yaml"), ILR_SERVERS_WORK=str(work),
               PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    why = _private_netns()
    # without a private network namespace: the MLflow and Prefect servers (127.0.0.1) and Milvus Lite
    cmd = [sys.executable, str(Path(__file__).with_name("servers_check.py"))]
    cmd = ["unshare", "-rn", *cmd, "--milvus-server"] if why is None else cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in work.glob("*.log"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout[-3000:], r.stderr[-5000:], logs)
    if why:
        pytest.skip(f"the MLflow and Prefect servers passed; the Milvus standalone was not run: {why}")

"""The retrain triggers and the dashboard, end to end in a workspace of their own (ILR_REPO/ILR_HOME/
ILR_PARAMS set: the default path itself is test_e2e.py): the embedded `tiny` dataset with the off-the-shelf
champion indexed and served in the background, one monitoring pass; then a new dataset version fires the
retrain trigger and the service follows the new index; a broken index is seen by the monitor, whose
trigger puts the champion's index back. The dashboard is rendered by a real browser. Real Prefect, DVC,
GX, Ray Tune, MLflow, Milvus Lite and Ray Serve."""
import fcntl
import os
import re
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import copy_workspace, workspace_env
from tests.flows._helpers import _chromium, _free_port, _run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_template):
    """tiny@v1, the off-the-shelf champion indexed and served in the background, one canary."""
    root = tmp_path_factory.mktemp("triggers")
    copy_workspace(tiny_template, root)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["tune"].update(trials=1, steps=2, val_every=2)
    p["monitoring"].update(canary_queries=8)
    small = root / "small-params.yaml"
    small.write_text(yaml.safe_dump(p))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ILR_", "MLFLOW_TRACKING_URI"))}
    env.update(workspace_env(root), ILR_PARAMS=str(small))
    port = _free_port()
    ilr, py = str(ROOT / ".venv" / "bin" / "ilr"), str(ROOT / ".venv" / "bin" / "python")
    _run([py, "-c", "from models import registry; registry.ensure_champion()"], ROOT, env)
    _run([ilr, "index", "build", "--dataset", "tiny", "--engine", "local"], ROOT, env)
    _run([ilr, "serve", "--background", "--port", str(port)], ROOT, env)
    url = f"http://127.0.0.1:{port}"
    try:
        mon = _run([ilr, "monitor", "--url", url], ROOT, env)
        assert "quality drop: False" in mon, mon
        yield {"env": env, "url": url, "home": root / "home", "ilr": ilr, "py": py}
    finally:
        import subprocess

        subprocess.run([ilr, "stop"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def _wait_health(url, pred, timeout_s=600):
    deadline, health = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        if pred(health):
            return health
        time.sleep(1)
    raise AssertionError(f"service never reached the expected state: {health}")


def _retrain_logs(home: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted((home / "logs").glob("retrain-*.log")))


def _wait_retrain_idle(home: Path, timeout_s=600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(home / "retrain.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                time.sleep(1)
    raise AssertionError("the retrain never finished:\n" + _retrain_logs(home))


def test_retrain_triggers_and_dashboard(served):
    env, url, home, ilr, py = served["env"], served["url"], served["home"], served["ilr"], served["py"]

    # a new dataset version through the ingest flow: the trigger fires and a background retrain follows
    out = _run([py, "-c", "from flows.lifecycle import ingest_dataset; "
                          "v = ingest_dataset('synthetic', 'tiny', 'tiny', seed=1); print(v['ref'], v['trigger'])"],
               ROOT, env)
    assert "tiny@v2" in out and "background process" in out, out
    try:
        _wait_health(url, lambda h: h.get("dataset") == "tiny@v2")
    except AssertionError:
        raise AssertionError(_retrain_logs(home)) from None
    _wait_retrain_idle(home)

    shot = home / "dashboard.png"
    r = _chromium("--window-size=1300,1400", f"--screenshot={shot}", f"{url}/dashboard/")
    assert shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] == 1300 and pixels.std() > 5  # not a blank page
    dom = _chromium("--dump-dom", f"{url}/dashboard/").stdout
    for plot in ("plot-quality", "plot-latency", "plot-drift", "plot-ann", "plot-suites"):
        assert f'id="{plot}"' in dom, plot
    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'id="(plot-[a-z]+)" data-points="(\d+)"', dom)}
    assert points["plot-quality"] >= 2 and points["plot-latency"] >= 3 and points["plot-ann"] >= 1, points
    # the gate's scores on the target and the real-photos suite, and the monitor's on the suite
    assert points["plot-suites"] >= 3, points
    assert dom.count("<polyline") >= 4

    # a deliberately broken index (random weights) -> the monitor sees the quality drop -> retrain fires
    import torch

    from models.artifacts import save
    from models.config import ModelConfig
    from models.delg import DELG

    torch.manual_seed(0)
    broken = save(DELG(ModelConfig(), load_pretrained=False).eval(), home / "random-model")
    _run([ilr, "index", "build", "--dataset", "tiny", "--model", str(broken), "--engine", "local"], ROOT, env)
    mon = _run([ilr, "monitor", "--url", url], ROOT, env)
    assert "quality drop: True" in mon, mon
    db = sqlite3.connect(home / "monitoring.db")
    kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY ts")]
    assert "ilr.dataset.versioned" in kinds and "ilr.quality.dropped" in kinds, kinds
    maps = [m for (m,) in db.execute("SELECT map_at_k FROM canary ORDER BY ts")]
    assert len(maps) >= 2 and maps[-1] < min(maps[:-1]) - 0.3  # the broken index was measured as much worse
    # the retrain (background) puts the champion's index back behind the alias; the service follows it
    try:
        _wait_health(url, lambda h: h["model"].startswith("models:/") and not h["champion_pending_index"]
                     and h.get("dataset") == "tiny@v2")
    except AssertionError:
        raise AssertionError(_retrain_logs(home)) from None
    _wait_retrain_idle(home)

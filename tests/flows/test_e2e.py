"""End to end: `ilr demo` at tiny scale in a fresh workspace (real Prefect, DVC, GX, Ray Tune, MLflow,
Milvus Lite, Ray Serve), the dashboard in headless Chromium, and both retrain triggers."""
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: ./scripts/test installs Debian's chromium (scripts/browser.sh)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def demo_env(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "i"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    port = _free_port()
    p["demo"].update(size="tiny", trials=2, steps=6)
    p["tune"].update(val_every=3, trials=2, steps=6)
    p["train"].update(image_size=160, batch_size=8)
    p["extract"].update(max_side_px=256)
    p["serve"].update(port=port)
    p["monitoring"].update(canary_queries=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {k: v for k, v in os.environ.items() if k not in (
        "MLFLOW_TRACKING_URI", "MILVUS_URI", "RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_HOME", "ILR_API_TOKEN")}
    env.update(ILR_REPO=str(repo), ILR_HOME=str(tmp_path / "home"), ILR_PARAMS=str(tmp_path / "params.yaml"),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    ilr = str(Path(sys.executable).with_name("ilr"))
    yield {"env": env, "port": port, "ilr": ilr, "home": tmp_path / "home", "tmp": tmp_path}
    subprocess.run([ilr, "stop"], env=env, capture_output=True, timeout=120)


def _wait_health(url, pred, timeout_s=600):
    import time

    deadline, health = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        if pred(health):
            return health
        time.sleep(2)
    raise AssertionError(f"service never reached the expected state: {health}")


def _retrain_logs(d) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted((d["home"] / "logs").glob("retrain-*.log")))


def _wait_retrain_idle(d, timeout_s=300):
    import fcntl
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(d["home"] / "retrain.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                time.sleep(2)
    raise AssertionError("the retrain never finished:\n" + _retrain_logs(d))


def _run(d, *args, timeout=900):
    r = subprocess.run([d["ilr"], *args], env=d["env"], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"ilr {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def test_demo_dashboard_and_retrain_triggers(demo_env):
    d = demo_env
    url = f"http://127.0.0.1:{d['port']}"
    out = _run(d, "demo", "--size", "tiny")
    assert f"{url}/dashboard/" in out and "gate:" in out and "canary: mAP@" in out
    assert "retrain trigger fired" in out  # the second dataset version: retrain runs in the background
    try:
        health = _wait_health(url, lambda h: h.get("dataset") == "synthetic-tiny@v2")
    except AssertionError:
        raise AssertionError(_retrain_logs(d)) from None
    assert health["status"] == "ok" and health["model"].startswith("models:/")
    _wait_retrain_idle(d)

    # the dashboard, rendered by a real browser
    shot = d["tmp"] / "dashboard.png"
    r = _chromium("--window-size=1300,1400", f"--screenshot={shot}", f"{url}/dashboard/")
    assert shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] == 1300 and pixels.std() > 5  # not a blank page
    shutil.copy(shot, d["home"] / "dashboard.png")
    dom = _chromium("--dump-dom", f"{url}/dashboard/").stdout
    for plot in ("plot-quality", "plot-latency", "plot-drift", "plot-ann"):
        assert f'id="{plot}"' in dom, plot
    import re

    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'id="(plot-[a-z]+)" data-points="(\d+)"', dom)}
    assert points["plot-quality"] >= 2 and points["plot-latency"] >= 3 and points["plot-ann"] >= 1, points
    assert dom.count("<polyline") >= 4 and "models:/" not in dom.split("plot-quality")[0][-10:]

    # a deliberately broken index (random weights) -> the monitor sees the quality drop -> retrain fires
    import torch

    from models.artifacts import save
    from models.config import ModelConfig
    from models.delg import DELG

    torch.manual_seed(0)
    broken = save(DELG(ModelConfig(), load_pretrained=False).eval(), d["tmp"] / "random-model")
    _run(d, "index", "build", "--dataset", "synthetic-tiny", "--model", str(broken), "--engine", "local")
    mon = _run(d, "monitor", "--url", url)
    assert "quality drop: True" in mon, mon
    db = sqlite3.connect(d["home"] / "monitoring.db")
    kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY ts")]
    assert "ilr.dataset.versioned" in kinds and "ilr.quality.dropped" in kinds, kinds
    # the retrain (background) put the champion's index back behind the alias; the service follows it
    try:
        health = _wait_health(url, lambda h: h["model"].startswith("models:/") and not h["champion_pending_index"])
    except AssertionError:
        raise AssertionError(_retrain_logs(d)) from None
    _wait_retrain_idle(d)
    maps = [m for (m,) in db.execute("SELECT map_at_k FROM canary ORDER BY ts")]
    assert len(maps) >= 2 and maps[-1] < min(maps[:-1]) - 0.3  # the broken index was measured as much worse

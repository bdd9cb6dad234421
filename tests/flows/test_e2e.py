"""End to end, as a user runs it: README command 1 (`./scripts/demo`) in a fresh `git clone` with no ILR_*
variables, twice, and `ilr tune` there; then, in that workspace, the retrain triggers (a new dataset
version, a quality drop) and the dashboard in headless Chromium. Real Prefect, DVC, GX, Ray Tune, MLflow,
Milvus Lite and Ray Serve throughout.

The clone is of the committed HEAD (in CI: the submitted main). It reuses this checkout's .venv (the
README's commands then find it up to date) and runs the clone's own code (PYTHONPATH)."""
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# what a new user's shell does not have: every ILR_* variable and the service switches
NOT_SET = ("MLFLOW_TRACKING_URI", "MILVUS_URI", "RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_HOME")
# the demo's search size: also its background retrain's, and the trigger test's retrain reuses that search
DEMO_SEARCH = {"trials": 2, "steps": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_clone(dest: Path) -> dict:
    """`git clone` of this repository into dest, with the environment of a user who set nothing."""
    r = subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot clone the repository: {r.stderr}")
    import hashlib

    stamp = ROOT / ".venv" / ".ilr-installed"
    want = hashlib.sha256((dest / "pyproject.toml").read_bytes() + (dest / "constraints.txt").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:  # else the clone's scripts would reinstall
        pytest.fail("the committed pyproject.toml/constraints.txt differ from those .venv was made from: commit, then run "
                    "./scripts/test (it refreshes .venv)")
    (dest / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ILR_") and k not in NOT_SET}
    env["PYTHONPATH"] = str(dest)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: ./scripts/test installs Debian's chromium (scripts/browser.sh)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """One fresh clone for the module: the demo runs in it, then the trigger test works in its workspace."""
    dest = tmp_path_factory.mktemp("a user") / "ilr"  # a space in the path, as many users' folders have
    env = fresh_clone(dest)
    port = _free_port()
    yield {"dir": dest, "env": env, "port": port, "url": f"http://127.0.0.1:{port}", "home": dest / ".ilr"}
    subprocess.run([str(dest / ".venv" / "bin" / "ilr"), "stop"], cwd=dest, env=env, capture_output=True, timeout=120)


def test_readme_demo_in_a_fresh_clone_runs_and_reruns(clone):
    """README command 1 exactly as a user types it (the demo's own options keep it small, also for the retrain
    that its second dataset version starts in the background); `ilr tune` in that clone; then README command
    1 again: it and that retrain take turns (one retrain at a time per workspace), the second reusing the
    first one's search."""
    demo = ["./scripts/demo", "--size", "tiny", "--trials", str(DEMO_SEARCH["trials"]), "--steps",
            str(DEMO_SEARCH["steps"]), "--port", str(clone["port"])]
    t0 = time.monotonic()
    out = _run(demo, clone["dir"], clone["env"])
    first_s = time.monotonic() - t0
    assert "demo finished" in out and f"{clone['url']}/dashboard/" in out and "gate:" in out, out
    assert f"workspace {clone['dir'] / '.ilr'}" in out.replace("\n", "")  # the default workspace, ./.ilr
    assert "new dataset version synthetic-tiny@v2: retrain trigger fired -> background process" in out, out
    # the commands it prints to copy into a shell work in that folder (they were not quoted)
    import shlex

    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("example ", "MLflow "))}
    image = next(a for a in shlex.split(lines["example"]) if a.startswith("image=@"))
    store = shlex.split(lines["MLflow"])[shlex.split(lines["MLflow"]).index("--backend-store-uri") + 1]
    assert Path(image.removeprefix("image=@")).is_file() and Path(store.removeprefix("sqlite:///")).is_file(), lines
    health = httpx.get(f"{clone['url']}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["dataset"].startswith("synthetic-tiny@v")  # v2 once retrained

    # `ilr tune` in the same clone, as a user types it: its trials run in Ray's own working folders
    ilr = str(clone["dir"] / ".venv" / "bin" / "ilr")
    tuned = _run([ilr, "tune", "--dataset", "synthetic-tiny", "--trials", "1", "--steps", "2", "--no-register"],
                 clone["dir"], clone["env"])
    assert "1 trials" in tuned and "best val_map" in tuned, tuned
    # from a subfolder of the clone: the same workspace (before: an empty one there, "no registered versions")
    listed = _run([ilr, "model", "list"], clone["dir"] / "docs", clone["env"])
    assert "champion" in listed and not (clone["dir"] / "docs" / ".ilr").exists(), listed

    t0 = time.monotonic()
    other = _free_port()  # asked for another port: the running service stays where it is, and the demo says so
    again = _run([*demo[:-1], str(other)], clone["dir"], clone["env"])
    print(f"demo in a fresh clone: {first_s:.0f}s, re-run {time.monotonic() - t0:.0f}s")
    assert "synthetic-tiny@v2 already versioned" in again and "demo finished" in again, again
    assert f"serving {clone['url']}" in again and f"`ilr stop` first to serve on {other}" in again, again
    # the same search as the background retrain's (v2, the same options): its result, without Ray; whichever
    # of the two took the workspace's retrain lock first ran it (so the retrain may still be going: wait)
    _wait_retrain_idle(clone["home"])
    assert "finished before" in again + _retrain_logs(clone["home"]), again
    assert (clone["dir"] / ".ilr" / "mlflow.db").exists()


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
    import fcntl

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


def test_retrain_triggers_and_dashboard(clone):
    """In the demo's workspace: the demo's second dataset version fired the retrain trigger and the service
    follows the new index; a broken index is seen by the monitor, whose trigger puts the champion's index
    back (ILR_PARAMS: the demo's search size, whose finished search the retrain reuses, and a small canary).
    The dashboard is rendered by a real browser."""
    d, url, home = clone["dir"], clone["url"], clone["home"]
    p = yaml.safe_load((d / "params.yaml").read_text())
    p["tune"].update(DEMO_SEARCH)
    p["monitoring"].update(canary_queries=8)
    small = d / ".ilr" / "small-params.yaml"
    small.write_text(yaml.safe_dump(p))
    env = {**clone["env"], "ILR_PARAMS": str(small)}
    ilr = str(d / ".venv" / "bin" / "ilr")

    # the demo's new dataset version: the background retrain it fired built the v2 index, the service follows
    try:
        _wait_health(url, lambda h: h.get("dataset") == "synthetic-tiny@v2")
    except AssertionError:
        raise AssertionError(_retrain_logs(home)) from None
    _wait_retrain_idle(home)
    assert "retrain synthetic-tiny@v2: new dataset version synthetic-tiny@v2" in _retrain_logs(home)

    shot = home / "dashboard.png"
    r = _chromium("--window-size=1300,1400", f"--screenshot={shot}", f"{url}/dashboard/")
    assert shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] == 1300 and pixels.std() > 5  # not a blank page
    dom = _chromium("--dump-dom", f"{url}/dashboard/").stdout
    for plot in ("plot-quality", "plot-latency", "plot-drift", "plot-ann"):
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
    _run([ilr, "index", "build", "--dataset", "synthetic-tiny", "--model", str(broken), "--engine", "local"], d, env)
    mon = _run([ilr, "monitor", "--url", url], d, env)
    assert "quality drop: True" in mon, mon
    db = sqlite3.connect(home / "monitoring.db")
    kinds = [k for (k,) in db.execute("SELECT kind FROM events ORDER BY ts")]
    assert "ilr.dataset.versioned" in kinds and "ilr.quality.dropped" in kinds, kinds
    maps = [m for (m,) in db.execute("SELECT map_at_k FROM canary ORDER BY ts")]
    assert len(maps) >= 2 and maps[-1] < min(maps[:-1]) - 0.3  # the broken index was measured as much worse
    # the swaps (demo, retrain, the broken build) are events; the broken pass's queries and worst thumbnails
    # are recorded, and the dashboard shows them with the markers
    assert kinds.count("index_swap") >= 3, kinds
    (last,) = db.execute("SELECT MAX(ts) FROM canary").fetchone()
    assert db.execute("SELECT COUNT(*) FROM canary_queries WHERE ts = ?", (last,)).fetchone()[0] == 8
    assert db.execute("SELECT COUNT(*) FROM canary_thumbs WHERE ts = ? AND query_jpeg IS NOT NULL",
                      (last,)).fetchone()[0] >= 1
    dom = _chromium("--dump-dom", f"{url}/dashboard/").stdout
    assert "class=\"wq\"" in dom and "data:image/jpeg;base64," in dom
    assert re.search(r'id="plot-quality" data-points="\d+" data-markers="[1-9]', dom), dom[:3000]
    # the retrain (background) puts the champion's index back behind the alias; the service follows it
    try:
        _wait_health(url, lambda h: h["model"].startswith("models:/") and not h["champion_pending_index"]
                     and h.get("dataset") == "synthetic-tiny@v2")
    except AssertionError:
        raise AssertionError(_retrain_logs(home)) from None
    _wait_retrain_idle(home)

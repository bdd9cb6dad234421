"""End to end, as a user runs it: README command 1 (`./scripts/demo`) in a fresh `git clone` with no ILR_*
variables, twice, and `ilr tune` there. Real Prefect, DVC, GX, Ray Tune, MLflow, Milvus Lite and Ray Serve
throughout. (The retrain triggers and the dashboard: test_triggers.py, in a workspace of their own, so that
both run at once on two test workers.)

The clone is of the committed HEAD (in CI: the submitted main). It reuses this checkout's .venv (the
README's commands then find it up to date) and runs the clone's own code (PYTHONPATH)."""
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.flows._helpers import _free_port, _run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# what a new user's shell does not have: every ILR_* variable and the service switches
NOT_SET = ("MLFLOW_TRACKING_URI", "MILVUS_URI", "RAY_ADDRESS", "PREFECT_API_URL", "PREFECT_HOME")


def fresh_clone(dest: Path) -> dict:
    """`git clone` of this repository into dest, with the environment of a user who set nothing."""
    r = subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot clone the repository: {r.stderr}")
    import hashlib

    stamp = ROOT / ".venv" / ".ilr-installed"
    want = hashlib.sha256((dest / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:  # else the clone's scripts would reinstall
        pytest.fail("the committed pyproject.toml differs from the one .venv was made from: commit, then run "
                    "./scripts/test (it refreshes .venv)")
    (dest / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ILR_") and k not in NOT_SET}
    env["PYTHONPATH"] = str(dest)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """One fresh clone for the module."""
    dest = tmp_path_factory.mktemp("user") / "ilr"
    env = fresh_clone(dest)
    port = _free_port()
    yield {"dir": dest, "env": env, "port": port, "url": f"http://127.0.0.1:{port}", "home": dest / ".ilr"}
    subprocess.run([str(dest / ".venv" / "bin" / "ilr"), "stop"], cwd=dest, env=env, capture_output=True, timeout=120)


def test_readme_demo_in_a_fresh_clone_runs_and_reruns(clone):
    """README command 1 exactly as a user types it (the demo's own options keep it small); `ilr tune` in that
    clone; then README command 1 again."""
    demo = ["./scripts/demo", "--size", "tiny", "--trials", "2", "--steps", "2", "--port", str(clone["port"]),
            "--no-second-version"]
    t0 = time.monotonic()
    out = _run(demo, clone["dir"], clone["env"])
    first_s = time.monotonic() - t0
    assert "demo finished" in out and f"{clone['url']}/dashboard/" in out and "gate:" in out, out
    assert f"workspace {clone['dir'] / '.ilr'}" in out.replace("\n", "")  # the default workspace, ./.ilr
    health = httpx.get(f"{clone['url']}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["dataset"] == "synthetic-tiny@v1"

    # `ilr tune` in the same clone, as a user types it: its trials run in Ray's own working folders
    ilr = str(clone["dir"] / ".venv" / "bin" / "ilr")
    tuned = _run([ilr, "tune", "--dataset", "synthetic-tiny", "--trials", "1", "--steps", "2", "--no-register"],
                 clone["dir"], clone["env"])
    assert "1 trials" in tuned and "best val_map" in tuned, tuned

    t0 = time.monotonic()
    again = _run(demo, clone["dir"], clone["env"])
    print(f"demo in a fresh clone: {first_s:.0f}s, re-run {time.monotonic() - t0:.0f}s")
    assert "already versioned" in again and "demo finished" in again, again
    assert "resuming the search" in again or "cannot resume" in again
    assert (clone["dir"] / ".ilr" / "mlflow.db").exists()

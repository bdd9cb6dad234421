"""The `MILVUS_URI` path: ilr's index code against a real Milvus server, not only Milvus Lite."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _private_netns() -> str | None:
    """Why this machine cannot run the check, or None."""
    if importlib.util.find_spec("milvus") is None:
        return "the `milvus` package (dev extra) is not installed"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "`unshare` / `ip` are missing"
    r = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    return f"no private network namespace here: {r.stderr.strip()}" if r.returncode else None


def test_vector_index_against_a_milvus_server():
    why = _private_netns()
    if why:
        pytest.skip(why)
    script = Path(__file__).with_name("milvus_server_check.py")
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.stdout[-3000:], r.stderr[-3000:])

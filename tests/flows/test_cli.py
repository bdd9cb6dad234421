"""The installed `ilr` console script as a shell runs it: its exit skips the interpreter's teardown
(flows.cli._quick_exit), and must still give the command's exit status and all of its output."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ILR = str(Path(sys.executable).parent / "ilr")


def _ilr(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([ILR, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_console_script_exit_status_and_output(tiny_workspace):
    ok = _ilr("data", "versions", "tiny")
    assert ok.returncode == 0, ok.stderr
    assert "dataset tiny" in ok.stdout and "v1" in ok.stdout and ok.stdout.rstrip().endswith("┘"), ok.stdout
    missing = _ilr("data", "versions", "nope")  # a command's own exit status
    assert missing.returncode == 1 and "no versions of 'nope'" in missing.stderr, missing
    bad = _ilr("evaluate", "--dataset", "nope")  # an IlrError: message on stderr, exit status 2
    assert bad.returncode == 2 and "error: dataset 'nope' has no versions" in bad.stderr, bad
    usage = _ilr("no-such-command")  # click's usage error
    assert usage.returncode == 2 and "No such command" in usage.stderr, usage

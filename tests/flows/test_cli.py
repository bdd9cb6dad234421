"""The installed `ilr` console script as a shell runs it: its exit skips the interpreter's teardown
(flows.cli._quick_exit), and must still give the command's exit status and all of its output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # an option out of range: refused before any work (before, -1 steps trained nothing and registered the model)
    for args, says in ((("train", "--dataset", "tiny", "--steps", "-1"), "train.steps must be at least 1, got -1"),
                       (("tune", "--dataset", "tiny", "--trials", "0"), "tune.trials must be at least 1, got 0"),
                       (("serve", "--port", "99999"), "serve.port must be at most 65535, got 99999"),
                       (("data", "generate", "--size", "huge", "--out", str(tiny_workspace / "g")),
                        "synthetic.size must be one of tiny, small, medium, got 'huge'")):
        r = _ilr(*args)
        assert r.returncode == 2 and f"error: {says}" in r.stderr and "--" in r.stderr, r


def test_query_names_an_image_path_it_cannot_read(tmp_path):
    """`ilr query` with a folder or a missing file says what is wrong with that path (before, a folder was
    reported as "cannot reach the service"), exit status 2; nothing is sent (no service is needed)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: had the file been read, the error would say so
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    for path, says in ((tmp_path, "this is a folder, not an image file"), (tmp_path / "gone.jpg", "file not found")):
        r = _ilr("query", str(path), "--url", url)
        assert r.returncode == 2 and f"error: {path}: {says}" in r.stderr.replace("\n", ""), r
        assert "cannot reach the service" not in r.stderr, r


def test_ctrl_c_gives_a_command_the_stop_time_it_asked_for(monkeypatch):
    """Ctrl-C ends a command 10 s later at the latest, unless the command asked for longer to stop in order
    (`ilr serve`: Serve's shutdown, which on a cluster otherwise outlives it); never shorter; once per process."""
    import flows.cli as cli
    from data import processes

    deadlines = []
    monkeypatch.setattr(cli, "_exit_after", deadlines.append)
    monkeypatch.setattr(cli, "_interrupted", False)
    monkeypatch.setattr(processes, "_STOP_GRACE_S", [10.0])
    with pytest.raises(KeyboardInterrupt):
        cli._on_interrupt(2, None)
    monkeypatch.setattr(cli, "_interrupted", False)
    processes.allow_stop_time(35.0)
    processes.allow_stop_time(5.0)
    with pytest.raises(KeyboardInterrupt):
        cli._on_interrupt(2, None)
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: the same deadline
        cli._on_interrupt(2, None)
    assert deadlines == [10.0, 35.0]

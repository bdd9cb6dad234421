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


def test_the_quick_exit_ends_with_a_thread_pool_alive():
    """The CLI's exit (flows.cli._quick_exit) waited forever when a thread pool was alive — MLflow keeps one for
    artifact transfers with an MLflow server: seen as `ilr retrain` never ending after its work. It now ends as
    Python's exit does: non-daemon threads finished, atexit handlers run, the exit status kept."""
    code = ("import atexit, concurrent.futures, threading, time\n"
            "pool = concurrent.futures.ThreadPoolExecutor(2)\n"  # held, as MLflow holds its pool
            "pool.submit(int).result()\n"
            "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            "from flows.cli import _quick_exit\n"
            "_quick_exit(3)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("the exit waited for the thread pool's idle workers")
    assert r.returncode == 3 and r.stdout.split() == ["thread", "done", "atexit", "ran"], r


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


def test_a_stop_that_a_library_turned_into_another_error_is_still_a_stop():
    """A signal that lands while Ray is inside C code surfaces as a SystemError caused by the signal's exception:
    it is still a stop (no task retry, exit 128 + the signal), and nothing else is."""
    import signal

    from prefect.exceptions import TerminationSignal

    from data.processes import interrupt_behind

    try:
        try:
            raise TerminationSignal(signal=signal.SIGTERM)
        except BaseException as e:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from e
    except SystemError as e:
        wrapped = e
    assert interrupt_behind(wrapped) == signal.SIGTERM
    assert interrupt_behind(KeyboardInterrupt()) == signal.SIGINT
    assert interrupt_behind(SystemExit(signal.SIGTERM)) == signal.SIGTERM  # Ray's own SIGTERM handler
    assert interrupt_behind(SystemExit(0)) is None and interrupt_behind(RuntimeError("no trial finished")) is None


@pytest.mark.slow
def test_a_killed_command_stops_in_order_and_leaves_nothing_running(tiny_workspace):
    """`kill PID` (SIGTERM) stops an `ilr` command as Ctrl-C does: exit status 143, nothing retried, and what it
    started goes with it — the local Ray (GCS, raylet, agents, trials) and Prefect's temporary server. Before:
    during a search, the signal surfaced inside Ray's C code as a SystemError, Prefect retried the task and the
    retrain ran to its end; waiting for the retrain lock, the command died at once and its Prefect server ran
    on, orphaned (about 200 MB each). A command killed with SIGKILL cannot stop its server: `ilr stop` does."""
    import signal
    import time

    import psutil

    from data.locks import workspace_lock
    from flows.prefect_server import _temporary_servers

    seen = []
    # as a user runs it: no Prefect settings that another test of this process left in its environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(ROOT)}

    def session(pid: int) -> list:  # Ray starts each worker in a process group of its own
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == pid:
                    out.append(p)
            except OSError:
                continue
        return out

    def retrain(log: Path, until, *args: str) -> subprocess.Popen:
        """`ilr retrain` in a session of its own (so that its processes can be told apart), once `until(proc)`
        holds."""
        proc = subprocess.Popen([ILR, "retrain", "--dataset", "tiny", "--no-record", *args], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not until(proc):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            seen.extend(session(proc.pid))
            time.sleep(0.2)
        seen.extend(session(proc.pid))
        return proc

    def trial_running(proc) -> bool:
        return any(p.name().startswith("ray::ImplicitFu") for p in session(proc.pid))

    def waiting(log: Path):  # the workspace's retrain lock, which this test holds, inside its flow run
        return lambda proc: "another retrain is running" in log.read_text()

    def gone(procs: list) -> bool:
        psutil.wait_procs(procs, timeout=15)
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)

    try:
        log = tiny_workspace / "tune.log"  # SIGTERM during a search
        proc = retrain(log, trial_running, "--trials", "1", "--steps", "400")
        inside = session(proc.pid)
        proc.send_signal(signal.SIGTERM)  # to the command alone, as `kill PID` sends it
        assert proc.wait(timeout=90) == 143 and "interrupted" in log.read_text(), log.read_text()
        assert gone(inside) and gone(session(proc.pid)), [p.name() for p in inside if p.is_running()]
        with workspace_lock("retrain"):
            log = tiny_workspace / "term.log"  # SIGTERM while waiting, with no Ray
            proc = retrain(log, waiting(log))
            servers = _temporary_servers(psutil.Process(proc.pid).children())
            assert len(servers) == 1, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143 and "interrupted" in log.read_text(), log.read_text()
            assert gone(servers)
            log = tiny_workspace / "kill.log"  # SIGKILL
            proc = retrain(log, waiting(log))
            servers = _temporary_servers(psutil.Process(proc.pid).children())
            proc.kill()
            proc.wait(timeout=30)
            time.sleep(1)
            assert servers and all(s.is_running() for s in servers)  # orphaned: the command could not stop it
        stop = _ilr("stop")
        assert stop.returncode == 0 and "1 temporary Prefect server(s) left by killed commands" in stop.stdout, stop
        assert gone(servers)
    finally:  # what a failing run of this test would leave
        for p in seen:
            try:
                p.kill()
            except psutil.Error:
                pass

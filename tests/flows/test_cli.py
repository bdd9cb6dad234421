"""The installed `ilr` console script as a shell runs it: its exit skips the interpreter's teardown
(flows.cli._quick_exit), and must still give the command's exit status and all of its output."""
import json
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


def test_a_port_in_use_is_refused_before_any_work(workspace, monkeypatch):
    """Another program listening on the service's port: `ilr demo` ran the whole lifecycle (minutes) and only
    then failed, and `ilr serve --background` said "the service exited with code 1" (Ray Serve's proxy could
    not bind; the reason was in a Ray traceback in the log). Both now refuse at once and say why; nothing is
    ingested or started."""
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a cluster's proxies bind elsewhere: not checked then
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        for args in (("demo", "--size", "tiny", "--port", str(port)), ("serve", "--background", "--port", str(port))):
            r = _ilr(*args)
            assert r.returncode == 2, r
            assert f"serve.port: port {port} on 127.0.0.1 is in use by another program" in r.stderr, r.stderr
            assert "hint:" in r.stderr and "--port N" in r.stderr, r.stderr
        home = workspace.parent / "home"
        assert not (home / "datasets").exists() and not (home / "serve.json").exists()
        assert not (home / "milvus-server.json").exists()
        # the port held by this workspace's own service (its record, as `ilr serve` writes it): said so
        (home / "serve.json").write_text(json.dumps({"pid": os.getpid(), "url": f"http://127.0.0.1:{port}"}))
        r = _ilr("serve", "--port", str(port))
        assert r.returncode == 2 and f"this workspace's service already listens on port {port}" in r.stderr, r
        assert "`ilr stop` stops it" in r.stderr, r.stderr
        (home / "serve.json").unlink()
    # not an address of this machine: said so, not "in use"
    r = _ilr("serve", "--background", "--host", "192.0.2.1", "--port", str(port))
    assert r.returncode == 2 and f"the service cannot listen on 192.0.2.1 port {port}" in r.stderr, r
    assert "serve.host must be an address of this machine" in r.stderr, r.stderr


def test_waiting_for_the_service_does_not_take_another_programs_answer(workspace):
    """A program that answers any path with HTTP 200 and no JSON (the local Ray's metrics exporter, seen on the
    service's port in the suite): the wait for the service raised JSONDecodeError instead of waiting on and
    saying what it saw."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from data.errors import IlrError
    from serving.service import wait_healthy

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"# HELP ray_up 1")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(IlrError, match="did not answer within 1 s .HTTP 200: # HELP ray_up 1"):
            wait_healthy(f"http://127.0.0.1:{server.server_port}", timeout_s=1)
    finally:
        server.shutdown()


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
    """`kill PID` (SIGTERM) stops an `ilr` command as Ctrl-C does: exit status 143, and the temporary Prefect
    server its flow started ends with it (before: the command died at once and the server ran on, orphaned,
    about 200 MB each). A command killed with SIGKILL cannot end its server: `ilr stop` does. (During a search,
    the signal surfaces inside Ray's C code instead: tests below and BENCHMARKS.md.)"""
    import signal
    import time

    import psutil

    from data.locks import workspace_lock
    from flows.prefect_server import _temporary_servers

    # as a user runs it: no Prefect settings that another test of this process left in its environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(ROOT)}
    seen = []

    def retrain_waiting(log: Path):
        """`ilr retrain` inside its flow run, waiting for the workspace's retrain lock (this test holds it)."""
        proc = subprocess.Popen([ILR, "retrain", "--dataset", "tiny", "--no-record"], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 180
        while "another retrain is running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        servers = _temporary_servers(psutil.Process(proc.pid).children())
        seen.extend(servers)
        assert len(servers) == 1, log.read_text()
        return proc, servers[0], log

    try:
        with workspace_lock("retrain"):
            proc, server, log = retrain_waiting(tiny_workspace / "term.log")
            proc.send_signal(signal.SIGTERM)  # to the command alone, as `kill PID` sends it
            assert proc.wait(timeout=60) == 143 and "interrupted" in log.read_text(), log.read_text()
            psutil.wait_procs([server], timeout=10)
            assert not server.is_running()
            proc, server, log = retrain_waiting(tiny_workspace / "kill.log")
            proc.kill()
            proc.wait(timeout=30)
            time.sleep(1)
            assert server.is_running() and server.ppid() != proc.pid  # orphaned: the command could not stop it
        stop = _ilr("stop")
        assert stop.returncode == 0 and "1 temporary Prefect server(s) left by killed commands" in stop.stdout, stop
        psutil.wait_procs([server], timeout=10)
        assert not server.is_running()
    finally:  # what a failing run of this test would leave
        for p in seen:
            if p.is_running():
                p.kill()


def test_ilr_stop_stops_a_retrain_that_a_trigger_started(tiny_workspace, monkeypatch):
    """`ilr stop` ended the service and the Milvus Lite server, not the retrain that a new dataset version had
    started in the background (the demo's second version): it ran on, and its index step started the Milvus Lite
    server again after the user had stopped everything. Now `ilr stop` stops it as `kill PID` does (in order, its
    temporary Prefect server with it) and says how to resume it; `--keep-retrain` leaves it running."""
    import time

    import psutil

    from data.locks import workspace_lock
    from flows.lifecycle import spawn_retrain
    from flows.prefect_server import _temporary_servers

    for key in [k for k in os.environ if k.startswith("PREFECT_")]:  # what other tests of this process set
        monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))

    def gone(proc) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE  # this process started it: ended, not reaped yet
        except psutil.NoSuchProcess:
            return True

    with workspace_lock("retrain"):  # the retrain waits for it inside its flow run: its Prefect server is up
        started = spawn_retrain("tiny", "a test", trials=1, steps=1)
        log, proc = Path(started["log"]), psutil.Process(started["pid"])
        deadline = time.monotonic() + 300  # Prefect's temporary server alone may take 180 s on a busy machine
        while "another retrain is running" not in log.read_text():
            assert not gone(proc) and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        servers = _temporary_servers(proc.children())
        assert len(servers) == 1, log.read_text()
        kept = _ilr("stop", "--keep-retrain")
        assert kept.returncode == 0 and "nothing was running" in kept.stdout and not gone(proc), kept
        stop = _ilr("stop")
    try:
        assert stop.returncode == 0, stop
        assert (f"background retrain of tiny (pid {proc.pid}; `ilr retrain --dataset tiny --trials 1 --steps 1` "
                "resumes its search)") in stop.stdout.replace("\n", ""), stop.stdout
        assert gone(proc) and "interrupted" in log.read_text(), log.read_text()
        psutil.wait_procs(servers, timeout=10)
        assert not any(s.is_running() for s in servers)
        again = _ilr("stop")  # its record is gone with it
        assert again.returncode == 0 and "nothing was running" in again.stdout, again
        assert not (tiny_workspace.parent / "home" / "milvus-server.json").exists()
    finally:  # what a failing run of this test would leave
        for p in [proc, *servers]:
            if not gone(p):
                p.kill()


def test_a_task_is_not_retried_after_a_stop(workspace):
    """A stop that Ray's C code turned into a SystemError made Prefect retry the task (the search ran on after
    `kill PID`): the lifecycle's tasks retry other failures, never a stop. Real flows, in a process of their own
    set up as `ilr` sets one up."""
    code = ("import signal\n"
            "from flows.prefect_server import protect_local\n"
            "protect_local()\n"
            "from prefect import flow, task\n"
            "from prefect.exceptions import TerminationSignal\n"
            "from flows.lifecycle import _retry_unless_interrupted\n"
            "calls = []\n"
            "@task(retries=1, retry_delay_seconds=0, retry_condition_fn=_retry_unless_interrupted)\n"
            "def failing(stop):\n"
            "    calls.append(stop)\n"
            "    try:\n"
            "        raise TerminationSignal(signal=signal.SIGTERM) if stop else RuntimeError('a node died')\n"
            "    except TerminationSignal as e:\n"
            "        raise SystemError('CoreWorker.wait returned a result with an exception set') from e\n"
            "@flow\n"
            "def run(stop):\n"
            "    failing(stop)\n"
            "for stop in (True, False):\n"
            "    calls.clear()\n"
            "    try:\n"
            "        run(stop)\n"
            "    except (SystemError, RuntimeError):\n"
            "        pass\n"
            "    print('calls', stop, len(calls), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("calls")] == ["calls True 1", "calls False 2"], r


def test_an_interrupted_exit_ends_what_the_command_started():
    """The CLI's exit after Ctrl-C or SIGTERM skips Ray's and Prefect's own shutdown: it ends what the command
    started in its process group — children, and processes orphaned there (a local Ray's agents outlive their
    raylet) — and leaves a detached one alone."""
    import time

    import psutil

    code = ("import subprocess, sys, time\n"
            "from data.processes import end_own_group\n"
            "quiet = {'stdout': subprocess.DEVNULL}\n"
            "child = subprocess.Popen(['sleep', '300'], **quiet)\n"
            "orphan = subprocess.Popen(['sh', '-c', 'sleep 300 >/dev/null & echo $!'], stdout=subprocess.PIPE,\n"
            "                          text=True)\n"
            "detached = subprocess.Popen(['sleep', '300'], start_new_session=True, **quiet)\n"
            "print(child.pid, orphan.stdout.readline().strip(), detached.pid, flush=True)\n"
            "orphan.wait(); time.sleep(0.5)\n"
            "print(end_own_group(timeout_s=2), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    out, _ = proc.communicate(timeout=60)
    child, orphan, detached = map(int, out.split()[:3])
    try:
        assert out.split()[3] == "2", out  # the child and the orphan
        time.sleep(0.5)
        assert not psutil.pid_exists(orphan) and psutil.Process(detached).is_running()
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        for pid in (child, orphan, detached):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass

"""The workspace's background processes — the service, the Milvus Lite server, the Prefect server, a
retrain — started one way: detached from the command that starts them (they outlive it), their output in
`$ILR_HOME/logs/`, and waited for until they answer or exit."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from data.config import ilr_home
from data.errors import IlrError

T = TypeVar("T")

# After Ctrl-C a command gets this long to stop in order before the CLI ends it (flows.cli); a command whose
# orderly stop takes longer (the service shutting its Serve app down) asks for more with allow_stop_time().
_STOP_GRACE_S = [10.0]


def allow_stop_time(seconds: float) -> None:
    _STOP_GRACE_S[0] = max(_STOP_GRACE_S[0], seconds)


def stop_grace_s() -> float:
    return _STOP_GRACE_S[0]


def interrupt_behind(exc: BaseException | None) -> int | None:
    """The signal (SIGINT, SIGTERM) when `exc` comes from stopping the process — KeyboardInterrupt, Prefect's
    TerminationSignal, Ray's SystemExit(15) — itself or as the cause or context of another exception: a signal
    that lands while a library is inside C code (Ray's waits) surfaces as a SystemError caused by it, which
    Prefect would retry like any other failure. None otherwise."""
    import signal

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return int(signal.SIGINT)
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            return int(signal.SIGTERM)
        if not isinstance(exc, Exception) and isinstance(getattr(exc, "signal", None), int):
            return int(exc.signal)  # prefect.exceptions.TerminationSignal
        exc = exc.__cause__ or exc.__context__
    return None


def end_own_group(timeout_s: float = 5.0) -> int:
    """End what this process started and did not detach, for an exit that skips their own shutdown (flows.cli
    after Ctrl-C or SIGTERM): the processes of this process's group (of which it must be the leader, as a
    shell's job or a `spawn`ed process is) that descend from it or were orphaned — the local Ray's GCS, raylet,
    agents and workers, Prefect's temporary server. A terminal's Ctrl-C reaches them through the group; a
    signal sent to this process alone (`kill PID`) does not, and they would run on. Detached processes
    (`spawn`: the service, the Milvus Lite server, a background retrain) have groups of their own. Returns
    how many were ended."""
    import os

    import psutil

    me = os.getpid()
    if os.getpgrp() != me:
        return 0
    mine = {p.pid for p in psutil.Process(me).children(recursive=True)}
    procs = []
    for p in psutil.process_iter(["ppid"]):
        try:
            if p.pid != me and (p.pid in mine or p.info["ppid"] == 1) and os.getpgid(p.pid) == me:
                procs.append(p)
        except (OSError, psutil.Error):
            continue
    return end_processes(procs, timeout_s)


def end_processes(procs: list, timeout_s: float = 5.0) -> int:
    """SIGTERM to each of `procs` (psutil.Process), SIGKILL to those still running `timeout_s` later."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def venv_exe(name: str) -> str:
    """The console script `name` of this interpreter's environment (the .venv), else the one on PATH."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def spawn(cmd: list[str], log_name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Start `cmd` (its first element a console script of the environment) in its own session, output
    appended to $ILR_HOME/logs/<log_name>; returns the process and the log's path."""
    logs = ilr_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / log_name
    with open(log, "ab") as fh:
        proc = subprocess.Popen([venv_exe(cmd[0]), *cmd[1:]], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    return proc, log


def wait_until(ready: Callable[[], T | None], what: str, timeout_s: float, proc: subprocess.Popen | None = None,
               log: Path | None = None, poll_s: float = 0.5, hint: str | None = None,
               last: Callable[[], str] | None = None) -> T:
    """Call `ready()` until it returns something truthy; IlrError (naming the log) when `proc` exits first
    or `timeout_s` passes. `last()` may say what was seen last, for the timeout message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise IlrError(f"{what} exited with code {proc.returncode}", where=str(log) if log else None, hint=hint)
        out = ready()
        if out:
            return out
        time.sleep(poll_s)
    seen = f" ({last()})" if last else ""
    raise IlrError(f"{what} did not answer within {timeout_s:.0f} s{seen}", where=str(log) if log else None,
                   hint=hint)


# ------------------------------------------------------------------------------------ recorded background work

def _records() -> Path:
    return ilr_home() / "background"


def record_background(kind: str, proc: subprocess.Popen, **info) -> None:
    """Remember a detached process of this workspace that is not a server (a retrain that a trigger started),
    so that `ilr stop` can end it: $ILR_HOME/background/<kind>-<pid>.json with its command line. A process
    is taken for it only with that pid, that command line, its own session (`spawn`) and this workspace's
    ILR_HOME in its environment: never a later process that got the same pid."""
    import json
    import os

    import psutil

    try:
        cmdline = psutil.Process(proc.pid).cmdline()
    except psutil.Error:
        return  # it has ended already
    _records().mkdir(parents=True, exist_ok=True)
    path = _records() / f"{kind}-{proc.pid}.json"
    part = path.with_suffix(".part")  # a reader never sees half a record
    part.write_text(json.dumps({"pid": proc.pid, "cmdline": cmdline, **info}))
    os.replace(part, path)


def _is_recorded(proc, info: dict) -> bool:
    import os

    import psutil

    try:
        return (proc.cmdline() == info["cmdline"] and os.getsid(proc.pid) == proc.pid
                and proc.environ().get("ILR_HOME") == str(ilr_home()) and proc.status() != psutil.STATUS_ZOMBIE)
    except (OSError, psutil.Error):
        return False


def running_background(kind: str) -> list[tuple[object, dict]]:
    """This workspace's recorded `kind` processes that still run, as (psutil.Process, what was recorded); the
    records of those that ended are removed."""
    import json

    import psutil

    found = []
    for path in sorted(_records().glob(f"{kind}-*.json")) if _records().is_dir() else []:
        try:
            info = json.loads(path.read_text())
            proc = psutil.Process(info["pid"])
            if _is_recorded(proc, info):
                found.append((proc, info))
                continue
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            pass
        path.unlink(missing_ok=True)
    return found


def end_background(kind: str, timeout_s: float = 45.0) -> list[dict]:
    """Stop this workspace's recorded `kind` processes as `kill PID` does (an `ilr` command stops in order and
    ends what it started: exit 143), waiting up to `timeout_s`; then SIGKILL to the process group of any still
    running (each has its own: `spawn`). Returns what was recorded of each."""
    import os
    import signal

    import psutil

    def ended(proc) -> bool:  # exited (is_running: not a later process with its pid); a zombie too (its parent,
        try:                  # if still alive, has not reaped it yet)
            return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def wait(procs: list, seconds: float) -> list:
        deadline = time.monotonic() + seconds
        while (procs := [p for p in procs if not ended(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return procs

    found = running_background(kind)
    for proc, _ in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    for proc in wait([p for p, _ in found], timeout_s):
        try:
            if proc.is_running() and os.getpgid(proc.pid) == proc.pid:  # still it, still leading its group
                os.killpg(proc.pid, signal.SIGKILL)
        except (OSError, psutil.Error):
            pass
    wait([p for p, _ in found], 5)
    running_background(kind)  # removes the records
    return [info for _, info in found]

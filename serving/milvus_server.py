"""A Milvus Lite server for this workspace, so that several processes share one index.

Milvus Lite opened in-process (`MilvusClient(path)`) locks its data dir: the service's Searcher and an
`ilr index build` could not both use it. `ensure()` starts `milvus-lite server` on 127.0.0.1 over the
same data dir ($ILR_HOME/milvus.db), in the background, and records its URI; `milvus_uri()` in
serving.index then prefers it. With `MILVUS_URI` set (a Milvus standalone or cluster) nothing is started.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from data.config import ilr_home
from data.errors import IlrError
from data.processes import spawn, wait_until

STATE = "milvus-server.json"
_children: dict[int, subprocess.Popen] = {}


def _state_path() -> Path:
    return ilr_home() / STATE


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise IlrError("no free port for the Milvus Lite server")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def running() -> str | None:
    """URI of this workspace's Milvus Lite server when it runs, else None."""
    path = _state_path()
    if not path.exists():
        return None
    try:
        st = json.loads(path.read_text())
    except ValueError:
        return None
    if _alive(st["pid"]) and _port_open("127.0.0.1", st["port"]):
        return st["uri"]
    return None


def ensure(port: int = 19530, timeout_s: float = 60.0) -> str:
    """Start the server unless MILVUS_URI is set or it already runs; return the URI to use."""
    if os.environ.get("MILVUS_URI"):
        return os.environ["MILVUS_URI"]
    uri = running()
    if uri:
        return uri
    home = ilr_home()
    _release_in_process(home / "milvus.db")
    port = _free_port(port)
    proc, log = spawn(["milvus-lite", "server", "--data-dir", str(home / "milvus.db"), "--host", "127.0.0.1",
                       "--port", str(port)], "milvus.log")
    try:
        wait_until(lambda: _port_open("127.0.0.1", port), "the Milvus Lite server", timeout_s, proc, log,
                   poll_s=0.2, hint="another process may hold the data dir (an `ilr` command still running?)")
    except IlrError:
        proc.kill()
        raise
    uri = f"http://127.0.0.1:{port}"
    _state_path().write_text(json.dumps({"pid": proc.pid, "port": port, "uri": uri}))
    _children[proc.pid] = proc
    return uri


def _release_in_process(data_dir: Path) -> None:
    """Let go of the Milvus Lite this process opened in-process on the data dir (what milvus_uri() gives while no
    server runs, e.g. for reading the live alias): it holds the data dir's lock while the process lives, so the
    server could not open it. Clients opened on it stop working; ilr opens a client per use."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(str(data_dir))


def stop() -> bool:
    path = _state_path()
    if not path.exists():
        return False
    st = json.loads(path.read_text())
    path.unlink()
    child = _children.pop(st["pid"], None)
    if child is not None:
        child.terminate()
        child.wait(timeout=10)
        return True
    if _alive(st["pid"]):
        os.kill(st["pid"], signal.SIGTERM)
        for _ in range(50):
            if not _alive(st["pid"]):
                break
            time.sleep(0.1)
        return True
    return False

"""Ray for every layer that uses it — Tune trials, Ray Data extraction, the Serve graph: join RAY_ADDRESS (a
cluster) or start a single-machine Ray on loopback, always with token authentication."""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

from data.config import pin_workspace

AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch for token authentication: "token" (our default) or "disabled"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes 127.0.0.1 as this node's address
# How long a local start waits for its GCS to write its port. Ray's default is 30 s (120 s with a RocksDB GCS);
# on a busy 2-core machine the GCS once needed more. A user's value is kept.
GCS_WAIT_ENV, GCS_WAIT_S = "RAY_gcs_server_port_wait_time_s", "120"
# what ray.init raises when a local start's GCS or raylet is not up in time: worth one more try
_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
# the GCS log's records ("[2026-12-01 17:30:23,661 I 8025 8025] (gcs_server) ..."), less its periodic state dump
_GCS_RECORD, _GCS_DUMP = re.compile(r"\[\d{4}-\d\d-\d\d "), re.compile(r"Event stats:|Debug state:")
_log = logging.getLogger(__name__)


def _require_token_auth() -> None:
    """Token authentication on, explicitly: RAY_AUTH_MODE=token unless the user set it. A user's
    RAY_AUTH_MODE=disabled is honoured, with a warning. Ray caches the mode: re-read it after the change."""
    from ray._raylet import Config

    mode = os.environ[AUTH_MODE_ENV] = os.environ.get(AUTH_MODE_ENV) or "token"
    if mode.lower() == "disabled":
        _log.warning("RAY_AUTH_MODE=disabled: Ray token authentication is off; anyone who can reach Ray's ports "
                     "can run code as this user")
    Config.initialize("")


def _private_token_file() -> None:
    """Ray writes its generated token to ~/.ray/auth_token with the umask's mode (often world-readable): the
    token is the only thing between another local user and Ray's job API, so make it owner-only."""
    path = Path.home() / ".ray" / "auth_token"
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass


def _local_ray_init(**kwargs) -> None:
    """A new single-machine Ray whose raylet, GCS, object manager, workers, dashboard agent and metrics ports
    listen on 127.0.0.1 only. Ray binds them to the node's address; on Linux that address is the routable
    one, never loopback (ray.init resolves _node_ip_address="127.0.0.1" back to it) unless Ray's single-machine
    mode is on, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the default on macOS and Windows). Its constant is read
    at import, so it is set in the module too; both are restored once the node runs, so that a later
    ensure_ray() joining RAY_ADDRESS is unaffected. Ray's processes keep the variable: they agree with it.
    Another process that joins this Ray by address (RAY_ADDRESS=127.0.0.1:<gcs port>) needs the variable as
    well: Ray would otherwise rewrite 127.0.0.1 to the routable address, where nothing listens. Not covered:
    each Serve replica's inter-deployment gRPC server, hard-coded to [::]:0 by Ray Serve (token-checked)."""
    import ray
    from ray._private import ray_constants

    saved_env = {name: os.environ.get(name) for name in (LOOPBACK_ENV, GCS_WAIT_ENV)}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    os.environ[GCS_WAIT_ENV] = saved_env[GCS_WAIT_ENV] or GCS_WAIT_S
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _abandon_failed_start(since: float) -> str:
    """After a local start that failed half-way: ray.init has no node to shut down, so the GCS (and raylet)
    it started would run on until this process exits. Kill this process's Ray children started since
    `since`, and hand back the end of the GCS's log, which says why it was late or died."""
    import psutil

    tail = ""
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.create_time() < since - 1:
                continue
            args = proc.cmdline()
            if not any("/session_" in a for a in args):  # GCS, raylet and Ray's agents name their session
                continue
            if proc.name() == "gcs_server" and not tail:
                log_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--log_dir=")), "")
                logs = [Path(log_dir, name) for name in ("gcs_server.err", "gcs_server.out")]
                lines = [ln for f in logs if f.is_file() for ln in f.read_text(errors="replace").splitlines()]
                records = [ln for ln in lines if _GCS_RECORD.match(ln) and not _GCS_DUMP.search(ln)]
                tail = "\n".join(records[-5:] or lines[-5:]) or "(empty)"
            proc.kill()
        except (psutil.Error, OSError):
            continue
    return tail


def _same_machine(address: str) -> dict:
    """Joining a cluster whose GCS listens on a loopback address (nodes started on this machine, e.g.
    `ray start --node-ip-address=127.0.0.2`): this driver is a process of that node, so it takes the same
    address; Ray would otherwise look for a node at the routable address, where none runs."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # "auto", a host name, ray://...
        return {}
    return {"_node_ip_address": host} if loopback else {}


def ensure_ray(dashboard: bool = False) -> None:
    """Join RAY_ADDRESS when set (a real cluster), else start a local Ray on this machine's cores, bound to
    127.0.0.1. Either way with token authentication (RAY_AUTH_MODE=token) unless RAY_AUTH_MODE says otherwise:
    a local Ray generates its token in ~/.ray/auth_token; joining a cluster needs the cluster's token there,
    in RAY_AUTH_TOKEN or in the file RAY_AUTH_TOKEN_PATH names."""
    import ray

    pin_workspace()  # resolved here, in the driver: workers get these values, never their own cwd's
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    _require_token_auth()
    common = {"log_to_driver": False, "include_dashboard": dashboard, "dashboard_host": "127.0.0.1",
              "configure_logging": False}
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        for attempt in (1, 2):
            started = time.time()
            try:
                if address:
                    ray.init(address=address, **_same_machine(address), **common)
                else:
                    _local_ray_init(num_cpus=os.cpu_count(), **common)
                    _private_token_file()
                return
            except Exception as e:
                # a local Ray gives its raylet 30 s to register and its GCS 120 s to start; on a busy 2-core
                # machine either can pass (seen in CI): clear away what the failed start left, then once more
                if address or not any(text in str(e) for text in _START_TIMEOUTS):
                    raise
                ray.shutdown()
                gcs_log = _abandon_failed_start(started)
                if attempt == 2:
                    raise RuntimeError(f"a local Ray did not start twice: {e}\n"
                                       f"the end of its GCS log:\n{gcs_log}") from e
                _log.warning("a local Ray did not start (%s); trying once more. The end of its GCS log:\n%s",
                             e, gcs_log)
    finally:  # ray.init makes SIGTERM sys.exit(15); a handler the process had (the CLI's orderly stop) stays
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)

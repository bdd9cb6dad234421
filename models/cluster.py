"""Ray for every layer that uses it — Tune trials, Ray Data extraction, the Serve graph: join RAY_ADDRESS (a
cluster) or start a single-machine Ray on loopback, always with token authentication."""
from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from data.config import pin_workspace

AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch for token authentication: "token" (our default) or "disabled"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes 127.0.0.1 as this node's address
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

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


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
    for attempt in (1, 2):
        try:
            if address:
                ray.init(address=address, **_same_machine(address), **common)
            else:
                _local_ray_init(num_cpus=os.cpu_count(), **common)
                _private_token_file()
            return
        except Exception as e:
            # a local Ray gives its raylet 30 s to register; on a busy 2-core machine that can pass: once more
            if address or attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()

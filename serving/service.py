"""Run the retrieval service: start (in this process), in the background (a detached `ilr serve`), stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from data.config import ilr_home, worker_env
from data import processes
from data.errors import IlrError
from data.processes import allow_stop_time, wait_until
from serving import milvus_server
from serving.config import ServeConfig, serve_config

STATE = "serve.json"
SHUTDOWN_S = 30  # `ilr serve` stopping: how long Serve's shutdown may take before the process exits anyway


def url_of(cfg: ServeConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}"


def check_port_free(cfg: ServeConfig, hint: str = "stop that program, or serve on another port: --port N (or "
                                                    "serve.port in params.yaml)") -> None:
    """IlrError when another program listens on the service's address. Found out late otherwise: Ray Serve's
    proxy fails to bind it only after Ray and the replicas have started (`ilr demo`: after the whole lifecycle),
    and a client waiting for the new service could take that program's answers for its own. Not checked when
    RAY_ADDRESS names a cluster: Serve's proxies bind on its nodes."""
    import errno
    import socket

    if os.environ.get("RAY_ADDRESS"):
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds: a closing port is free
            s.bind((cfg.host, cfg.port))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:  # a host that is not this machine's, a port it may not use
            raise IlrError(f"the service cannot listen on {cfg.host} port {cfg.port}: {e.strerror or e}",
                           where="serve.host / serve.port", hint="serve.host must be an address of this machine "
                           "(127.0.0.1 by default); ports below 1024 need privileges") from None
        st = running()
        if st and st["url"].endswith(f":{cfg.port}"):
            raise IlrError(f"this workspace's service already listens on port {cfg.port} ({st['url']})",
                           where="serve.port", hint="`ilr stop` stops it; or serve on another port: --port N") from None
        raise IlrError(f"port {cfg.port} on {cfg.host} is in use by another program ({e.strerror}): the service "
                       "cannot listen there", where="serve.port", hint=hint) from None


def wait_healthy(url: str, timeout_s: float = 180.0, proc: subprocess.Popen | None = None,
                 need_index: bool = False) -> dict:
    import httpx

    seen = ["no answer"]

    def healthy() -> dict | None:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
        except httpx.HTTPError as e:
            seen[0] = str(e)
            return None
        try:
            body = r.json() if r.status_code == 200 else None
        except ValueError:  # another program's answer (a metrics exporter of the local Ray answers any path)
            body = None
        if isinstance(body, dict) and "status" in body and (not need_index or body["status"] == "ok"):
            return body
        seen[0] = f"HTTP {r.status_code}: {r.text[:200]}"
        return None

    return wait_until(healthy, f"the service at {url}", timeout_s, proc, ilr_home() / "logs" / "serve.log",
                      last=lambda: seen[0])


def start(cfg: ServeConfig | None = None, extra_apps: tuple = ()) -> str:
    """Start Ray (RAY_ADDRESS or local, with its dashboard), the Milvus Lite server (unless MILVUS_URI), and
    the Serve graph plus any extra Serve apps [(app, name, route_prefix)]; returns the base URL."""
    from ray import serve

    from models.cluster import ensure_ray
    from serving.app import build_app, current_env

    cfg = cfg or serve_config()
    check_port_free(cfg)
    milvus_server.ensure()
    ensure_ray(dashboard=True)
    serve.start(proxy_location=cfg.proxy_location,
                http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    env = current_env()
    serve.run(build_app(cfg, env), name=cfg.app_name, route_prefix="/", blocking=False)
    for app, name, prefix in extra_apps:
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
    url = url_of(cfg)
    wait_healthy(url)
    return url


def run_forever(cfg: ServeConfig, extra_apps: tuple = (), log_fn=print) -> None:
    """`ilr serve` in the foreground: serve until SIGINT/SIGTERM, then shut Serve down."""
    from ray import serve

    url = start(cfg, extra_apps)
    state = ilr_home() / STATE
    state.write_text(json.dumps({"pid": os.getpid(), "url": url}))
    log_fn(f"serving on {url} (OpenAPI docs {url}/docs); Ctrl-C or `ilr stop` to stop")
    allow_stop_time(SHUTDOWN_S + 5)  # Ctrl-C: Serve's shutdown gets its time (on a cluster the app outlives us)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if state.exists() and json.loads(state.read_text()).get("pid") == os.getpid():
            state.unlink()
        import threading

        done = threading.Thread(target=serve.shutdown, daemon=True)
        done.start()
        done.join(SHUTDOWN_S)  # Serve's graceful shutdown can retry forever when an actor is already gone
        if done.is_alive():
            log_fn(f"Serve did not finish shutting down within {SHUTDOWN_S} s (a replica's node may be gone); on a "
                   "Ray cluster its apps may still run there: `serve shutdown -y -a <the cluster's dashboard URL>` "
                   "removes them")
            os._exit(0)


def running() -> dict | None:
    path = ilr_home() / STATE
    if not path.exists():
        return None
    st = json.loads(path.read_text())
    try:
        os.kill(st["pid"], 0)
    except ProcessLookupError:
        return None
    return st


def spawn(args: list[str], cfg: ServeConfig, timeout_s: float = 300.0) -> str:
    """Start `ilr serve ARGS` detached (logs in $ILR_HOME/logs/serve.log) and wait until it answers."""
    st = running()
    if st:
        return st["url"]
    check_port_free(cfg)
    milvus_server.ensure()  # owned by no service: index builds keep working while the service restarts
    proc, _ = processes.spawn(["ilr", "serve", *args], "serve.log", {**os.environ, **worker_env()})
    url = url_of(cfg)
    wait_healthy(url, timeout_s, proc)
    return url


def stop(milvus: bool = True) -> list[str]:
    stopped = []
    st = running()
    if st:
        os.kill(st["pid"], signal.SIGTERM)  # graceful: Serve shuts its replicas down
        for _ in range(int((SHUTDOWN_S + 5) / 0.5)):  # its own shutdown first (run_forever)
            try:
                os.kill(st["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:  # Serve's shutdown can hang: end the whole session (the process and the Ray it started)
            try:
                os.killpg(st["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        (ilr_home() / STATE).unlink(missing_ok=True)
        stopped.append(f"service (pid {st['pid']})")
    if milvus and milvus_server.stop():
        stopped.append("Milvus Lite server")
    return stopped

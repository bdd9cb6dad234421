"""The local Prefect server ilr starts (`ilr flows serve`) and the protection of every Prefect server it starts:
a password (this workspace's auth string), CORS limited to its own origin, CSRF protection. And the end of
the temporary servers Prefect starts for flow runs when the process that started one cannot end it."""
from __future__ import annotations

import base64
import os
import secrets
import sys
import tempfile
import uuid
from pathlib import Path

from data.config import ilr_home
from data.errors import IlrError
from data.processes import end_processes, spawn, wait_until

AUTH_FILE = "prefect-auth"   # under $ILR_HOME: the local Prefect server's basic-auth string, mode 0600
TEMPORARY_APP = "prefect.server.api.server:create_app"  # what Prefect's temporary server runs (`uvicorn --factory`)


def prefect_auth_string(create: bool = True) -> str | None:
    """The local Prefect server's basic-auth string ('ilr:<random>') from $ILR_HOME/prefect-auth, generated
    once: random, mode 0600, written atomically (temp file + link/replace). A blank file is regenerated,
    never used. With create=False, None when there is no usable file."""
    path = ilr_home() / AUTH_FILE
    for _ in range(3):
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value, exists = "", False
        else:
            exists = True
        if value:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)   # readable by others: the string is a password
            return value
        if not create:
            return None
        fresh = f"ilr:{secrets.token_urlsafe(32)}"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{AUTH_FILE}.")   # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(fresh + "\n")
                f.flush()
                os.fsync(f.fileno())
            if exists:
                os.replace(tmp, path)       # blank file: replace it
            else:
                try:
                    os.link(tmp, path)      # absent: create it, unless a concurrent run just did
                except FileExistsError:
                    continue                # use theirs
            return fresh
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise IlrError("cannot create the Prefect server's auth string", where=str(path))


def basic_auth_header(auth_string: str) -> dict[str, str]:
    """The Authorization header Prefect's clients and UI send for an auth string (Basic base64(string))."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _pid_hint(port: int) -> str:
    pid_file = ilr_home() / "prefect-server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return f"stop the process listening on port {port} (`lsof -i :{port}` names it)"
    return (f"stop the process listening on port {port}; if it is ilr's, {pid_file} names it: "
            f"kill -- -{pid}")


def _check_ours(api: str, port: int, auth: str) -> bool:
    """False when no Prefect server answers at `api`; True when one answers and it is ours: it refuses
    anonymous calls, accepts this workspace's auth string and has CSRF protection on. Else IlrError."""
    import httpx

    try:
        if httpx.get(f"{api}/health", timeout=2).status_code != 200:
            return False
        anonymous = httpx.get(f"{api}/admin/version", timeout=10)
        authed = httpx.get(f"{api}/csrf-token", params={"client": str(uuid.uuid4())},
                           headers=basic_auth_header(auth), timeout=10)
    except httpx.HTTPError:
        return False
    where = api.removesuffix("/api")
    if anonymous.status_code != 401:
        raise IlrError("a Prefect server without authentication answers there (started by an earlier ilr version, "
                       "or not by ilr): ilr will not use it", where=where,
                       hint=f"{_pid_hint(port)}; then run again and ilr starts a protected server. To use a server of "
                            "your own, set PREFECT_API_URL (and PREFECT_API_AUTH_STRING)")
    if authed.status_code == 401:
        raise IlrError("the Prefect server there refuses this workspace's auth string (it was started for another "
                       f"ILR_HOME, or {ilr_home() / AUTH_FILE} changed since it started)", where=where,
                       hint=f"{_pid_hint(port)}, or run with the ILR_HOME that started it")
    if authed.status_code == 422:
        raise IlrError("the Prefect server there has CSRF protection off: ilr will not use it", where=where,
                       hint=f"{_pid_hint(port)}; then run again and ilr starts a protected server")
    if authed.status_code != 200:
        raise IlrError(f"unexpected answer {authed.status_code} from the Prefect server: {authed.text[:200]}",
                       where=where, hint=_pid_hint(port))
    return True


def _use(api: str, auth: str) -> str:
    """Point this process's Prefect clients (and the child processes it starts) at the server."""
    os.environ.update(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=auth, PREFECT_CLIENT_CSRF_SUPPORT_ENABLED="true")
    ctx = sys.modules.get("prefect.context")
    if ctx is not None and hasattr(ctx, "refresh_global_settings_context"):
        ctx.refresh_global_settings_context()   # prefect was imported before: re-read the settings
    return api


def ensure_prefect_server(port: int = 4200, timeout_s: float = 120.0, log_fn=print) -> str:
    """PREFECT_API_URL when set; else a local `prefect server` (127.0.0.1) started in the background, protected:
    basic auth with the string in $ILR_HOME/prefect-auth, CORS limited to its own origin, CSRF protection on.
    A server already on the port is reused only when it is such a server with this workspace's auth string.
    This process's Prefect clients (and its children, through os.environ) get PREFECT_API_URL and
    PREFECT_API_AUTH_STRING."""
    origin = f"http://127.0.0.1:{port}"
    api = f"{origin}/api"
    if url := os.environ.get("PREFECT_API_URL"):
        # the user's server: left as is; ilr's own local server gets its auth string when none is set
        if (url.rstrip("/") == api and not os.environ.get("PREFECT_API_AUTH_STRING")
                and (auth := prefect_auth_string(create=False))):
            os.environ["PREFECT_API_AUTH_STRING"] = auth
        return url
    auth = prefect_auth_string()
    if _check_ours(api, port, auth):
        return _use(api, auth)
    # PREFECT_SERVER_API_* take precedence over the older spellings (PREFECT_SERVER_CORS_..., _CSRF_...)
    env = {**os.environ}
    env.update(PREFECT_HOME=os.environ.get("PREFECT_HOME", str(ilr_home() / "prefect")),
               PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_API_AUTH_STRING=auth,
               PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=f"{origin},http://localhost:{port}",
               PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED="true",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))  # the UI's API URL
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    proc, log = spawn(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], "prefect-server.log",
                      env)
    (ilr_home() / "prefect-server.pid").write_text(str(proc.pid))
    wait_until(lambda: _check_ours(api, port, auth), "prefect server", timeout_s, proc, log, poll_s=1,
               hint=f"is port {port} taken by another program?")
    log_fn(f"Prefect server (UI) on {origin}: it asks for the password, which is the whole line of "
           f"{ilr_home() / AUTH_FILE}")
    return _use(api, auth)


def protect_local() -> None:
    """Unless PREFECT_API_URL names a server: the temporary server Prefect starts for flow runs (a random
    loopback port) is protected like the one `ilr flows serve` starts — this workspace's password and CSRF
    protection. Called by `ilr` before any command imports Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return
    auth = prefect_auth_string()
    for k, v in (("PREFECT_SERVER_API_AUTH_STRING", auth), ("PREFECT_API_AUTH_STRING", auth),
                 ("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "true"), ("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "true")):
        os.environ.setdefault(k, v)


def _temporary_servers(procs) -> list:
    """Those of `procs` that are temporary Prefect servers of this workspace: uvicorn running Prefect's app
    with PREFECT__SERVER_EPHEMERAL=1 and this workspace's auth string in its environment (protect_local)."""
    import psutil

    auth = prefect_auth_string(create=False)
    found = []
    for p in procs if auth else ():
        try:
            if TEMPORARY_APP in p.cmdline():
                env = p.environ()
                if env.get("PREFECT__SERVER_EPHEMERAL") == "1" and env.get("PREFECT_SERVER_API_AUTH_STRING") == auth:
                    found.append(p)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


def stop_orphaned_temporary_servers() -> int:
    """Stop this workspace's temporary Prefect servers whose process is gone (killed with SIGKILL, or by the
    OOM killer: nothing can run in it to stop them); returns how many. An orphan's parent is init or a
    sub-reaper, never the Python process that started it."""
    import psutil

    def orphaned(p) -> bool:
        try:
            parent = p.parent()
            return parent is None or parent.pid == 1 or "python" not in os.path.basename(parent.exe())
        except psutil.AccessDenied:  # a parent we may not look at is not our Python process
            return True
        except psutil.Error:
            return False

    return end_processes([p for p in _temporary_servers(psutil.process_iter()) if orphaned(p)])

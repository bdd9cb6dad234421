"""The local Prefect server ilr starts (flows.prefect_server.ensure_prefect_server) is protected: basic auth with
the workspace's random string, CORS limited to its own origin, CSRF protection on; ilr's clients get the
auth string; a server that is not such a one is refused, not silently used."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from data.errors import IlrError
from flows import prefect_server as dep

pytestmark = pytest.mark.integration

# what ensure_prefect_server reads or sets in os.environ: saved and restored around every use of it
PREFECT_ENV = ("ILR_HOME", "PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
               "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refresh_prefect_settings() -> None:
    """ensure_prefect_server refreshes Prefect's global settings: refresh them again once the env is restored,
    so that no later test talks to this module's (stopped) server."""
    ctx = sys.modules.get("prefect.context")
    if ctx is not None and hasattr(ctx, "refresh_global_settings_context"):
        ctx.refresh_global_settings_context()


class PrefectEnv:
    def __init__(self):
        self.saved = {k: os.environ.get(k) for k in PREFECT_ENV}

    def enter(self, home: Path) -> None:
        for k in PREFECT_ENV:
            os.environ.pop(k, None)
        os.environ.update(ILR_HOME=str(home), PREFECT_HOME=str(home / "prefect"))

    def restore(self) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_prefect_settings()


def _kill_group(pid: int, timeout_s: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)   # start_new_session: the server's pid is its process group
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)   # started by this process: reap it, or it stays a zombie
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """One protected server for the module, in a throw-away ILR_HOME, on a free port; killed at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = PrefectEnv()
    env.enter(home)

    def stop():
        pid_file = home / "prefect-server.pid"
        if pid_file.exists():
            _kill_group(int(pid_file.read_text()))
        env.restore()

    request.addfinalizer(stop)
    api = dep.ensure_prefect_server(port=port, timeout_s=120, log_fn=lambda *_: None)
    info = {"home": home, "port": port, "api": api, "origin": f"http://127.0.0.1:{port}",
            "auth": (home / "prefect-auth").read_text().strip(), "pid": int((home / "prefect-server.pid").read_text()),
            "client_env": {k: os.environ[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}}
    env.enter(home)   # each test starts from an environment without the client settings
    return info


@pytest.fixture
def clean_env(server):
    """The module's ILR_HOME, no client settings; whatever a test's call sets is undone after it."""
    env = PrefectEnv()
    env.enter(server["home"])
    yield
    env.restore()


def auth(server) -> dict[str, str]:
    return dep.basic_auth_header(server["auth"])


def csrf_headers(server) -> dict[str, str]:
    client = str(uuid.uuid4())
    r = httpx.get(f"{server['api']}/csrf-token", params={"client": client}, headers=auth(server), timeout=10)
    assert r.status_code == 200, r.text
    return {"Prefect-Csrf-Token": r.json()["token"], "Prefect-Csrf-Client": client}


# ------------------------------------------------------------------------------------------ the server


def test_client_settings_and_auth_file(server):
    assert server["api"] == f"{server['origin']}/api"
    assert server["client_env"] == {"PREFECT_API_URL": server["api"], "PREFECT_API_AUTH_STRING": server["auth"]}
    path = server["home"] / "prefect-auth"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert server["auth"].startswith("ilr:") and len(server["auth"]) > 40


def test_refuses_unauthenticated_api_calls(server):
    api = server["api"]
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200   # probes stay open
    for path in ("/admin/version", "/flows/00000000-0000-0000-0000-000000000000", "/csrf-token?client=x"):
        assert httpx.get(api + path, timeout=10).status_code == 401, path
    wrong = dep.basic_auth_header("ilr:not-the-password")
    assert httpx.get(f"{api}/admin/version", headers=wrong, timeout=10).status_code == 401
    # state-changing calls: the CSRF check (outermost) refuses them first (403), auth then (401)
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code in (401, 403)
    bogus = {"Prefect-Csrf-Token": "x", "Prefect-Csrf-Client": "y"}
    assert httpx.post(f"{api}/flows/filter", json={}, headers=bogus, timeout=10).status_code in (401, 403)
    dep_run = f"{api}/deployments/{uuid.uuid4()}/create_flow_run"
    for headers in ({}, bogus, wrong, {**wrong, **bogus}):
        assert httpx.post(dep_run, json={"parameters": {}}, headers=headers, timeout=10).status_code in (401, 403)


def test_accepts_the_auth_string_with_a_csrf_token(server):
    api = server["api"]
    r = httpx.get(f"{api}/admin/version", headers=auth(server), timeout=10)
    assert r.status_code == 200 and r.json()
    # CSRF on: authenticated but without a token is refused; with one it works
    r = httpx.post(f"{api}/flows/filter", json={}, headers=auth(server), timeout=10)
    assert r.status_code == 403 and "CSRF" in r.text
    r = httpx.post(f"{api}/flows/filter", json={}, headers={**auth(server), **csrf_headers(server)}, timeout=10)
    assert r.status_code == 200 and isinstance(r.json(), list)


def test_cors_only_for_its_own_origin(server):
    url = f"{server['api']}/flows/filter"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    evil = httpx.request("OPTIONS", url, headers={"Origin": "http://evil.example", **preflight}, timeout=10)
    assert evil.headers.get("access-control-allow-origin") is None
    assert evil.status_code >= 400
    r = httpx.get(f"{server['api']}/admin/version", headers={"Origin": "http://evil.example", **auth(server)},
                  timeout=10)
    assert r.headers.get("access-control-allow-origin") is None
    own = httpx.request("OPTIONS", url, headers={"Origin": server["origin"], **preflight}, timeout=10)
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == server["origin"]


def test_ui_asks_for_the_password(server):
    ui = httpx.get(f"{server['origin']}/ui-settings", timeout=10).json()
    assert ui["auth"] == "BASIC" and ui["csrf_enabled"] is True and ui["api_url"] == server["api"]


def test_a_flow_runs_with_the_client_settings(server):
    """A child process with the driver's settings (as `prefect.serve`'s runs and ilr's children get them)."""
    code = textwrap.dedent("""
        from prefect import flow, task
        from prefect.client.orchestration import get_client

        @task
        def add(a, b):
            return a + b

        @flow(name="ilr-security-check")
        def check(x: int) -> int:
            return add(x, 1)

        assert check(41) == 42
        with get_client(sync_client=True) as c:
            runs = c.read_flow_runs()
        assert any(r.name and r.state.is_completed() for r in runs), runs
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(server["client_env"], PREFECT_HOME=str(server["home"] / "client"), PREFECT_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    # without the auth string the same client is refused
    env.pop("PREFECT_API_AUTH_STRING")
    anonymous = ("from prefect.client.orchestration import get_client\n"
                 "with get_client(sync_client=True) as c: c.read_flows()")
    out = subprocess.run([sys.executable, "-c", anonymous], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode != 0 and "401" in out.stderr


def test_reuses_its_own_server(server, clean_env):
    api = dep.ensure_prefect_server(port=server["port"], timeout_s=5, log_fn=lambda *_: None)
    assert api == server["api"]
    assert int((server["home"] / "prefect-server.pid").read_text()) == server["pid"]   # nothing new started
    assert os.environ["PREFECT_API_AUTH_STRING"] == server["auth"]


def test_a_users_api_url_is_left_as_is(server, clean_env):
    os.environ["PREFECT_API_URL"] = "http://prefect.example:4200/api"
    assert dep.ensure_prefect_server(port=server["port"]) == "http://prefect.example:4200/api"
    assert "PREFECT_API_AUTH_STRING" not in os.environ
    # ilr's own local server named by hand: its auth string is filled in
    os.environ["PREFECT_API_URL"] = server["api"]
    assert dep.ensure_prefect_server(port=server["port"]) == server["api"]
    assert os.environ["PREFECT_API_AUTH_STRING"] == server["auth"]


def test_another_workspace_or_a_blank_auth_file_is_refused(server, clean_env, tmp_path):
    """A blank prefect-auth is regenerated, never used: the running server then refuses the new string."""
    other = tmp_path / "home"
    other.mkdir()
    (other / "prefect-auth").write_text(" \n")
    os.environ["ILR_HOME"] = str(other)
    with pytest.raises(IlrError, match="refuses this workspace's auth string"):
        dep.ensure_prefect_server(port=server["port"], timeout_s=5, log_fn=lambda *_: None)
    fresh = (other / "prefect-auth").read_text().strip()
    assert fresh.startswith("ilr:") and fresh != server["auth"]
    assert "PREFECT_API_URL" not in os.environ and "PREFECT_API_AUTH_STRING" not in os.environ


# ------------------------------------------------------------------- servers that are not ours (no Prefect)


class _FakePrefect(BaseHTTPRequestHandler):
    """Health 200; /admin/version open (an old unprotected server) or 401; /csrf-token 200 or 422."""
    anonymous_ok = True
    csrf_status = 200

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/api/health":
            code, body = 200, True
        elif path == "/api/admin/version":
            ok = self.anonymous_ok or self.headers.get("Authorization")
            code, body = (200, "3.9.1") if ok else (401, {"exception_message": "Unauthorized"})
        elif path == "/api/csrf-token":
            code, body = self.csrf_status, {"token": "t", "client": "c", "expiration": "2100-01-01T00:00:00Z"}
        else:
            code, body = 404, {}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(tmp_path):
    env = PrefectEnv()
    env.enter(tmp_path / "home")
    (tmp_path / "home").mkdir()

    def start(**attrs):
        handler = type("Handler", (_FakePrefect,), attrs)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return httpd.server_address[1]

    servers: list = []
    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()
    env.restore()


def test_an_unprotected_server_on_the_port_is_refused(fake_server):
    port = fake_server(anonymous_ok=True)
    with pytest.raises(IlrError, match="without authentication") as e:
        dep.ensure_prefect_server(port=port, timeout_s=5, log_fn=lambda *_: None)
    assert "stop" in e.value.hint and str(port) in e.value.hint and "PREFECT_API_URL" in e.value.hint
    assert "PREFECT_API_URL" not in os.environ


def test_a_server_without_csrf_protection_is_refused(fake_server):
    port = fake_server(anonymous_ok=False, csrf_status=422)
    with pytest.raises(IlrError, match="CSRF protection off"):
        dep.ensure_prefect_server(port=port, timeout_s=5, log_fn=lambda *_: None)


# ----------------------------------------------------------------------------------- the auth file alone


def test_auth_string_generated_once_private_and_blank_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("ILR_HOME", str(tmp_path))
    path = tmp_path / "prefect-auth"
    assert dep.prefect_auth_string(create=False) is None and not path.exists()
    first = dep.prefect_auth_string()
    assert first.startswith("ilr:") and len(first) > 40 and path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dep.prefect_auth_string() == first                       # generated once
    for blank in ("", "  \n", "\n\n"):
        path.write_text(blank)
        assert dep.prefect_auth_string(create=False) is None        # never used
        fresh = dep.prefect_auth_string()
        assert fresh.strip() and fresh != first and path.read_text().strip() == fresh
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        first = fresh
    os.chmod(path, 0o644)
    assert dep.prefect_auth_string() == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["prefect-auth"]  # no temp files left behind

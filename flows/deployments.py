"""`ilr flows serve`: the lifecycle flows as Prefect deployments with their schedules and event triggers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from data.config import ilr_home
from data.errors import IlrError


def ensure_prefect_server(port: int = 4200, timeout_s: float = 120.0, log_fn=print) -> str:
    """PREFECT_API_URL when set; else a local `prefect server` (127.0.0.1) started in the background."""
    import httpx

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    api = f"http://127.0.0.1:{port}/api"
    try:
        if httpx.get(f"{api}/health", timeout=2).status_code == 200:
            os.environ["PREFECT_API_URL"] = api
            return api
    except httpx.HTTPError:
        pass
    (ilr_home() / "logs").mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("prefect")
    log = open(ilr_home() / "logs" / "prefect-server.log", "ab")
    proc = subprocess.Popen([str(exe) if exe.exists() else "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PREFECT_HOME": os.environ.get(
                                "PREFECT_HOME", str(ilr_home() / "prefect"))})
    (ilr_home() / "prefect-server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise IlrError(f"prefect server exited with code {proc.returncode}", where=str(ilr_home() / "logs" / "prefect-server.log"))
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                os.environ["PREFECT_API_URL"] = api
                log_fn(f"Prefect server (UI) on http://127.0.0.1:{port}")
                return api
        except httpx.HTTPError:
            time.sleep(1)
    raise IlrError(f"prefect server did not answer within {timeout_s:.0f} s")


def deployments(monitor_every_s: int = 600, retrain_cron: str = "0 3 * * 0") -> list:
    from prefect.events import DeploymentEventTrigger

    from flows import lifecycle as lc

    on = lambda event: DeploymentEventTrigger(  # noqa: E731
        expect={event}, parameters={"dataset": "{{ event.payload.dataset }}", "reason": "{{ event.payload.reason }}"})
    return [
        lc.retrain.to_deployment(name="ilr-retrain", cron=retrain_cron,
                                 triggers=[on("ilr.dataset.versioned"), on("ilr.quality.dropped")]),
        lc.monitor.to_deployment(name="ilr-monitor", interval=monitor_every_s),
        lc.ingest_dataset.to_deployment(name="ilr-ingest"),
        lc.train_and_register.to_deployment(name="ilr-train-and-register"),
        lc.build_and_swap_index.to_deployment(name="ilr-build-and-swap-index"),
        lc.deploy.to_deployment(name="ilr-deploy"),
    ]


def serve_deployments(monitor_every_s: int, retrain_cron: str, log_fn=print) -> None:
    api = ensure_prefect_server(log_fn=log_fn)
    from prefect import serve

    deps = deployments(monitor_every_s, retrain_cron)
    log_fn(f"serving {len(deps)} deployments on {api}: retrain (cron '{retrain_cron}', triggers "
           f"ilr.dataset.versioned, ilr.quality.dropped), monitor (every {monitor_every_s}s), ingest, "
           "train-and-register, build-and-swap-index, deploy. Ctrl-C to stop.")
    serve(*deps)

"""`ilr flows serve`: the lifecycle flows as Prefect deployments with their schedules and event triggers."""
from __future__ import annotations

from flows.prefect_server import ensure_prefect_server


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

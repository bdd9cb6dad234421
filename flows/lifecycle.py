"""Prefect 3 flows of the model lifecycle.

ingest_dataset -> (new version) -> retrain = train_and_register (tune -> challenger -> gate -> promote)
-> build_and_swap_index -> deploy; monitor (canary, drift, ANN recall) -> (quality drop) -> retrain.

Triggers: a flow that sees a new dataset version or a quality drop emits a Prefect event
(`ilr.dataset.versioned`, `ilr.quality.dropped`) and records it; when `ilr flows serve` has registered the
`retrain` deployment (whose event triggers and schedule then start it), the event is all it takes;
otherwise retrain runs right away as a subflow. Every flow run leaves a markdown artifact naming its
MLflow runs and dataset versions, and MLflow runs get the Prefect flow-run id as a tag.
"""
from __future__ import annotations

import os

from data.config import ilr_home_path, worker_env
from data.errors import IlrError

# Prefect reads its settings when it is imported: these defaults must be in place first (nothing is created
# here; the workspace's password for the local servers is set by `ilr`, flows.prefect_server.protect_local)
os.environ.setdefault("PREFECT_HOME", str(ilr_home_path() / "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

RETRAIN_DEPLOYMENT = "retrain/ilr-retrain"


def _retry_unless_interrupted(task, task_run, state) -> bool:
    """Retry a failed task, unless it failed because the process is being stopped (Ctrl-C, SIGTERM)."""
    from data.processes import interrupt_behind

    try:
        state.result()
    except BaseException as e:
        return interrupt_behind(e) is None
    return True


def _log():
    try:
        return get_run_logger().warning  # WARNING: visible at the default logging level
    except Exception:
        return print


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _tag_mlflow(run_ids: list[str]) -> None:
    from mlflow import MlflowClient

    from models import tracking

    tracking.setup("ilr-delg")
    c = MlflowClient()
    for rid in filter(None, run_ids):
        c.set_tag(rid, "prefect.flow_run_id", _flow_run_id())


def _artifact(key: str, lines: list[str]) -> None:
    create_markdown_artifact(markdown="\n".join(f"- {x}" for x in lines), key=key)


# ---------------------------------------------------------------------------------------------- tasks

@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_interrupted)
def ingest_task(fmt: str, source: str, name: str, seed: int | None = None) -> dict:
    from data.config import data_config
    from data.versioning import ingest

    opts = {"seed": seed} if seed is not None else {}
    version, report = ingest(fmt, source, name, data_config(), log=_log(), **opts)
    return {"ref": version.ref, "unchanged": version.unchanged, "dvc_md5": version.dvc_md5,
            "git_rev": version.git_rev, "docs": str(report.docs_path)}


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_interrupted)
def tune_task(dataset: str, trials: int | None, steps: int | None) -> dict:
    from models.tune import tune_config, tune_delg

    res = tune_delg(dataset, tune_config(**{k: v for k, v in {"trials": trials, "steps": steps}.items() if v}),
                    log_fn=_log())
    return {"challenger": res.model_version, "run_id": res.parent_run_id, "best": res.best_metrics,
            "trials": res.trials, "stopped_early": res.stopped_early}


@task
def ensure_champion_task() -> str:
    from models import registry

    return registry.ensure_champion(log_fn=_log())


@task
def gate_task(dataset: str) -> dict:
    from models.gate import gate

    d = gate(dataset, log_fn=_log())
    record_gate(d)
    return {"promoted": d.promoted, "challenger": d.challenger, "champion": d.champion, "reason": d.reason,
            "challenger_score": d.challenger_score, "champion_score": d.champion_score, "run_id": d.run_id}


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_interrupted)
def index_task(dataset: str, model: str | None, engine: str | None) -> dict:
    from models.config import extract_config
    from serving import milvus_server
    from serving.index import build, index_config

    milvus_server.ensure()  # shared with the service (Milvus Lite in-process would lock the data dir)
    res = build(dataset, model, index_config(), extract_config(), log_fn=_log(), engine=engine)
    from monitoring.store import record_swap

    record_swap(res.collection, res.model, dataset, res.alias_moved)
    return {"collection": res.collection, "recall": res.recall, "alias_moved": res.alias_moved, "model": res.model,
            "images": res.total, "seconds": res.seconds}


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_interrupted)
def deploy_task(port: int | None, start: bool = True) -> dict:
    from serving import service
    from serving.config import serve_config

    cfg = serve_config(**({"port": port} if port else {}))
    st = service.running()
    if st is None and not start:
        return {"url": None, "status": "not running"}
    url = st["url"] if st else service.spawn(["--port", str(cfg.port)], cfg)  # a running one follows the alias
    return service.wait_healthy(url, need_index=True) | {"url": url}


@task
def monitor_task(url: str | None) -> dict:
    from monitoring import monitor
    from serving.client import Client, is_configured

    client = Client(url)
    if not is_configured(client.url):  # the canary sends the dataset's images and the API token
        raise IlrError(f"monitor: {client.url} is not this workspace's service",
                       hint="set ILR_URL (or serve.host/port in params.yaml) to monitor a service elsewhere")
    return monitor.summary(monitor.run(client))


def record_gate(d) -> None:
    """The decision's scores per dataset (target and golden suites) into the monitoring store, for the
    dashboard's quality-per-suite plot: the champion after the decision, and the challenger's score."""
    from monitoring.store import MonitorStore

    if not d.suites:
        return
    store = MonitorStore()
    try:
        for dataset, s in d.suites.items():
            won = d.promoted or s["champion"] is None
            store.add("gate", dataset=dataset, champion=d.challenger if won else d.champion,
                      served=s["challenger"] if won else s["champion"],
                      global_map=s["challenger_global"] if won else s["champion_global"], challenger=d.challenger,
                      challenger_served=s["challenger"], decision="promoted" if d.promoted else "rejected")
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- triggers

def _retrain_deployment_exists() -> bool:
    if not os.environ.get("PREFECT_API_URL"):
        return False  # the temporary local server has no deployments
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as c:
            c.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        return True
    except Exception:
        return False


def fire_retrain(event: str, reason: str, dataset: str, mode: str = "background", trials: int | None = None,
                 steps: int | None = None) -> dict:
    """Record and emit the trigger, then start retrain: nothing more when a served Prefect deployment picks
    the event up (it tunes with its own settings); else in a detached `ilr retrain` process ("background", so
    the flow that saw the trigger is not blocked for the whole retraining), as a subflow ("inline"), or not
    at all ("record"). trials/steps: the search's size (default: params.yaml tune)."""
    from prefect.events import emit_event

    from monitoring.store import record_event

    record_event(event, reason, dataset=dataset, flow_run=_flow_run_id())
    emit_event(event=event, resource={"prefect.resource.id": f"ilr.dataset.{dataset.split('@')[0]}"},
               payload={"reason": reason, "dataset": dataset})
    _log()(f"retrain trigger: {event}: {reason}")
    if mode == "record":
        return {"fired": event, "how": "recorded only"}
    if _retrain_deployment_exists():
        return {"fired": event, "how": f"event picked up by deployment {RETRAIN_DEPLOYMENT}"}
    if mode == "inline":
        return {"fired": event, "how": "subflow",
                "retrain": retrain(dataset, reason=reason, trials=trials, steps=steps)}
    return {"fired": event, **spawn_retrain(dataset, reason, trials, steps)}


def spawn_retrain(dataset: str, reason: str, trials: int | None = None, steps: int | None = None) -> dict:
    import shlex
    import time

    from data.processes import record_background, spawn

    size = [arg for opt, n in (("--trials", trials), ("--steps", steps)) if n for arg in (opt, str(n))]
    proc, log = spawn(["ilr", "retrain", "--dataset", dataset, "--reason", reason, "--no-record", *size],
                      f"retrain-{time.strftime('%Y%m%d-%H%M%S')}.log", {**os.environ, **worker_env()})
    # `ilr stop` stops it; the same search resumes when this command runs again
    record_background("retrain", proc, dataset=dataset, log=str(log),
                      resume=shlex.join(["ilr", "retrain", "--dataset", dataset, *size]))
    return {"how": f"background process {proc.pid}", "pid": proc.pid, "log": str(log)}


class RetrainRunning(Exception):
    pass


def retrain_lock(wait: bool = True):
    """One retrain at a time per workspace, whoever starts it (the CLI, a trigger's background process, the
    Prefect deployment): a second one waits for the first (wait=False: RetrainRunning instead)."""
    import contextlib

    from data.locks import LockBusy, workspace_lock

    @contextlib.contextmanager
    def held():
        try:
            with workspace_lock("retrain", wait, on_wait=lambda: _log()(
                    "another retrain is running in this workspace: waiting for it to finish")):
                yield
        except LockBusy:
            raise RetrainRunning("a retrain is already running in this workspace") from None
    return held()


# ---------------------------------------------------------------------------------------------- flows

@flow(name="ingest_dataset", log_prints=True)
def ingest_dataset(fmt: str, source: str, name: str, seed: int | None = None, trigger: bool = True,
                   trigger_mode: str = "background", trials: int | None = None, steps: int | None = None) -> dict:
    """Read -> validate (GX) -> version (DVC); a new version fires the retrain trigger (its search sized by
    trials/steps, default: params.yaml tune)."""
    v = ingest_task(fmt, source, name, seed)
    _artifact("ingest", [f"dataset {v['ref']} (dvc {v['dvc_md5']}, git {v['git_rev'][:10]})",
                         f"unchanged: {v['unchanged']}", f"Data Docs: {v['docs']}"])
    if trigger and not v["unchanged"] and not v["ref"].endswith("@v1"):
        v["trigger"] = fire_retrain("ilr.dataset.versioned", f"new dataset version {v['ref']}", v["ref"], trigger_mode,
                                    trials, steps)
    return v


@flow(name="train_and_register", log_prints=True)
def train_and_register(dataset: str, trials: int | None = None, steps: int | None = None) -> dict:
    """Tune (Ray Tune, best trial -> challenger) -> gate against the champion -> promote if better."""
    ensure_champion_task()
    t = tune_task(dataset, trials, steps)
    g = gate_task(dataset)
    _tag_mlflow([t["run_id"], g["run_id"]])
    _artifact("train-and-register", [f"dataset {dataset}", f"tune MLflow run {t['run_id']} ({t['trials']} trials, "
                                     f"{t['stopped_early']} stopped early), challenger v{t['challenger']}",
                                     f"gate MLflow run {g['run_id']}: {'promoted' if g['promoted'] else 'rejected'} "
                                     f"— {g['reason']}"])
    return {"tune": t, "gate": g}


@flow(name="build_and_swap_index", log_prints=True)
def build_and_swap_index(dataset: str, model: str | None = None, engine: str | None = None) -> dict:
    """Index the dataset with the champion; the live alias moves after the ANN-recall check."""
    r = index_task(dataset, model, engine)
    _artifact("index", [f"dataset {dataset}", f"model {r['model']}", f"collection {r['collection']}",
                        f"ANN recall {r['recall']:.4f}; alias moved: {r['alias_moved']}"])
    return r


@flow(name="deploy", log_prints=True)
def deploy(port: int | None = None, start: bool = True) -> dict:
    """Start the service in the background (unless start=False), or check that the running one serves the
    live index."""
    return deploy_task(port, start)


@flow(name="monitor", log_prints=True)
def monitor(url: str | None = None, trigger: bool = True, trigger_mode: str = "background") -> dict:
    """Canary + drift + ANN recall on the live service; a quality drop fires the retrain trigger."""
    s = monitor_task(url)
    _artifact("monitor", [f"model {s['model']}, index {s['index']}, dataset {s['dataset']}",
                          f"mAP@k {s['map_at_k']:.4f}, recall@k {s['recall_at_k']:.4f}, top-1 {s['top1']:.3f}",
                          f"latency p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; ANN recall {s['ann_recall']:.3f}",
                          f"drift MMD^2 {s['drift']['mmd']:.4f}", f"quality drop: {s['quality_drop']} {s['reason']}"])
    if trigger and s["new_drop"]:  # once per drop, not on every pass while quality stays low
        s["trigger"] = fire_retrain("ilr.quality.dropped", s["reason"], s["dataset"], trigger_mode)
    return s


@flow(name="retrain", log_prints=True)
def retrain(dataset: str | None = None, reason: str = "manual", trials: int | None = None,
            steps: int | None = None, engine: str | None = None) -> dict:
    """train_and_register on the dataset (default: latest version of pipeline.dataset); if a new champion
    was promoted, or the live index is not the champion's, rebuild the index and swap; refresh serving.
    One retrain at a time per workspace: a second one (two triggers at once) waits for the first."""
    from data.versioning import dataset_dir

    from flows.config import pipeline_config

    with retrain_lock():
        return _retrain(dataset_dir(pipeline_config(dataset=dataset).dataset)[0].ref, reason, trials, steps, engine)


def _retrain(dataset: str, reason: str, trials: int | None, steps: int | None, engine: str | None) -> dict:
    from models import registry
    from serving import store as sindex
    from serving import service

    _log()(f"retrain {dataset}: {reason}")
    tr = train_and_register(dataset, trials, steps)
    live = sindex.live()
    champion = registry.alias_version("champion")
    want = registry.ref(champion) if champion else "off-the-shelf"
    out = {"reason": reason, "dataset": dataset, **tr}
    if tr["gate"]["promoted"] or live is None or live.get("model") != want or live.get("dataset") != dataset:
        out["index"] = build_and_swap_index(dataset, engine=engine)
    if service.running():  # refresh only: a retrain never starts a service someone stopped
        out["deploy"] = deploy(start=False)
    return out

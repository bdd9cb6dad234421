"""The `ilr` command line. Every command is a thin shell over an importable function."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from data.config import DataConfig, data_config, ilr_home, pin_workspace
from data.errors import IlrError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ilr: instance-level recognition platform")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate, ingest, validate, version.")
app.add_typer(data_app, name="data")
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)


def _fail(e: IlrError) -> None:
    err.print(f"[bold red]error:[/] {e.message}", soft_wrap=True)
    raise typer.Exit(2)


def _write_metrics(path: Optional[Path], metrics: dict) -> None:
    if path:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")


def _data_cfg(**overrides) -> DataConfig:
    return data_config(**overrides)


_interrupted = False
_GRACE_S = 10.0


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C: stop the command (KeyboardInterrupt), and make sure it ends. The terminal's Ctrl-C also
    stops the temporary Prefect server and the local Ray this process started; a flow that then reports
    its crash to the gone server would retry for minutes, so after a grace period the process exits."""
    global _interrupted
    if not _interrupted:
        import threading
        import time

        def deadline() -> None:
            time.sleep(_GRACE_S)
            _hard_exit()

        threading.Thread(target=deadline, daemon=True).start()
    _interrupted = True
    raise KeyboardInterrupt


def _hard_exit() -> None:
    err.print("interrupted: nothing finished is lost; run the same command again to go on from there")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


@app.callback()
def _workspace() -> None:
    """Resolve the workspace once, here in the driver (absolute repo, home, params file, stores): every
    worker and background process this command starts gets these values. A bad params file stops here."""
    import signal
    import threading

    from flows.config import check_params

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)  # Ctrl-C: see main()
    try:
        pin_workspace()
        check_params()
    except IlrError as e:
        _fail(e)


@data_app.command("generate")
def data_generate(size: str = typer.Option("tiny", help="tiny | small | medium"),
                  out: Path = typer.Option(..., help="output folder"),
                  seed: int = typer.Option(0)):
    """Generate the embedded synthetic multi-domain dataset into a folder (no versioning)."""
    from data import synthetic

    t0 = time.perf_counter()
    df = synthetic.generate(out, size, seed=seed, workers=2)
    console.print(f"generated synthetic-{size} (seed {seed}): {len(df)} images in {time.perf_counter() - t0:.1f}s "
                  f"-> {out}")


@data_app.command("ingest")
def data_ingest(source: str = typer.Argument(..., help="dataset folder (or, for synthetic, a size: tiny|small|medium)"),
                fmt: str = typer.Option(..., "--format", help="gldv2 | roxford | folder | met | sop | synthetic"),
                name: str = typer.Option(..., help="dataset name, e.g. synthetic-small"),
                domain: Optional[str] = typer.Option(None, help="folder format: landmark|artwork|product|other"),
                queries: Optional[Path] = typer.Option(None, help="folder format: file listing query images"),
                seed: int = typer.Option(0, help="synthetic: generator seed"),
                gnd: Optional[str] = typer.Option(None, help="roxford: which gnd_<NAME>.pkl, when the folder has several"),
                mini: bool = typer.Option(False, help="met: the mini database (mini_MET_database.json)"),
                link: bool = typer.Option(False, help="hard-link images into the store instead of copying")):
    """Read, validate (Great Expectations) and version (DVC) a dataset; prints NAME@VERSION."""
    from data.versioning import ingest

    opts = {k: v for k, v in {"domain": domain, "queries": queries, "seed": seed, "gnd": gnd,
                              "mini": mini or None}.items() if v is not None}
    try:
        t0 = time.perf_counter()
        version, report = ingest(fmt, source, name, _data_cfg(link=link or None), log=console.print, **opts)
    except IlrError as e:
        _fail(e)
    dup = report.summary.get("near_duplicates", {})
    console.print(f"validated: {sum(v for k, v in version.counts.items() if k.startswith('split/'))} images, "
                  f"{dup.get('query_vs_index', 0)} query/index near-duplicates; Data Docs: {report.docs_path}")
    state = "unchanged, already" if version.unchanged else "new version"
    console.print(f"{state} [bold]{version.ref}[/] (git {version.git_rev[:10]}, dvc {version.dvc_md5}) "
                  f"in {time.perf_counter() - t0:.1f}s")


@data_app.command("versions")
def data_versions(name: str):
    """List the versions of a dataset: git rev, DVC hash, counts per split and domain."""
    from data.versioning import versions

    try:
        found = versions(name)
    except IlrError as e:
        _fail(e)
    if not found:
        err.print(f"no versions of {name!r}")
        raise typer.Exit(1)
    t = Table(title=f"dataset {name}")
    for col in ("version", "git rev", "dvc md5", "created", "splits", "domains"):
        t.add_column(col)
    for v in found:
        splits = " ".join(f"{k[6:]}={n}" for k, n in v.counts.items() if k.startswith("split/"))
        domains = " ".join(f"{k[7:]}={n}" for k, n in v.counts.items() if k.startswith("domain/"))
        t.add_row(v.version, v.git_rev[:10], v.dvc_md5, v.created[:19], splits, domains)
    console.print(t)


@data_app.command("checkout")
def data_checkout(ref: str = typer.Argument(..., help="NAME@VERSION (vN, a git rev, or latest)")):
    """Restore a dataset version into the store."""
    from data.versioning import checkout

    try:
        v, folder = checkout(ref)
    except IlrError as e:
        _fail(e)
    console.print(f"checked out {v.ref} (git {v.git_rev[:10]}, dvc {v.dvc_md5}) -> {folder}")


@data_app.command("validate")
def data_validate(folder: Path = typer.Argument(..., help="a dataset folder with manifest.parquet"),
                  report: Optional[Path] = typer.Option(None, help="write a JSON report here")):
    """Validate a dataset folder with the Great Expectations suite (no versioning)."""
    from data import manifest
    from data.validate import validate

    try:
        df = manifest.read(folder)
        r = validate(df, folder, manifest.read_info(folder).get("name", folder.name), _data_cfg(),
                     report_path=report)
    except IlrError as e:
        _fail(e)
    console.print(f"valid: {len(df)} images; Data Docs: {r.docs_path}")


@app.command("train")
def train_cmd(dataset: str = typer.Option(..., help="NAME[@VERSION]"),
              steps: Optional[int] = typer.Option(None, help="training steps (default: params.yaml train.steps)"),
              batch_size: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
              image_size: Optional[int] = typer.Option(None), backbone: Optional[str] = typer.Option(None),
              device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
              register: bool = typer.Option(False, "--register", help="register the model as `challenger`"),
              metrics_file: Optional[Path] = typer.Option(None, help="write final metrics as JSON (DVC metrics)")):
    """Train DELG on a dataset version; logs to MLflow and prints the run id and model folder."""
    from models.config import model_config, train_config
    from models.train import train

    try:
        res = train(dataset, model_config(backbone=backbone),
                    train_config(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, device=device),
                    log_fn=console.print)
    except IlrError as e:
        _fail(e)
    console.print(f"trained on {res.dataset.ref}: {res.steps} steps, " +
                  " ".join(f"{k} {v:.4f}" for k, v in res.metrics.items()))
    console.print(f"mlflow run {res.run_id}; model {res.model_uri} ({res.model_dir})")
    version = None
    if register:
        from models import registry, tracking

        version = registry.register(res.model_uri, {
            "dataset": res.dataset.name, "dataset.version": res.dataset.version,
            "dataset.dvc_md5": res.dataset.dvc_md5, "git_sha": tracking.git_sha(), "train_run_id": res.run_id,
            "kind": "trained", **{k: f"{v:.4f}" for k, v in res.metrics.items()}})
        console.print(f"registered {registry.model_name()} v{version} as challenger")
    _write_metrics(metrics_file, {**res.metrics, "steps": res.steps, "run_id": res.run_id,
                                  "model_version": version, "dataset": res.dataset.ref})


@app.command("evaluate")
def evaluate_cmd(dataset: str = typer.Option(..., help="NAME[@VERSION]"),
                 model: Optional[str] = typer.Option(None, help="model URI or folder; default: champion, else "
                                                                 "the off-the-shelf ImageNet model"),
                 rerank: bool = typer.Option(True, "--rerank/--no-rerank", help="local-feature re-ranking"),
                 max_side: Optional[int] = typer.Option(None, help="longest image side (px)"),
                 device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
                 metrics_file: Optional[Path] = typer.Option(None, help="write the summary as JSON (DVC metrics)")):
    """Evaluate a model on a dataset with its protocol; prints per-protocol metrics and `mAP <value>`."""
    from models.config import extract_config, rerank_config
    from models.evaluate import evaluate

    try:
        ev = evaluate(dataset, model, rerank, extract_config(max_side_px=max_side, device=device), rerank_config(),
                      log_fn=console.print)
    except IlrError as e:
        _fail(e)
    s = ev.summary
    console.print(f"protocol {s['protocol']}: {s['queries']} queries, {s['index']} index images")
    for key in sorted(k for k in s if isinstance(s[k], (int, float)) and k not in ("map", "queries", "index")):
        console.print(f"{key:28s} {s[key]:.4f}" if isinstance(s[key], float) else f"{key:28s} {s[key]}")
    console.print(f"model: {s['model']}; per-query CSV: {ev.csv_path}; mlflow run {ev.run_id}")
    _write_metrics(metrics_file, {k: v for k, v in s.items() if isinstance(v, (int, float, str))})
    for key, title in (("recall_at_1", "Recall@1"), ("gap", "GAP"), ("met_gap", "GAP")):  # the format's own headline
        if key in s:
            console.print(f"{title} {s[key]:.4f}")
    console.print(f"mAP {s['map']:.4f}")


model_app = typer.Typer(no_args_is_help=True, help="The model registry: list, gate, promote, rollback.")
app.add_typer(model_app, name="model")


@app.command("tune")
def tune_cmd(dataset: str = typer.Option(..., help="NAME[@VERSION]"),
             trials: Optional[int] = typer.Option(None, help="number of trials (default: params.yaml tune.trials)"),
             steps: Optional[int] = typer.Option(None, help="training steps per trial"),
             cpus_per_trial: Optional[float] = typer.Option(None), gpus_per_trial: Optional[float] = typer.Option(None),
             register: bool = typer.Option(True, "--register/--no-register", help="register the best as challenger"),
             fresh: bool = typer.Option(False, help="start over instead of resuming an interrupted search")):
    """Ray Tune search (ASHA) over DELG hyper-parameters; registers the best model as `challenger`."""
    from models.tune import tune_config, tune_delg

    try:
        res = tune_delg(dataset, tune_config(trials=trials, steps=steps, cpus_per_trial=cpus_per_trial,
                                             gpus_per_trial=gpus_per_trial), register=register, resume=not fresh,
                        log_fn=console.print)
    except IlrError as e:
        _fail(e)
    console.print(f"tune run {res.parent_run_id}: {res.trials} trials, {res.stopped_early} stopped early; "
                  f"best val_map {res.best_metrics['val_map']:.4f}; challenger v{res.model_version}")


@model_app.command("list")
def model_list():
    """Registered versions with their aliases, key metrics and data version."""
    from models.registry import model_name, versions

    rows = versions()
    if not rows:
        err.print(f"no registered versions of {model_name()}")
        raise typer.Exit(1)
    suites = sorted({s for r in rows for s in r["suites"]})
    t = Table(title=f"registered model {model_name()} (served mAP per dataset the gate measured)")
    for col in ("version", "aliases", "eval map", "global", "rerank", *suites, "dataset", "dvc md5", "kind", "gate",
                "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["version"], r["aliases"], r["eval.map"], r["eval.global_map"], r["eval.rerank_map"],
                  *(r["suites"].get(s, "") for s in suites), r["dataset"], r["dataset_dvc_md5"][:12], r["kind"],
                  r["gate"], r["created"])
    console.print(t)


@model_app.command("gate")
def model_gate(dataset: str = typer.Option(..., help="gating dataset NAME[@VERSION]"),
               margin: Optional[float] = typer.Option(None, help="required improvement (default: params.yaml "
                                                                  "gate.margin)"),
               suites: Optional[list[str]] = typer.Option(None, "--suite", help="golden suite dataset (repeat; "
                                                                                "default: params.yaml gate.suites)")):
    """Challenger vs champion on the target dataset (a win beyond the noise of its queries) and on every golden
    suite (no regression beyond gate.max_regression), with the served settings; promote only if it passes."""
    from models.config import gate_config
    from models.gate import gate

    try:
        d = gate(dataset, gate_config(margin=margin, suites=suites or None), log_fn=console.print)
    except IlrError as e:
        _fail(e)
    from flows.lifecycle import record_gate

    record_gate(d)
    console.print(f"{'PROMOTED' if d.promoted else 'REFUSED'} v{d.challenger}: {d.reason}; mlflow run {d.run_id}")


@model_app.command("promote")
def model_promote(version: str):
    """Make VERSION the champion (the current champion becomes `previous`)."""
    from models.registry import promote

    try:
        r = promote(version, "manual promotion (ilr model promote)")
    except IlrError as e:
        _fail(e)
    except Exception as e:  # unknown version from MLflow
        _fail(IlrError(f"cannot promote version {version}: {e}"))
    console.print(f"champion v{r['champion']} (previous v{r['previous']})")


@model_app.command("rollback")
def model_rollback():
    """Give `champion` back to the previous champion."""
    from models.registry import rollback

    try:
        r = rollback()
    except IlrError as e:
        _fail(e)
    console.print(f"rolled back: champion v{r['champion']} (previous v{r['previous']})")


index_app = typer.Typer(no_args_is_help=True, help="The retrieval index (Milvus + local-feature store).")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(dataset: str = typer.Option(..., help="NAME[@VERSION]"),
                model: Optional[str] = typer.Option(None, help="model URI; default: champion, else off-the-shelf"),
                engine: Optional[str] = typer.Option(
                    None, help="auto (default, index.engine: Ray Data on a Ray cluster or with GPUs, else "
                               "in-process) | ray (Ray Data map_batches, GPU actors when present) | local")):
    """Extract the index images into a Milvus collection per (model, dataset) version; move `ilr_live`
    to it after an ANN-recall check. Resumable."""
    from rich.progress import Progress

    from models.config import extract_config
    from serving.index import build, index_config

    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("extracting", total=None)
            res = build(dataset, model, index_config(), extract_config(), log_fn=console.print,
                        progress=lambda done, total: bar.update(task, completed=done, total=total), engine=engine)
    except IlrError as e:
        _fail(e)
    console.print(f"collection {res.collection}: {res.total} images ({res.added} added, {res.skipped} already "
                  f"there) in {res.seconds:.1f}s; recall {res.recall:.4f}; live alias "
                  f"{'moved' if res.alias_moved else 'NOT moved'}; model {res.model}")
    if not res.alias_moved:
        raise typer.Exit(1)


def _extra_apps(cfg) -> tuple:
    """Serve apps beside the retrieval graph: the monitoring dashboard at /dashboard."""
    from monitoring.dashboard import build_dashboard

    return ((build_dashboard(cfg), "dashboard", "/dashboard"),)


@app.command("serve")
def serve_cmd(host: str = typer.Option(None, help="bind address (default 127.0.0.1)"),
              port: int = typer.Option(None, help="HTTP port (default 8000)"),
              background: bool = typer.Option(False, "--background", help="detach; stop with `ilr stop`")):
    """The retrieval service (Ray Serve): /v1/search, /v1/recognize, /v1/index/images, /healthz, /metrics,
    /docs, and the dashboard at /dashboard. Serves the live index (`ilr index build`) with its model."""
    from serving import service
    from serving.config import serve_config

    cfg = serve_config(**{k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    try:
        if background:
            args = [*(["--host", host] if host else []), *(["--port", str(port)] if port else [])]
            url = service.spawn(args, cfg)
            console.print(f"serving on {url} (docs {url}/docs, dashboard {url}/dashboard/); "
                          f"logs {ilr_home() / 'logs' / 'serve.log'}; stop with `ilr stop`")
        else:
            service.run_forever(cfg, _extra_apps(cfg), log_fn=console.print)
    except IlrError as e:
        _fail(e)


@app.command("stop")
def stop_cmd(keep_milvus: bool = typer.Option(False, help="leave the Milvus Lite server running")):
    """Stop a background `ilr serve` and the workspace's Milvus Lite server."""
    from serving import service

    stopped = service.stop(milvus=not keep_milvus)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command("query")
def query_cmd(image: Path = typer.Argument(..., help="query image file"),
              top_k: int = typer.Option(10, "--top-k", "-k", help="results to show (1..100)"),
              rerank: bool = typer.Option(True, help="re-rank with local features"),
              url: str = typer.Option(None, help="service URL (default $ILR_URL or http://127.0.0.1:8000)")):
    """Search the running service with an image and print the ranked matches."""
    from serving.client import Client

    try:
        res = Client(url).search(image, top_k=top_k, rerank=rerank)
    except IlrError as e:
        _fail(e)
    except Exception as e:  # connection refused and the like
        err.print(f"[bold red]error:[/] cannot reach the service: {e}\n  hint: start it with `ilr serve --background`")
        raise typer.Exit(2)
    from rich.markup import escape  # labels and ids come from the service: text, never markup

    table = Table(title=escape(f"{image.name}: model {res['model']}, index {res['index']}"))
    for col in ("rank", "image_id", "label", "global", "inliers", "score"):
        table.add_column(col, justify="right" if col in ("rank", "global", "inliers", "score") else "left")
    for r in res["results"]:
        table.add_row(str(r["rank"]), escape(str(r["image_id"])), escape(str(r["label"])), f"{r['global_score']:.3f}",
                      "-" if r["inliers"] is None else str(r["inliers"]), f"{r['score']:.3f}")
    console.print(table)
    console.print("timings (ms): " + ", ".join(f"{k[:-3]} {v:.0f}" for k, v in res["timings_ms"].items()))


@app.command("demo")
def demo(size: str = typer.Option(None, help="synthetic size (default: params.yaml demo.size)"),
         seed: int = typer.Option(None, help="generator seed (default: params.yaml demo.seed)"),
         port: int = typer.Option(None, help="service port (default: params.yaml serve.port)"),
         trials: int = typer.Option(None, help="Ray Tune trials (default: params.yaml demo.trials)"),
         steps: int = typer.Option(None, help="training steps per trial (default: params.yaml demo.steps)"),
         second_version: bool = typer.Option(True, help="then register a second dataset version and retrain")):
    """The whole lifecycle on the embedded dataset, through the Prefect flows: generate, ingest, validate,
    version -> tune -> register -> gate -> promote -> index -> serve -> queries + canary -> dashboard ->
    a second dataset version fires the retrain trigger. Leaves the service running (`ilr stop`)."""
    from flows.config import demo_config
    from flows.demo import run_demo
    from serving.config import serve_config

    console.rule("ilr demo")
    try:
        cfg = demo_config(size=size, seed=seed, trials=trials, steps=steps)
        run_demo(cfg.size, cfg.seed, serve_config(port=port).port, cfg.trials, cfg.steps, second_version, console)
    except IlrError as e:
        _fail(e)


flows_app = typer.Typer(no_args_is_help=True, help="Prefect deployments of the lifecycle flows.")
app.add_typer(flows_app, name="flows")


@flows_app.command("serve")
def flows_serve(monitor_every_s: int = typer.Option(600, help="monitor flow interval"),
                retrain_cron: str = typer.Option("0 3 * * 0", help="scheduled retrain (cron)")):
    """Register the deployments (schedules + event triggers) on a Prefect server and run them: starts a
    local `prefect server` when PREFECT_API_URL is not set."""
    from flows.deployments import serve_deployments

    try:
        serve_deployments(monitor_every_s, retrain_cron, log_fn=console.print)
    except IlrError as e:
        _fail(e)


@app.command("retrain")
def retrain_cmd(dataset: str = typer.Option(None, help="NAME[@VERSION] (default: params.yaml pipeline.dataset)"),
                reason: str = typer.Option("manual", help="why (recorded with the run)"),
                trials: int = typer.Option(None), steps: int = typer.Option(None),
                record: bool = typer.Option(True, help="record the trigger (off when a trigger started this run)")):
    """Run the retrain flow now: tune -> challenger -> gate -> promote -> index -> refresh serving."""
    from flows import lifecycle
    from flows.config import pipeline_config

    try:
        dataset = pipeline_config(dataset=dataset).dataset
        if record:
            lifecycle.fire_retrain("ilr.retrain.manual", reason, dataset, mode="record")
        res = lifecycle.retrain(dataset, reason=reason, trials=trials, steps=steps)  # one at a time: it waits
    except IlrError as e:
        _fail(e)
    g = res["gate"]
    console.print(f"retrain {res['dataset']}: {'promoted' if g['promoted'] else 'rejected'} v{g['challenger']} "
                  f"({g['reason']}); index {res.get('index', {}).get('collection', 'unchanged')}")


@app.command("monitor")
def monitor_cmd(url: str = typer.Option(None, help="service URL (default $ILR_URL or http://127.0.0.1:8000)"),
                trigger: bool = typer.Option(True, help="fire the retrain trigger on a quality drop")):
    """One monitoring pass (canary, drift, ANN recall) through the Prefect `monitor` flow."""
    from flows import lifecycle

    s = lifecycle.monitor(url, trigger=trigger)
    console.print(f"canary mAP@k {s['map_at_k']:.4f}, recall@k {s['recall_at_k']:.4f}, top-1 {s['top1']:.3f}, "
                  f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; ANN recall {s['ann_recall']:.3f}; "
                  f"drift MMD^2 {s['drift']['mmd']:.4f}; quality drop: {s['quality_drop']} {s['reason']}")


def main() -> None:
    """The console entry. After Ctrl-C, exit at once (130): Ctrl-C also stops the temporary Prefect server
    and the local Ray that this process started, and waiting at exit for their clients to drain would hang.
    Everything the command finished is kept (tune checkpoints, versions, index rows): run it again to go on."""
    try:
        app()
    finally:
        if _interrupted:
            _hard_exit()


if __name__ == "__main__":
    main()

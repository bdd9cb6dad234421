"""`ilr index build`, `ilr serve | stop | query`, `ilr demo`, `ilr retrain | monitor`, `ilr flows serve`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from data.config import ilr_home
from data.errors import IlrError
from flows.console import _fail, console, err

commands = typer.Typer()
index_app = typer.Typer(no_args_is_help=True, help="The retrieval index (Milvus + local-feature store).")
flows_app = typer.Typer(no_args_is_help=True, help="Prefect deployments of the lifecycle flows.")


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

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("extracting", total=None)
        res = build(dataset, model, index_config(), extract_config(), log_fn=console.print,
                    progress=lambda done, total: bar.update(task, completed=done, total=total), engine=engine)
    console.print(f"collection {res.collection}: {res.total} images ({res.added} added, {res.skipped} already "
                  f"there) in {res.seconds:.1f}s; recall {res.recall:.4f}; live alias "
                  f"{'moved' if res.alias_moved else 'NOT moved'}; model {res.model}")
    from monitoring.store import record_swap

    record_swap(res.collection, res.model, dataset, res.alias_moved)
    if not res.alias_moved:
        raise typer.Exit(1)


def _extra_apps(cfg) -> tuple:
    """Serve apps beside the retrieval graph: the monitoring dashboard at /dashboard."""
    from monitoring.dashboard import build_dashboard

    return ((build_dashboard(cfg), "dashboard", "/dashboard"),)


@commands.command("serve")
def serve_cmd(host: str = typer.Option(None, help="bind address (default 127.0.0.1)"),
              port: int = typer.Option(None, help="HTTP port (default 8000)"),
              background: bool = typer.Option(False, "--background", help="detach; stop with `ilr stop`")):
    """The retrieval service (Ray Serve): /v1/search, /v1/recognize, /v1/index/images, /healthz, /metrics,
    /docs, and the dashboard at /dashboard. Serves the live index (`ilr index build`) with its model."""
    from serving import service
    from serving.config import serve_config

    cfg = serve_config(**{k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    if background:
        args = [*(["--host", host] if host else []), *(["--port", str(port)] if port else [])]
        url = service.spawn(args, cfg)
        console.print(f"serving on {url} (docs {url}/docs, dashboard {url}/dashboard/); "
                      f"logs {ilr_home() / 'logs' / 'serve.log'}; stop with `ilr stop`")
    else:
        service.run_forever(cfg, _extra_apps(cfg), log_fn=console.print)


@commands.command("stop")
def stop_cmd(keep_milvus: bool = typer.Option(False, help="leave the Milvus Lite server running"),
             keep_retrain: bool = typer.Option(False, help="leave retrains that triggers started in the background "
                                                            "running (their index step starts the Milvus Lite "
                                                            "server again)")):
    """Stop the workspace's background work: retrains that triggers started (a stopped search resumes when the
    same retrain runs again), a background `ilr serve`, the Milvus Lite server, and the temporary Prefect
    servers that killed `ilr` commands of this workspace left behind."""
    from data.processes import end_background
    from serving import service

    from flows.prefect_server import stop_orphaned_temporary_servers

    stopped = [] if keep_retrain else [
        f"background retrain of {r['dataset']} (pid {r['pid']}; `{r.get('resume', 'ilr retrain')}` resumes its search)"
        for r in end_background("retrain")]
    stopped += service.stop(milvus=not keep_milvus)
    if n := stop_orphaned_temporary_servers():
        stopped.append(f"{n} temporary Prefect server(s) left by killed commands")
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@commands.command("query")
def query_cmd(image: Path = typer.Argument(..., help="query image file"),
              top_k: int = typer.Option(10, "--top-k", "-k", help="results to show (1..100)"),
              rerank: bool = typer.Option(True, help="re-rank with local features"),
              url: str = typer.Option(None, help="service URL (default $ILR_URL or http://127.0.0.1:8000)"),
              show: Optional[Path] = typer.Option(None, "--show", help="write a PNG: the query beside its top results "
                                                                        "(at most 5) with the verified matches drawn")):
    """Search the running service with an image and print the ranked matches."""
    from serving.client import Client

    client = Client(url)
    try:
        res = client.search(image, top_k=top_k, rerank=rerank, return_matches=show is not None)
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
    if show is not None:
        from PIL import Image

        from data.images import load_rgb
        from serving.picture import matches_picture

        top = res["results"][:5]
        picture = matches_picture(Image.fromarray(load_rgb(image)), top, [client.thumbnail(r["image_id"]) for r in top])
        show.parent.mkdir(parents=True, exist_ok=True)
        picture.save(show, "PNG")
        console.print(f"matches drawn in {show} (green: verified inliers, red: rejected putative matches)")


@commands.command("demo")
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
    cfg = demo_config(size=size, seed=seed, trials=trials, steps=steps)
    serve_config(port=port)  # an option out of range is refused before any work
    run_demo(cfg.size, cfg.seed, port, cfg.trials, cfg.steps, second_version, console)


@flows_app.command("serve")
def flows_serve(monitor_every_s: int = typer.Option(600, help="monitor flow interval"),
                retrain_cron: str = typer.Option("0 3 * * 0", help="scheduled retrain (cron)")):
    """Register the deployments (schedules + event triggers) on a Prefect server and run them: starts a
    local `prefect server` when PREFECT_API_URL is not set."""
    from flows.deployments import serve_deployments

    serve_deployments(monitor_every_s, retrain_cron, log_fn=console.print)


@commands.command("retrain")
def retrain_cmd(dataset: str = typer.Option(None, help="NAME[@VERSION] (default: params.yaml pipeline.dataset)"),
                reason: str = typer.Option("manual", help="why (recorded with the run)"),
                trials: int = typer.Option(None), steps: int = typer.Option(None),
                record: bool = typer.Option(True, help="record the trigger (off when a trigger started this run)")):
    """Run the retrain flow now: tune -> challenger -> gate -> promote -> index -> refresh serving."""
    from flows import lifecycle
    from flows.config import pipeline_config

    dataset = pipeline_config(dataset=dataset).dataset
    if record:
        lifecycle.fire_retrain("ilr.retrain.manual", reason, dataset, mode="record")
    res = lifecycle.retrain(dataset, reason=reason, trials=trials, steps=steps)  # one at a time: it waits
    g = res["gate"]
    console.print(f"retrain {res['dataset']}: {'promoted' if g['promoted'] else 'rejected'} v{g['challenger']} "
                  f"({g['reason']}); index {res.get('index', {}).get('collection', 'unchanged')}")


@commands.command("monitor")
def monitor_cmd(url: str = typer.Option(None, help="service URL (default $ILR_URL or http://127.0.0.1:8000)"),
                trigger: bool = typer.Option(True, help="fire the retrain trigger on a quality drop")):
    """One monitoring pass (canary, drift, ANN recall) through the Prefect `monitor` flow."""
    from flows import lifecycle

    s = lifecycle.monitor(url, trigger=trigger)
    console.print(f"canary mAP@k {s['map_at_k']:.4f}, recall@k {s['recall_at_k']:.4f}, top-1 {s['top1']:.3f}, "
                  f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; ANN recall {s['ann_recall']:.3f}; "
                  f"drift MMD^2 {s['drift']['mmd']:.4f}; quality drop: {s['quality_drop']} {s['reason']}")

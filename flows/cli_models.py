"""`ilr train | evaluate | tune` and `ilr model ...` (the registry: list, gate, promote, rollback)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from data.errors import IlrError
from flows.console import _fail, _write_metrics, console, err

commands = typer.Typer()
model_app = typer.Typer(no_args_is_help=True, help="The model registry: list, gate, promote, rollback.")


@commands.command("train")
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

    res = train(dataset, model_config(backbone=backbone),
                train_config(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, device=device),
                log_fn=console.print)
    console.print(f"trained on {res.dataset.ref}: {res.steps} steps, " +
                  " ".join(f"{k} {v:.4f}" for k, v in res.metrics.items()))
    console.print(f"mlflow run {res.run_id}; model {res.model_uri} ({res.model_dir})")
    version = None
    if register:
        from models import registry

        version = registry.register_trained(res.model_uri, res.dataset, res.run_id, "trained",
                                            **{k: f"{v:.4f}" for k, v in res.metrics.items()})
        console.print(f"registered {registry.model_name()} v{version} as challenger")
    _write_metrics(metrics_file, {**res.metrics, "steps": res.steps, "run_id": res.run_id,
                                  "model_version": version, "dataset": res.dataset.ref})


@commands.command("evaluate")
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

    ev = evaluate(dataset, model, rerank, extract_config(max_side_px=max_side, device=device), rerank_config(),
                  log_fn=console.print)
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


@commands.command("tune")
def tune_cmd(dataset: str = typer.Option(..., help="NAME[@VERSION]"),
             trials: Optional[int] = typer.Option(None, help="number of trials (default: params.yaml tune.trials)"),
             steps: Optional[int] = typer.Option(None, help="training steps per trial"),
             cpus_per_trial: Optional[float] = typer.Option(None), gpus_per_trial: Optional[float] = typer.Option(None),
             register: bool = typer.Option(True, "--register/--no-register", help="register the best as challenger"),
             fresh: bool = typer.Option(False, help="start over instead of resuming an interrupted search")):
    """Ray Tune search (ASHA) over DELG hyper-parameters; registers the best model as `challenger`."""
    from models.tune import tune_config, tune_delg

    res = tune_delg(dataset, tune_config(trials=trials, steps=steps, cpus_per_trial=cpus_per_trial,
                                         gpus_per_trial=gpus_per_trial), register=register, resume=not fresh,
                    log_fn=console.print)
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

    d = gate(dataset, gate_config(margin=margin, suites=suites or None), log_fn=console.print)
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
    from monitoring.store import record_event

    record_event("promotion", "manual promotion (ilr model promote)", champion=r["champion"], previous=r["previous"])
    console.print(f"champion v{r['champion']} (previous v{r['previous']})")


@model_app.command("rollback")
def model_rollback():
    """Give `champion` back to the previous champion."""
    from models.registry import rollback

    from monitoring.store import record_event

    r = rollback()
    record_event("promotion", "rollback (ilr model rollback)", champion=r["champion"], previous=r["previous"])
    console.print(f"rolled back: champion v{r['champion']} (previous v{r['previous']})")

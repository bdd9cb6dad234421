"""Hyper-parameter search for DELG with Ray Tune: ASHA early stopping on val_map, one MLflow run per trial
(children of one tune run), trial checkpoints so that an interrupted search resumes, and registration of the
best trial's model as `challenger`.

Resources per trial come from params.yaml (`tune.cpus_per_trial`, fractional by default;
`tune.gpus_per_trial`, used when the cluster has GPUs). RAY_ADDRESS points at an existing Ray cluster.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from data.config import apply_worker_env, ilr_home, worker_env
from data.versioning import dataset_dir
from models import cluster, registry, tracking
from models.config import ModelConfig, TrainConfig, TuneConfig, model_config, train_config, tune_config

MODEL_KEYS = ("arcface_margin", "arcface_scale", "dim", "gem_p", "attention_loss_weight",
              "reconstruction_loss_weight")
TRAIN_KEYS = ("lr", "image_size")


def _space(spec: dict):
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice,
             "randint": tune.randint, "grid_search": tune.grid_search}
    return {k: kinds[v[0]](*v[1:]) for k, v in spec.items()}


def _trial_root(key: str) -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / "ilr-trials" / key


def _trainable(config: dict, base: dict) -> None:
    """One trial: train with the sampled values, reporting every validation with a checkpoint. `base` (the
    fixed settings and the driver's workspace) travels beside the search space, not in it, so that a
    restored search never sees a changed parameter space."""
    import tempfile

    import torch
    from ray import tune

    from models.train import train

    apply_worker_env(base["env"])  # the driver's workspace: a trial runs in its own working directory
    mcfg = replace(ModelConfig(**base["model"]), **{k: config[k] for k in MODEL_KEYS if k in config})
    tcfg = replace(TrainConfig(**base["train"]), **{k: config[k] for k in TRAIN_KEYS if k in config})
    gpus = float(tune.get_context().get_trial_resources().required_resources.get("GPU", 0))
    tcfg = replace(tcfg, device="cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(base["cpus_per_trial"])))
    trial_id = tune.get_context().get_trial_id()
    ckpt_dir = _trial_root(base["key"]) / trial_id
    restored = tune.get_checkpoint()
    if restored is not None:  # resuming an interrupted search: start from the trial's last checkpoint
        with restored.as_directory() as d:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(d) / "checkpoint.pt", ckpt_dir / "checkpoint.pt")

    def report(metrics: dict) -> None:
        payload = {k: v for k, v in metrics.items() if k != "checkpoint_dir"}
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(Path(metrics["checkpoint_dir"]) / "checkpoint.pt", Path(tmp) / "checkpoint.pt")
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(tmp))

    res = train(base["dataset"], mcfg, tcfg, checkpoint_dir=ckpt_dir, report=report, log_fn=lambda *_: None,
                parent_run_id=base["parent_run_id"], run_name=f"trial {trial_id}")
    tune.report({**res.metrics, "step": res.steps, "model_uri": res.model_uri, "run_id": res.run_id})
    # the model is in MLflow and the checkpoints are Tune's: the node-local scratch is done with (it held
    # 50-100 MB per trial, under the system temp folder, for as long as the machine lived)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _restore(path: str, trainable, log_fn: Callable[[str], None]):
    """The interrupted or finished search at `path`, resumed; None when there is none or it cannot be
    resumed (written by another version of ilr or Ray, damaged): that one is moved aside, the caller starts
    a fresh search, and one line says so. Never a reason for a run to fail."""
    from ray import tune

    if not Path(path).exists():
        return None
    try:
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            log_fn(f"resuming the search from {path}")
            return tuner
        why = "it holds no experiment state"
    except Exception as e:  # incompatible state: Ray refuses to restore it
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    stale = f"{path}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, stale)
    log_fn(f"cannot resume the search in {path} ({why}); starting a fresh one (old state kept in {stale})")
    return None


FINISHED = "ilr-finished.json"  # in a search's folder once it has finished: what a re-run needs, without Ray


def _finished(path: Path) -> dict | None:
    try:
        return json.loads((path / FINISHED).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class TuneResult:
    best_config: dict
    best_metrics: dict
    model_version: str | None
    parent_run_id: str
    trials: int
    stopped_early: int
    results_path: str


def tune_delg(dataset: str, cfg: TuneConfig | None = None, mcfg: ModelConfig | None = None,
              tcfg: TrainConfig | None = None, register: bool = True, log_fn: Callable[[str], None] = print,
              resume: bool = True, callbacks: list | None = None) -> TuneResult:
    """Run (or resume) a search on NAME[@VERSION] and register the best model as `challenger`."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg, mcfg, tcfg = cfg or tune_config(), mcfg or model_config(), tcfg or train_config()
    tcfg = replace(tcfg, steps=cfg.steps or tcfg.steps, val_every=cfg.val_every or tcfg.val_every,
                   checkpoint_every=cfg.val_every or tcfg.val_every, workers=1)
    version, _ = dataset_dir(dataset)  # resolve and check out once, in the driver
    ref = version.ref
    key = hashlib.sha1(json.dumps([version.dvc_md5, asdict(cfg), asdict(mcfg), asdict(tcfg)], sort_keys=True,
                                  default=str).encode()).hexdigest()[:12]
    name = f"tune-{version.name}-{version.version}-{key}"
    storage = ilr_home() / "ray_results"
    exp_id = tracking.setup(tcfg.experiment)  # created once here: trials only look it up
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ctrl-C stops the run (KeyboardInterrupt), as everywhere else: Ray's own handler would end the search
    # quietly and let the caller carry on with a half-finished search. The experiment state and the
    # trials' checkpoints written so far are what the next run resumes from.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    path = str(storage / name)
    state_file = storage / f"{name}.parent_run"  # beside the experiment: survives a fresh start of it
    if not resume:  # --fresh: forget the old search, its trials' checkpoints and its parent run
        shutil.rmtree(storage / name, ignore_errors=True)
        shutil.rmtree(_trial_root(key), ignore_errors=True)
        state_file.unlink(missing_ok=True)
    elif done := _finished(Path(path)):
        # this very search (same data, settings and space) ran to the end before: its result, without
        # starting Ray (a re-run of the demo, a retrain that fires again on the same dataset version)
        log_fn(f"the search in {path} finished before: {done['finished']} trial(s) finished, {done['stopped']} "
               f"stopped early by ASHA; best val_map {done['metrics']['val_map']:.4f} with {done['config']}")
        return _register(done["config"], done["metrics"], version, done["parent_run_id"], done["trials"],
                         done["stopped"], path, register, log_fn)
    cluster.ensure_ray()
    gpus = cfg.gpus_per_trial if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    parent_run_id = state_file.read_text().strip() if state_file.exists() else None
    with mlflow.start_run(run_id=parent_run_id, experiment_id=None if parent_run_id else exp_id,
                          run_name=None if parent_run_id else f"tune {ref}") as parent:
        parent_run_id = parent.info.run_id
        storage.mkdir(parents=True, exist_ok=True)
        state_file.write_text(parent_run_id)
        mlflow.set_tags({"ilr.kind": "tune", "dataset": version.name, "dataset.version": version.version,
                         "dataset.dvc_md5": version.dvc_md5, "git_sha": tracking.git_sha()})
        mlflow.log_params({"trials": cfg.trials, "steps": tcfg.steps, "cpus_per_trial": cfg.cpus_per_trial,
                           "gpus_per_trial": gpus})
        base = {"dataset": ref, "model": asdict(mcfg), "train": asdict(tcfg), "parent_run_id": parent_run_id,
                "cpus_per_trial": cfg.cpus_per_trial, "key": key, "env": worker_env()}
        trainable = tune.with_resources(tune.with_parameters(_trainable, base=base),
                                        {"cpu": cfg.cpus_per_trial, "gpu": gpus})
        reports = max(1, tcfg.steps // tcfg.val_every) + 1  # validations + the final report
        tuner = _restore(path, trainable, log_fn) if resume else None
        if tuner is None:
            tuner = tune.Tuner(
                trainable, param_space=_space(cfg.space),
                tune_config=tune.TuneConfig(
                    metric="val_map", mode="max", num_samples=cfg.trials,
                    scheduler=ASHAScheduler(max_t=reports, grace_period=cfg.grace_period,
                                            reduction_factor=cfg.reduction_factor),
                    search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed,
                                                                  max_concurrent=cfg.max_concurrent)),
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
        grid = tuner.fit()
        shutil.rmtree(_trial_root(key), ignore_errors=True)  # this node's scratch of trials that ASHA stopped
        finished = [r for r in grid if r.metrics and r.metrics.get("model_uri")]  # ran to the end
        stopped = sum(1 for r in grid if r.metrics and not r.metrics.get("model_uri") and r.error is None)
        errors = [r.error for r in grid if r.error is not None]
        if not finished:
            raise RuntimeError(f"no trial finished ({len(errors)} failed): {errors[:1]}")
        best = max(finished, key=lambda r: r.metrics["val_map"])
        best_cfg = {k: v for k, v in best.config.items() if k != "_base"}
        mlflow.log_params({f"best.{k}": v for k, v in best_cfg.items()})
        mlflow.log_metrics({"best_val_map": best.metrics["val_map"], "trials_stopped_early": stopped,
                            "trials_finished": len(finished)})
        log_fn(f"{len(finished)} trial(s) finished, {stopped} stopped early by ASHA; best val_map "
               f"{best.metrics['val_map']:.4f} with {best_cfg}")
    metrics = json.loads(json.dumps(dict(best.metrics), default=str))
    if not errors:  # every trial ran to its end or was stopped by ASHA: nothing left to resume
        (Path(path) / FINISHED).write_text(json.dumps(
            {"config": best_cfg, "metrics": metrics, "parent_run_id": parent_run_id, "trials": len(grid),
             "finished": len(finished), "stopped": stopped}, default=str))
    return _register(best_cfg, metrics, version, parent_run_id, len(grid), stopped, path, register, log_fn)


def _register(best_cfg: dict, metrics: dict, version, parent_run_id: str, trials: int, stopped: int, path: str,
              register: bool, log_fn: Callable[[str], None]) -> TuneResult:
    """The best trial's model (already in MLflow) registered as `challenger`, unless register is False."""
    model_version = None
    if register:
        registry.ensure_champion(log_fn)  # the off-the-shelf model until a challenger passes the gate
        model_version = registry.register_trained(
            metrics["model_uri"], version, metrics["run_id"], "tuned", tune_run_id=parent_run_id,
            val_map=f"{metrics['val_map']:.4f}", params=json.dumps(best_cfg))
        log_fn(f"registered {registry.model_name()} v{model_version} as challenger")
    return TuneResult(best_cfg, metrics, model_version, parent_run_id, trials, stopped, path)

"""Registry lifecycle on a real SQLite MLflow, and a Ray Tune search on a real local Ray."""
import time

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from models import registry, tracking
from models.config import ExtractConfig, ModelConfig, TrainConfig
from models.delg import DELG

pytestmark = pytest.mark.integration
ECFG = ExtractConfig(max_side_px=160, max_local_features=200)


def _register(model, tags):
    tracking.setup("tests")
    with mlflow.start_run():
        info = registry.log_model(model, registry.tracking.ilr_home() / "m" / str(time.time_ns()))
    return registry.register(info.model_uri, tags)


def test_gate_promote_rollback(tiny_workspace):
    first = registry.ensure_champion(log_fn=lambda *_: None)
    assert registry.aliases() == {"champion": first}
    assert registry.ensure_champion() == first  # idempotent

    torch.manual_seed(0)
    worse = DELG(ModelConfig(dim=64), load_pretrained=False)  # random weights: a deliberately worse model
    bad = _register(worse, {"kind": "random"})
    assert registry.aliases()["challenger"] == bad
    d = registry.gate("tiny", margin=0.0, ecfg=ECFG, log_fn=lambda *_: None)
    assert not d.promoted and d.challenger_score < d.champion_score
    assert registry.aliases()["champion"] == first
    tags = MlflowClient().get_model_version(registry.model_name(), bad).tags
    assert tags["gate.decision"] == "rejected" and "does not beat" in tags["gate.reason"]
    assert float(tags["gate.champion_score"]) == pytest.approx(d.champion_score, abs=1e-4)

    # the same off-the-shelf weights with a tiny margin requirement of -1 always "win": a better challenger
    from models.artifacts import off_the_shelf
    good = _register(off_the_shelf(), {"kind": "copy"})
    d = registry.gate("tiny", margin=-1.0, ecfg=ECFG, log_fn=lambda *_: None)
    assert d.promoted and registry.aliases() == {"champion": good, "previous": first}
    assert MlflowClient().get_model_version(registry.model_name(), good).tags["gate.decision"] == "promoted"

    runner = CliRunner()
    out = runner.invoke(app, ["model", "rollback"])
    assert out.exit_code == 0, out.output
    assert registry.aliases() == {"champion": first, "previous": good}
    out = runner.invoke(app, ["model", "promote", bad])
    assert out.exit_code == 0 and registry.aliases()["champion"] == bad
    out = runner.invoke(app, ["model", "list"])
    assert out.exit_code == 0 and "champion" in out.output and "previous" in out.output
    out = runner.invoke(app, ["model", "promote", "999"])
    assert out.exit_code == 2 and "cannot promote" in out.output
    # loading goes through weights-only state dicts
    model, ref = registry.load("champion")
    assert ref.endswith("@champion") and isinstance(model, DELG)


# two learning rates far apart, so that ASHA has clearly worse trials to stop
TUNE_SPACE = {"lr": ["grid_search", [0.00001, 0.05]], "arcface_margin": ["uniform", 0.05, 0.3],
              "dim": ["choice", [64]], "image_size": ["choice", [96]]}


@pytest.mark.slow
def test_tune_asha_registers_challenger(tiny_workspace):
    from models.tune import TuneConfig, tune_delg

    res = tune_delg("tiny", TuneConfig(trials=2, steps=12, val_every=2, cpus_per_trial=0.5, max_concurrent=2,
                                          space=TUNE_SPACE),
                    ModelConfig(), TrainConfig(batch_size=8, workers=1), log_fn=lambda *_: None)
    assert res.trials == 4 and res.stopped_early >= 1 and res.model_version
    assert registry.aliases()["challenger"] == res.model_version
    out = CliRunner().invoke(app, ["model", "list"])
    assert out.exit_code == 0 and "champion" in out.output and "challenger" in out.output, out.output
    runs = mlflow.search_runs(experiment_names=["ilr-delg"], filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(runs) == 4
    tags = MlflowClient().get_model_version(registry.model_name(), res.model_version).tags
    assert tags["tune_run_id"] == res.parent_run_id and tags["dataset.dvc_md5"]


class _InterruptOnce:
    """A Tune callback that aborts the search at the first trial result, once (a flag file remembers)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __getattr__(self, name):  # the rest of ray.tune.Callback's hooks: no-ops
        if name.startswith("on_") or name in ("setup", "get_state", "set_state"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        import os

        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            raise KeyboardInterrupt("interrupting the search")


@pytest.mark.slow
def test_interrupted_tune_resumes_from_checkpoints(tiny_workspace, tmp_path):
    from ray import tune

    from models.tune import TuneConfig, tune_delg

    cfg = TuneConfig(trials=2, steps=8, val_every=2, cpus_per_trial=0.5,
                     space={"lr": ["choice", [0.01]], "dim": ["choice", [64]], "image_size": ["choice", [96]]})
    tcfg = TrainConfig(batch_size=8, workers=1)
    cb = type("Interrupt", (_InterruptOnce, tune.Callback), {})(tmp_path / "interrupted")
    with pytest.raises(BaseException):
        tune_delg("tiny", cfg, ModelConfig(), tcfg, register=False, log_fn=lambda *_: None, callbacks=[cb])
    lines = []
    res = tune_delg("tiny", cfg, ModelConfig(), tcfg, log_fn=lines.append, register=True)
    assert any("resuming the search" in line for line in lines), lines
    assert res.trials == 2 and res.model_version
    runs = mlflow.search_runs(experiment_names=["ilr-delg"],
                              filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(runs) == 2, "each trial kept its MLflow run across the interruption"
    client = MlflowClient()
    for run_id in runs["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert max(steps) == 8 and min(steps) == 1

"""Registry lifecycle on a real SQLite MLflow, and a Ray Tune search on a real local Ray."""
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from models import registry, tracking
from models.config import ExtractConfig, ModelConfig, TrainConfig
from models.artifacts import off_the_shelf
from models.config import GateConfig
from models.delg import DELG
from models.gate import gate

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
    d = gate("tiny", GateConfig(), ecfg=ECFG, log_fn=lambda *_: None)
    assert not d.promoted and d.challenger_score < d.champion_score and d.interval[1] < 0
    assert registry.aliases()["champion"] == first
    tags = MlflowClient().get_model_version(registry.model_name(), bad).tags
    assert tags["gate.decision"] == "rejected" and "does not clear the margin" in tags["gate.reason"]
    assert float(tags["gate.champion_score"]) == pytest.approx(d.champion_score, abs=1e-4)
    assert tags["gate.interval"].startswith("[-")
    # a difference within the noise of the queries is not a win: the champion against itself
    same = _register(off_the_shelf(), {"kind": "copy"})
    d = gate("tiny", GateConfig(), ecfg=ECFG, log_fn=lambda *_: None)
    assert not d.promoted and d.interval == (0.0, 0.0) and registry.aliases()["champion"] == first

    # the same weights with a margin of -1 always "win": stands in for a better challenger
    good = _register(off_the_shelf(), {"kind": "copy"})
    assert good != same
    d = gate("tiny", GateConfig(margin=-1.0), ecfg=ECFG, log_fn=lambda *_: None)
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


REALDEV = Path(__file__).resolve().parents[3] / "shared" / "realdev"


def _real_photos(dest: Path) -> Path:
    """A few instances of the shared real-photo dev set (beside the checkout), else the packaged photos."""
    import shutil

    if REALDEV.is_dir():
        for inst in ("herz_jesu_church", "fox_figurine", "kitchen", "berlin_cathedral"):
            shutil.copytree(REALDEV / inst, dest / inst)
        return dest
    from data.photos import build

    return build(dest)


def test_gate_refuses_a_challenger_that_regresses_a_golden_suite(tiny_workspace, tmp_path):
    """A damaged model (noise on its deeper backbone weights) is refused, and the decision names the suite."""
    from data.versioning import ingest

    ingest("folder", str(_real_photos(tmp_path / "photos")), "golden", log=lambda *_: None)
    first = registry.ensure_champion(log_fn=lambda *_: None)
    damaged = off_the_shelf()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in damaged.backbone.named_parameters():
            if name.startswith(("blocks.3", "blocks.4", "blocks.5", "blocks.6")) and p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 1.5)
    bad = _register(damaged, {"kind": "damaged"})
    d = gate("tiny", GateConfig(margin=-1.0, suites=["golden"]), ecfg=ECFG, log_fn=lambda *_: None)
    assert not d.promoted and registry.aliases()["champion"] == first
    assert "golden@v1 regresses" in d.reason, d.reason
    assert d.suites["golden@v1"]["challenger"] < d.suites["golden@v1"]["champion"] - 0.01
    tags = MlflowClient().get_model_version(registry.model_name(), bad).tags
    assert tags["gate.suites"] == "golden@v1" and float(tags["eval.golden.served_map"]) < float(
        MlflowClient().get_model_version(registry.model_name(), first).tags["eval.golden.served_map"])
    out = CliRunner().invoke(app, ["model", "list"])
    assert out.exit_code == 0 and "golden" in out.output, out.output

    # the monitor's suite canary: the champion has a score on the suite; a champion promoted past the gate
    # is seen as a quality drop that names the suite
    from flows.lifecycle import record_gate
    from monitoring.monitor import suite_canary
    from monitoring.store import MonitorStore

    record_gate(d)
    store = MonitorStore()
    try:
        gcfg = GateConfig(suites=["golden"])
        assert suite_canary(f"models:/{registry.model_name()}/{first}", store, gcfg, ECFG, log_fn=lambda *_: None) == []
        registry.promote(bad)
        reasons = suite_canary(f"models:/{registry.model_name()}/{bad}", store, gcfg, ECFG, log_fn=lambda *_: None)
        assert len(reasons) == 1 and "golden suite golden@v1" in reasons[0], reasons
        assert [r["model"].rsplit("/", 1)[1] for r in store.rows("suites")] == [first, bad]
        assert suite_canary("off-the-shelf", store, gcfg, ECFG) == []  # not a registered version: not scored
    finally:
        store.close()


# two learning rates far apart, so that ASHA has clearly worse trials to stop
TUNE_SPACE = {"lr": ["grid_search", [0.00001, 0.05]], "arcface_margin": ["uniform", 0.05, 0.3],
              "dim": ["choice", [64]], "image_size": ["choice", [96]]}


@pytest.mark.slow
def test_tune_asha_registers_challenger(tiny_workspace):
    from models.tune import TuneConfig, _trial_root, tune_delg

    res = tune_delg("tiny", TuneConfig(trials=2, steps=8, val_every=2, cpus_per_trial=0.5, max_concurrent=2,
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
    # the trials' node-local scratch (checkpoints, the model before MLflow had it) is gone: the challenger
    # came from MLflow
    assert not _trial_root(Path(res.results_path).name.rsplit("-", 1)[1]).exists()
    assert registry.load(res.model_version)[0] is not None
    # the same search again: its result from the finished search's folder, the same challenger
    lines = []
    again = tune_delg("tiny", TuneConfig(trials=2, steps=8, val_every=2, cpus_per_trial=0.5, max_concurrent=2,
                                         space=TUNE_SPACE),
                      ModelConfig(), TrainConfig(batch_size=8, workers=1), log_fn=lines.append)
    assert any("finished before" in line for line in lines), lines
    assert (again.model_version, again.trials, again.stopped_early, again.best_config) == \
        (res.model_version, res.trials, res.stopped_early, res.best_config)


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

    cfg = TuneConfig(trials=2, steps=4, val_every=2, cpus_per_trial=0.5,
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
        assert max(steps) == 4 and min(steps) == 1

"""Training and evaluation against a real dataset version and a real MLflow (SQLite) store."""
import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from data.versioning import ingest
from flows.cli import app
from models import tracking
from models.config import ExtractConfig, ModelConfig, TrainConfig
from models.evaluate import evaluate
from models.train import train

pytestmark = pytest.mark.integration

SMALL = dict(batch_size=8, image_size=96, val_every=2, checkpoint_every=2, workers=1)


class Interrupt(Exception):
    pass


def test_train_logs_to_mlflow_and_resumes(tiny_workspace, tmp_path):
    from data.versioning import dataset_dir

    version = dataset_dir("tiny")[0]
    tcfg = TrainConfig(steps=4, **SMALL)
    mcfg = ModelConfig(dim=64)

    def interrupt(metrics):
        if metrics["step"] == 2:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train("tiny", mcfg, tcfg, report=interrupt, log_fn=lambda *_: None)
    lines = []
    res = train("tiny@v1", mcfg, tcfg, log_fn=lines.append)
    assert any("resuming from step 2" in line for line in lines)
    assert res.steps == 4 and set(res.metrics) == {"val_map", "val_top1"}
    mlflow.set_tracking_uri(tracking.tracking_uri())
    run = MlflowClient().get_run(res.run_id)
    assert run.data.tags["dataset.dvc_md5"] == version.dvc_md5 and run.data.tags["git_sha"]
    assert run.data.params["train.steps"] == "4" and "val_map" in run.data.metrics
    history = MlflowClient().get_metric_history(res.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4], "one run across the interruption"
    # interrupted after its last checkpoint (a search stopped between a trial's end and its final report):
    # run again, nothing is left to train and the result still carries the last validation (Tune needs it)
    lines = []
    again = train("tiny@v1", mcfg, tcfg, log_fn=lines.append)
    assert any("resuming from step 4" in line for line in lines)
    assert (again.steps, again.metrics, again.run_id) == (4, res.metrics, res.run_id) and again.model_uri
    from models.registry import model_dir
    assert {"weights.pt", "config.json"} <= {p.name for p in model_dir(res.model_uri).iterdir()}

    # evaluate the trained model from its MLflow URI, through the CLI
    out = CliRunner().invoke(app, ["evaluate", "--dataset", "tiny", "--model", res.model_uri,
                                   "--max-side", "128"])
    assert out.exit_code == 0, out.output
    assert out.output.strip().splitlines()[-1].startswith("mAP ")
    assert "rerank_map" in out.output and "global_map" in out.output


def test_evaluate_defaults_to_off_the_shelf_and_reranking_helps(tiny_workspace):
    ev = evaluate("tiny", ecfg=ExtractConfig(max_side_px=192), log_fn=lambda *_: None)
    s = ev.summary
    assert s["model"] == "off-the-shelf" and s["protocol"] == "labels"
    assert 0 < s["global_map"] <= 1 and s["rerank_map"] >= s["global_map"]
    assert len(ev.per_query) == s["queries"] and ev.csv_path.exists() and ev.run_id


def test_leave_one_out_protocol_on_a_photo_folder(workspace, tmp_path):
    import shutil

    import skimage

    root = tmp_path / "photos"
    data = __import__("pathlib").Path(skimage.__file__).parent / "data"
    for label, files in {"motorcycle": ["motorcycle_left.png", "motorcycle_right.png"],
                         "astronaut": ["astronaut.png"], "coffee": ["coffee.png"]}.items():
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copy(data / f, root / label / f)
    ingest("folder", str(root), "photos", log=lambda *_: None)
    ev = evaluate("photos", ecfg=ExtractConfig(max_side_px=256), log_mlflow=False, log_fn=lambda *_: None)
    assert ev.summary["protocol"] == "leave_one_out" and ev.summary["queries"] == 2
    assert ev.summary["rerank_map"] == pytest.approx(1.0)  # the stereo pair finds each other


def test_fine_tuning_can_keep_what_imagenet_gave(tiny_workspace):
    """Frozen early blocks and BatchNorm statistics stay as pretrained; the backbone learns at a lower rate,
    pulled back toward its pretrained weights (L2-SP) and its features toward the pretrained backbone's
    (distillation): both penalties are 0 at the start and grow as it moves."""
    import torch

    from models.artifacts import load
    from models.delg import DELG

    tcfg = TrainConfig(steps=2, freeze_blocks=3, freeze_bn=True, backbone_lr_mult=0.1, l2sp=1.0, distill=1.0,
                       **SMALL)
    lines = []
    res = train("tiny", ModelConfig(dim=64), tcfg, log_fn=lines.append)
    assert any("conv_stem, bn1, blocks.0 frozen" in line and "L2-SP 1.0" in line and "distillation 1.0" in line
               for line in lines), lines
    history = MlflowClient(tracking.tracking_uri()).get_metric_history
    penalty = [m.value for m in history(res.run_id, "l2sp")]
    assert len(penalty) == 2 and penalty[0] == 0.0 and penalty[1] > 0.0, penalty
    distill = [m.value for m in history(res.run_id, "distill")]
    assert len(distill) == 2 and distill[0] < 1e-5 and distill[1] > distill[0], distill
    trained = load(res.model_dir).backbone.state_dict()
    pretrained = DELG(ModelConfig(dim=64)).backbone.state_dict()
    assert torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])
    assert torch.equal(trained["blocks.0.0.conv_dw.weight"], pretrained["blocks.0.0.conv_dw.weight"])
    bn = [k for k in pretrained if k.endswith("running_mean")]
    assert all(torch.equal(trained[k], pretrained[k]) for k in bn)  # statistics kept everywhere
    assert not torch.equal(trained["blocks.6.0.conv_pw.weight"], pretrained["blocks.6.0.conv_pw.weight"])

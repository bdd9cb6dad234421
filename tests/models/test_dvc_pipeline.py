"""`dvc repro` of the train stage on a dataset version produces a registered model (real DVC + MLflow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models import registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_dvc_repro_train_registers_a_model(tiny_workspace):
    workspace = tiny_workspace
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (workspace / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}))
    (workspace / "params.yaml").write_text(yaml.safe_dump({
        "pipeline": {"dataset": "tiny"}, "model": {"dim": 64},
        "train": {"steps": 2, "batch_size": 8, "image_size": 96, "val_every": 2, "workers": 1}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ILR_PARAMS": str(workspace / "params.yaml")}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], cwd=workspace, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((workspace / "reports" / "train.json").read_text())
    assert metrics["steps"] == 2 and metrics["model_version"]
    assert registry.alias_version("challenger") == metrics["model_version"]
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert "train" in lock["stages"] and lock["stages"]["train"]["params"]["params.yaml"]["train"]["steps"] == 2
    # unchanged data and params: nothing to rebuild
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], cwd=workspace, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr

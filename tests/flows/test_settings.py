"""The settings kernel: one typed loader for every params.yaml section, the workspace resolved once in the
driver and handed to workers, and the bugs found on the way (each of these failed before)."""
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from data.config import WORKSPACE_ENV, apply_worker_env, ilr_home, params_path, repo_root, worker_env
from data.errors import IlrError
from flows.cli import app
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path, monkeypatch, **sections) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    monkeypatch.setenv("ILR_PARAMS", str(path))
    return path


def test_every_section_of_the_shipped_params_is_typed(monkeypatch):
    from flows.config import check_params, sections

    monkeypatch.setenv("ILR_PARAMS", str(ROOT / "params.yaml"))
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(doc) <= set(sections())
    check_params()  # every key of every section is known to its dataclass


def test_unknown_key_or_section_is_refused_with_its_name(tmp_path, monkeypatch):
    from flows.config import check_params

    # `serve.candidates` was merged into `rerank.top_k`: a stale key must not be silently ignored
    _params(tmp_path, monkeypatch, serve={"candidates": 50})
    with pytest.raises(IlrError, match=r"candidates.*'serve'"):
        check_params()
    out = CliRunner().invoke(app, ["stop", "--keep-milvus"])
    assert out.exit_code == 2 and "candidates" in out.output and "rerank" not in out.output.split("known")[0]
    _params(tmp_path, monkeypatch, rernak={"top_k": 5})
    with pytest.raises(IlrError, match="rernak"):
        check_params()


def test_one_rerank_depth_for_evaluation_gate_and_service(tmp_path, monkeypatch):
    from models.rerank import Reranker
    from serving.config import ServeConfig

    _params(tmp_path, monkeypatch, rerank={"top_k": 7})
    assert Reranker().cfg.top_k == 7  # before: RerankConfig() defaults, whatever params.yaml said
    assert not hasattr(ServeConfig(), "candidates")


def test_typed_sections_replace_raw_dicts(tmp_path, monkeypatch):
    from flows.config import demo_config, pipeline_config
    from models.config import gate_config

    _params(tmp_path, monkeypatch, gate={"margin": 0.02}, demo={"size": "tiny", "trials": 3},
            pipeline={"dataset": "my-photos"})
    assert gate_config().margin == 0.02 and gate_config(margin=0.1).margin == 0.1
    d = demo_config(steps=4)
    assert (d.size, d.trials, d.steps, d.seed) == ("tiny", 3, 4, 0)
    assert pipeline_config().dataset == "my-photos"


def test_values_are_checked_against_their_types(tmp_path, monkeypatch):
    """A value of the wrong type is refused at load with the setting's name; numbers that fit are converted
    (`seed: 1.0` used to fail inside NumPy during training, `freeze_bn: "no"` to count as true)."""
    from flows.config import check_params
    from models.config import extract_config, train_config

    _params(tmp_path, monkeypatch, train={"seed": 1.0, "lr": 1}, extract={"scales": [1, 2]})
    assert (train_config().seed, train_config().lr, extract_config().scales) == (1, 1.0, (1.0, 2.0))
    assert isinstance(train_config().seed, int) and isinstance(train_config().lr, float)
    for section, bad, says in (("train", {"seed": 1.5}, "train.seed is 1.5 (float); it must be a whole number"),
                               ("train", {"freeze_bn": "no"}, "train.freeze_bn is 'no' (str); it must be true or"),
                               ("model", {"mean": [0.5, 0.5]}, "model.mean is [0.5, 0.5] (list); it must be a list "
                                                                "of 3"),
                               ("rerank", {"top_k": "50"}, "rerank.top_k is '50' (str); it must be a whole number"),
                               ("gate", {"suites": "real-photos"}, "gate.suites is 'real-photos' (str); it must be a "
                                                                   "list")):
        _params(tmp_path, monkeypatch, **{section: bad})
        with pytest.raises(IlrError) as e:
            check_params()
        assert says in str(e.value) and "params.yaml" in str(e.value)


def test_values_out_of_range_are_refused_with_their_name(tmp_path, monkeypatch):
    """`train.steps: -1` trained nothing and registered the untrained model; `tune.trials: 0` ended in "no trial
    finished"; `serve.port: 99999` in a traceback once Ray and Serve had started. These, and the like, are
    refused at load with the setting's name."""
    from flows.config import check_params

    for section, bad, says in (("train", {"steps": -1}, "train.steps must be at least 1, got -1"),
                               ("train", {"lr": 0.0}, "train.lr must be above 0, got 0.0"),
                               ("tune", {"trials": 0}, "tune.trials must be at least 1, got 0"),
                               ("tune", {"cpus_per_trial": 0}, "tune.cpus_per_trial must be above 0, got 0.0"),
                               ("tune", {"reduction_factor": 1}, "tune.reduction_factor must be at least 2, got 1"),
                               ("serve", {"port": 99999}, "serve.port must be at most 65535, got 99999"),
                               ("serve", {"default_top_k": 500}, "serve.default_top_k must be at most 100, got 500"),
                               ("demo", {"size": "huge"}, "demo.size must be one of tiny, small, medium, got 'huge'"),
                               ("demo", {"steps": 0}, "demo.steps must be at least 1, got 0"),
                               ("synthetic", {"size": "big"}, "synthetic.size must be one of tiny, small, medium"),
                               ("extract", {"scales": [1.0, 0.0]}, "extract.scales must be one or more numbers above 0"),
                               ("rerank", {"top_k": 0}, "rerank.top_k must be at least 1, got 0"),
                               ("index", {"chunk": 0}, "index.chunk must be at least 1, got 0"),
                               ("monitoring", {"k": 0}, "monitoring.k must be at least 1, got 0"),
                               ("gate", {"confidence": 95}, "gate.confidence must be at most 1, got 95.0")):
        _params(tmp_path, monkeypatch, **{section: bad})
        with pytest.raises(IlrError) as e:
            check_params()
        assert says in str(e.value) and "params.yaml" in str(e.value)


def test_workspace_is_resolved_once_and_absolute(tmp_path, monkeypatch):
    """A worker runs in a folder of its own (Ray Tune: the trial's working dir): it must get the driver's
    absolute repo, home, params file and stores, and never resolve them from its own cwd."""
    from tests.conftest import git

    repo = tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q")
    for key in WORKSPACE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("ILR_HOME", "rel-home")  # relative: resolved against the driver's cwd
    env = worker_env()
    assert env["ILR_REPO"] == str(repo.resolve()) and env["ILR_HOME"] == str((repo / "rel-home").resolve())
    assert env["ILR_PARAMS"] == str(repo.resolve() / "params.yaml")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{repo.resolve() / 'rel-home' / 'mlflow.db'}"
    assert env["ILR_MODEL_NAME"] == "ilr-delg"
    assert all(Path(env[k]).is_absolute() for k in ("ILR_REPO", "ILR_HOME", "ILR_PARAMS"))

    elsewhere = tmp_path / "trial-working-dir"  # not a git repository
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for key in WORKSPACE_ENV:
        monkeypatch.delenv(key, raising=False)
    apply_worker_env(env)
    assert repo_root() == repo.resolve() and ilr_home() == (repo / "rel-home").resolve()
    assert params_path() == repo.resolve() / "params.yaml"
    assert worker_env(MILVUS_URI="http://127.0.0.1:1")["MILVUS_URI"] == "http://127.0.0.1:1"


def test_the_default_workspace_is_the_repositorys_from_any_of_its_folders(tmp_path, monkeypatch):
    """No ILR_HOME: the workspace was ./.ilr of the current folder while the repository was the git top level,
    so `ilr model list` run in a subfolder of a clone made an empty workspace there and said "no registered
    versions" (and `ilr stop` found nothing to stop). Now it is .ilr in the repository; outside any git
    repository, ./.ilr as before."""
    from tests.conftest import git

    repo = tmp_path / "clone"
    (repo / "docs" / "deeper").mkdir(parents=True)
    git(repo, "init", "-q")
    for key in WORKSPACE_ENV:
        monkeypatch.delenv(key, raising=False)
    for folder in (repo, repo / "docs" / "deeper"):
        monkeypatch.chdir(folder)
        assert repo_root() == repo.resolve() and ilr_home() == repo.resolve() / ".ilr"
        assert worker_env()["ILR_HOME"] == str(repo.resolve() / ".ilr")
    assert not (repo / "docs" / "deeper" / ".ilr").exists()
    data_repo = tmp_path / "data-repo"  # datasets versioned in another repository: the workspace stays here
    data_repo.mkdir()
    git(data_repo, "init", "-q")
    monkeypatch.setenv("ILR_REPO", str(data_repo))
    assert repo_root() == data_repo.resolve() and ilr_home() == repo.resolve() / ".ilr"
    monkeypatch.delenv("ILR_REPO")
    outside = tmp_path / "not-a-repository"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert repo_root() == outside.resolve() and ilr_home() == outside.resolve() / ".ilr"


def test_serving_and_tune_hand_workers_the_same_list():
    import inspect

    from models import tune
    from serving import app as sapp
    from serving import index as sindex

    # one mechanism: every worker entry point applies worker_env() from the driver; no hand-kept key lists
    assert not hasattr(sapp, "ENV_KEYS")
    assert "worker_env()" in inspect.getsource(tune.tune_delg)
    assert "apply_worker_env" in inspect.getsource(tune._trainable)
    assert "apply_worker_env" in inspect.getsource(sindex._RayExtract)
    assert "ILR_MODEL_NAME" in WORKSPACE_ENV and "MILVUS_URI" in WORKSPACE_ENV


def test_normalisation_comes_from_the_backbone():
    from models.config import ModelConfig
    from models.delg import DELG
    from models.extract import Extractor

    lite = DELG(ModelConfig(), load_pretrained=False)
    assert lite.cfg.mean == (0.5, 0.5, 0.5) and lite.cfg.std == (0.5, 0.5, 0.5)
    resnet = DELG(ModelConfig(backbone="resnet18", pretrained=False), load_pretrained=False)
    assert resnet.cfg.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.cfg.std == pytest.approx((0.229, 0.224, 0.225))
    assert Extractor(resnet.eval()).mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    # an explicit value (a saved model's config) wins
    assert DELG(ModelConfig(mean=(0.1, 0.2, 0.3), std=(1, 1, 1)), load_pretrained=False).cfg.mean == (0.1, 0.2, 0.3)


def test_off_the_shelf_model_follows_params_backbone(tmp_path, monkeypatch):
    from models import registry

    _params(tmp_path, monkeypatch, model={"backbone": "tf_efficientnet_lite2"})
    model, ref = registry.resolve("off-the-shelf")
    assert ref == "off-the-shelf" and model.cfg.backbone == "tf_efficientnet_lite2"
    assert model.global_descriptor(model.features(__import__("torch").zeros(1, 3, 64, 64))[1]).shape[1] == 352


def test_resume_gives_way_to_a_fresh_search_when_state_is_unusable(tmp_path):
    from models.tune import _restore

    path = tmp_path / "tune-x"
    path.mkdir()
    (path / "junk.txt").write_text("not a Ray Tune experiment")
    said = []
    assert _restore(str(path), trainable=None, log_fn=said.append) is None
    assert not path.exists() and len(said) == 1 and "starting a fresh one" in said[0]
    assert _restore(str(tmp_path / "missing"), trainable=None, log_fn=said.append) is None and len(said) == 1


@pytest.mark.integration
def test_store_dir_from_params_is_where_datasets_are_found(workspace, tmp_path, monkeypatch):
    from data import manifest
    from data.versioning import dataset_dir, snapshot_root

    _params(tmp_path, monkeypatch, data={"store_dir": "elsewhere/store"})
    src = tmp_path / "photos"
    for li, label in enumerate(("tower", "bridge")):
        for k in range(3):
            make_image(src / label / f"{k}.jpg", 10 * li + k)
    out = CliRunner().invoke(app, ["data", "ingest", str(src), "--format", "folder", "--name", "photos"])
    assert out.exit_code == 0, out.output
    assert (workspace / "elsewhere" / "store" / "photos.dvc").exists()
    version, folder = dataset_dir("photos")  # before: looked in data/store (DataConfig() defaults)
    assert version.ref == "photos@v1" and (workspace / "elsewhere" / "store" / "photos" / manifest.MANIFEST).exists()
    assert folder.parent == snapshot_root() / "photos"  # readers get this version's own snapshot of it
    assert len(manifest.read(folder)) == 6
    assert os.environ["ILR_REPO"] == str(workspace)

"""The local-feature store and the build's engine choice: no Milvus, no Ray, no model."""
import numpy as np
import pytest

from data.errors import IlrError
from models.features import Features, unpack_local
from serving.index import choose_engine
from serving.store import LocalFeatureStore


def test_local_store_roundtrip_and_delete(tmp_path):
    store = LocalFeatureStore(tmp_path / "s")
    rng = np.random.default_rng(0)
    feats = {}
    for i in range(3):
        d = rng.normal(size=(10 + i, 16)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        g = rng.normal(size=8).astype(np.float32)
        feats[f"img{i}"] = Features(g / np.linalg.norm(g), rng.uniform(0, 300, (10 + i, 2)).astype(np.float32), d,
                                    np.ones(10 + i), np.ones(10 + i), (320, 240))
        store.add(f"img{i}", feats[f"img{i}"])
    kp, desc = store.get("img2")
    assert kp.shape == (12, 2) and np.abs(kp - feats["img2"].keypoints).max() <= 0.5
    assert np.abs((desc * feats["img2"].descriptors).sum(1) - 1).max() < 5e-3
    many = store.get_many(["img2", "nope", "img0"])  # packed, one lookup, as the re-ranker reads them
    assert many[1] is None and many[2][2] == (320, 240)
    assert many[0][0].dtype == np.uint16 and many[0][1].dtype == np.int8
    assert np.array_equal(unpack_local(*many[0][:2])[1], desc)
    assert store.delete("img1") and "img1" not in store and store.ids() == ["img0", "img2"]
    ids, vecs = store.global_vectors()
    assert ids == ["img0", "img2"] and vecs.shape == (2, 8)
    # the re-ranker's global refinement reads the candidates' vectors in order; zeros for a deleted one
    g = store.global_many(["img2", "img1", "nope", "img0"])
    assert g.shape == (4, 8) and np.array_equal(g[0], feats["img2"].global_desc) and not g[1:3].any()
    assert np.array_equal(g[3], feats["img0"].global_desc)
    reopened = LocalFeatureStore(tmp_path / "s")
    assert reopened.dim == 16 and reopened.ids() == ["img0", "img2"]
    with pytest.raises(KeyError):
        reopened.get("img1")


def test_engine_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_engine("auto", 10**6)[0] == "local"  # one CPU machine: Ray Data adds cost, no workers
    assert choose_engine("ray", 1) == ("ray", "asked for") and choose_engine("local", 10**6)[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    assert choose_engine("auto", 1) == ("ray", "RAY_ADDRESS is set")
    with pytest.raises(IlrError, match="unknown engine"):
        choose_engine("spark", 1)


def test_store_recovers_from_an_interrupted_append(tmp_path):
    store = LocalFeatureStore(tmp_path / "s")
    rng = np.random.default_rng(1)
    d = rng.normal(size=(5, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    f = Features(np.ones(4, np.float32) / 2, rng.uniform(0, 50, (5, 2)).astype(np.float32), d, np.ones(5),
                 np.ones(5), (64, 64))
    store.add("a", f)
    store.close()
    with open(tmp_path / "s" / "keypoints.u16", "ab") as fh:  # a crash after a partial write
        fh.write(b"\x01\x02\x03")
    reopened = LocalFeatureStore(tmp_path / "s")
    reopened.add("b", f)
    kp, desc = reopened.get("b")
    assert np.abs(kp - f.keypoints).max() <= 0.5 and np.abs((desc * d).sum(1) - 1).max() < 5e-3


_WRITER = """
import sys, numpy as np
from models.features import Features
from serving.store import LocalFeatureStore
store = LocalFeatureStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    rng = np.random.default_rng(i)
    n = 20 + i % 7
    d = rng.normal(size=(n, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    store.add(f"img{i}", Features(np.full(4, 0.5, np.float32), rng.uniform(0, 500, (n, 2)).astype(np.float32), d,
                                  np.ones(n), np.ones(n), (640, 480)))
"""


def test_a_reader_opening_the_store_never_truncates_a_writer(tmp_path):
    """The monitor opens the live store while the service adds to it (another process): opening the store
    trims only a dead writer's bytes, never those of a writer between its append and its commit."""
    import subprocess
    import sys

    folder, n = tmp_path / "s", 300
    LocalFeatureStore(folder).close()
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(n)])
    opened = 0
    while writer.poll() is None or opened == 0:
        LocalFeatureStore(folder).close()
        opened += 1
    assert writer.returncode == 0
    store = LocalFeatureStore(folder)
    assert store.count() == n and opened > 1
    for i in range(n):
        rng = np.random.default_rng(i)
        k = 20 + i % 7
        d = rng.normal(size=(k, 8)).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        kp, desc = store.get(f"img{i}")
        assert np.abs(kp - rng.uniform(0, 500, (k, 2)).astype(np.float32)).max() <= 0.5, i  # same draws, same order as the writer
        assert np.abs((desc * d).sum(1) - 1).max() < 5e-3, i


def test_deployment_placement_options_from_params():
    """serve.deployments scales and places each deployment; a typo is refused with its name, never ignored."""
    from data.errors import IlrError
    from serving.app import deployment_options
    from serving.config import ServeConfig

    cfg = ServeConfig(deployments={"Reranker": {"num_replicas": 2, "max_replicas_per_node": 1},
                                   "Extractor": {"resources": {"gpu_box": 1}, "num_gpus": 1}})
    assert deployment_options(cfg, "Reranker", {"num_cpus": 0.25}, max_ongoing_requests=16) == {
        "max_ongoing_requests": 16, "num_replicas": 2, "max_replicas_per_node": 1,
        "ray_actor_options": {"num_cpus": 0.25}}
    assert deployment_options(cfg, "Extractor", {"num_cpus": 0.25, "num_gpus": 0.0})["ray_actor_options"] == {
        "num_cpus": 0.25, "num_gpus": 1, "resources": {"gpu_box": 1}}
    assert deployment_options(ServeConfig(), "Searcher", {"num_cpus": 0.25}) == {"ray_actor_options": {"num_cpus": 0.25}}
    with pytest.raises(IlrError, match="Rerankr"):
        deployment_options(ServeConfig(deployments={"Rerankr": {}}), "Searcher", {})
    with pytest.raises(IlrError, match="replicas"):
        deployment_options(ServeConfig(deployments={"Reranker": {"replicas": 2}}), "Reranker", {})

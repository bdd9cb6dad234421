import cv2
import numpy as np
import pytest
import torch

from models.config import ExtractConfig, RerankConfig
from models.delg import DELG
from models.config import ModelConfig
from models.extract import Extractor, bucket_size
from models.features import Features, pack_local, unpack_local
from models.rerank import ranking_score, Reranker, recognition_score


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    model = DELG(ModelConfig(dim=64, global_descriptor="learned", local_descriptors="learned"), load_pretrained=True)
    return Extractor(model, ExtractConfig(max_side_px=160, batch_size=4, cpu_batch_size=4, max_local_features=50,
                                          cpu_threads=1))


def _images():
    rng = np.random.default_rng(0)
    shapes = [(120, 160), (150, 100), (120, 160), (300, 400), (64, 64), (120, 160)]
    return [cv2.resize(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8), (w, h)) for h, w in shapes]


def test_bucket_sizes():
    assert bucket_size(400, 300, 160, 32) == (160, 128)
    assert bucket_size(20, 10, 160, 32) == (32, 32)
    w, h = bucket_size(1000, 333, 512, 32)
    assert w == 512 and h % 32 == 0


def test_batched_equals_per_image(extractor):
    imgs = _images()
    batched = extractor.extract(imgs)
    for img, b in zip(imgs, batched):
        s = extractor.extract_one(img)
        assert np.abs(s.global_desc - b.global_desc).max() < 1e-4
        assert np.abs(s.descriptors - b.descriptors).max() < 1e-4
        assert np.allclose(s.keypoints, b.keypoints, atol=1e-3)


def test_features_shapes_and_keypoints_in_original_pixels(extractor):
    imgs = _images()
    for img, f in zip(imgs, extractor.extract(imgs)):
        h, w = img.shape[:2]
        assert f.global_desc.shape == (64,) and abs(np.linalg.norm(f.global_desc) - 1) < 1e-4
        assert 0 < len(f.keypoints) <= 50 and f.descriptors.shape[1] == 64
        assert (f.keypoints[:, 0] <= w + 16).all() and (f.keypoints[:, 1] <= h + 16).all()
        assert np.all(np.diff(f.scores) <= 1e-6), "keypoints sorted by attention"


def test_compact_storage_is_a_quarter_and_close(extractor):
    f = extractor.extract(_images()[:1])[0]
    kp, desc = pack_local(f)
    assert desc.dtype == np.int8 and kp.dtype == np.uint16
    float32_bytes = f.descriptors.astype(np.float32).nbytes + 4 * 4 * len(f.keypoints)  # desc + x, y, scale, score
    assert (kp.nbytes + desc.nbytes) <= float32_bytes / 4
    _, back = unpack_local(kp, desc)
    assert np.abs((back * f.descriptors).sum(1) - 1).max() < 5e-3


def mutual_matches(q: np.ndarray, d: np.ndarray, max_distance: float, ratio: float = 1.0) -> np.ndarray:
    """The plain reference of models.rerank.mutual_matches_many, one pair of images: mutual nearest neighbours of
    unit descriptors within an L2 distance, and (ratio < 1) Lowe's test against the second nearest by a full
    sort. q: [N x d], d: [M x d] -> [P x 2] index pairs (query, database)."""
    if len(q) == 0 or len(d) == 0:
        return np.zeros((0, 2), np.int64)
    sim = q @ d.T
    nn12 = sim.argmax(axis=1)
    nn21 = sim.argmax(axis=0)
    ids = np.arange(len(q))
    mutual = nn21[nn12] == ids
    close = sim[ids, nn12] >= 1.0 - max_distance ** 2 / 2  # |a-b|^2 = 2 - 2 a.b for unit vectors
    keep = mutual & close
    if ratio < 1.0 and d.shape[0] >= 2:
        dist = np.sqrt(np.clip(2 - 2 * np.sort(sim, axis=1)[:, ::-1][:, :2], 0, None))  # nearest, second nearest
        keep &= dist[:, 0] < ratio * dist[:, 1]
    return np.stack([ids[keep], nn12[keep]], axis=1)


def _scene(n=300, seed=0):
    rng = np.random.default_rng(seed)
    kp = rng.uniform(0, 400, (n, 2)).astype(np.float32)
    desc = rng.normal(size=(n, 32)).astype(np.float32)
    return kp, desc / np.linalg.norm(desc, axis=1, keepdims=True)


def test_verify_finds_affine_inliers():
    kp, desc = _scene()
    A = np.array([[0.8, -0.2, 30], [0.25, 0.9, -10]], np.float32)
    kp2 = kp @ A[:, :2].T + A[:, 2]
    noisy = desc + np.random.default_rng(1).normal(scale=0.05, size=desc.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    reranker = Reranker(RerankConfig())
    other_kp, other_desc = _scene(seed=7)
    same, other = reranker.inliers(kp, desc, [(kp2, noisy), (other_kp, other_desc)])
    assert same > 250
    assert other < 10  # chance agreement of random matches
    assert len(mutual_matches(desc, noisy, 0.9)) > 250


def test_rerank_inliers_first_orders_by_inliers_then_global_score():
    kp, desc = _scene()
    true = (kp * 1.1 + 5, desc)
    junk1, junk2 = _scene(seed=3), _scene(seed=4)
    r = Reranker(RerankConfig(workers=2, score="inliers_first")).rerank(kp, desc, [junk1, true, junk2],
                                                                        np.array([0.9, 0.5, 0.95]))
    assert r.order[0] == 1 and r.inliers[1] > 100 and max(r.inliers[0], r.inliers[2]) < 10
    expected = sorted(range(3), key=lambda i: (-r.inliers[i], -[0.9, 0.5, 0.95][i]))
    assert list(r.order) == expected
    assert r.recognition[1] == pytest.approx(recognition_score(np.array([r.inliers[1]]), np.array([0.5]))[0])
    assert recognition_score(np.array([200]), np.array([1.0]))[0] == pytest.approx(1.25)


def test_fused_score_weighs_geometry_against_global_similarity():
    from models.rerank import fused_score, ranking_score

    cfg = RerankConfig()
    assert (cfg.score, cfg.inlier_weight, cfg.inlier_cap) == ("fused", 0.5, 70)
    # a strong global match with moderate verification beats a weak global match with a few more inliers
    cos, inl = np.array([0.80, 0.40]), np.array([30, 40])
    assert np.argmax(ranking_score(inl, cos, cfg)) == 0
    assert np.argmax(ranking_score(inl, cos, RerankConfig(score="inliers_first"))) == 1
    assert fused_score(np.array([500]), np.array([0.2]))[0] == pytest.approx(0.7)  # capped at 70 inliers
    # a clear geometric verification still lifts a true match over an unverified look-alike
    kp, desc = _scene()
    true = (kp * 1.1 + 5, desc)
    r = Reranker(RerankConfig(workers=2)).rerank(kp, desc, [_scene(seed=3), true], np.array([0.9, 0.6]))
    assert r.order[0] == 1 and r.scores[1] == pytest.approx(0.6 + 0.5 * min(70, r.inliers[1]) / 70)


def test_inliers_at_chance_level_add_nothing():
    from models.rerank import fused_score

    cfg = RerankConfig()
    assert cfg.inlier_floor == 8
    # 6 chance inliers on a look-alike do not lift it over a true match whose RANSAC found nothing
    cos, inl = np.array([0.93, 0.91]), np.array([0, 6])
    assert np.argmax(ranking_score(inl, cos, cfg)) == 0
    assert np.argmax(ranking_score(inl, cos, RerankConfig(inlier_floor=0))) == 1
    assert fused_score(np.array([8, 39, 70, 500]), np.zeros(4), floor=8).tolist() == pytest.approx([0, 0.25, 0.5, 0.5])


def _unit_rows(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_superglobal_refinement_lifts_a_candidate_close_to_the_other_matches():
    from models.rerank import refined_similarity

    rng = np.random.default_rng(0)
    inst, other = rng.normal(size=64), rng.normal(size=64)
    q = _unit_rows([inst + 0.9 * rng.normal(size=64)])[0]
    # candidates: two views of the instance, a look-alike, a third view far from the query but close to the
    # other views
    cands = _unit_rows([inst + 0.5 * rng.normal(size=64), inst + 0.5 * rng.normal(size=64),
                        0.6 * inst + other, inst + 0.3 * rng.normal(size=64) + 0.8 * other])
    cos = cands @ q
    order = np.argsort(-cos)
    cands, cos = cands[order], cos[order]
    cfg = RerankConfig(refine="superglobal", refine_k=2)
    sim = refined_similarity(q, cands, cos, cfg)
    assert sim.shape == cos.shape and np.all(np.abs(sim) <= 1 + 1e-9)
    assert np.array_equal(refined_similarity(q, cands, cos, RerankConfig(refine="none")), cos)
    views = [i for i, o in enumerate(order) if o != 2]
    lookalike = int(np.flatnonzero(order == 2)[0])
    # every view of the instance ends above the look-alike after refinement
    assert all(sim[v] > sim[lookalike] for v in views)
    aqe = refined_similarity(q, cands, cos, RerankConfig(refine="aqe", refine_k=2))
    assert aqe.shape == cos.shape
    # a deleted candidate (zero row) gets no similarity from its own descriptor and does not break the rest
    cands[1] = 0
    assert np.all(np.isfinite(refined_similarity(q, cands, cos, cfg)))
    with pytest.raises(ValueError, match="refine"):
        refined_similarity(q, cands, cos, RerankConfig(refine="diffusion"))


def test_batched_matching_equals_pairwise():
    from models.rerank import mutual_matches_many

    q = _scene(200, 1)[1]
    cands = [_scene(n, s)[1] for n, s in ((150, 2), (0, 3), (300, 4), (120, 5))]
    cands[2][:50] = q[:50]  # some true matches
    many = mutual_matches_many(q, cands, 0.9, max_elements=200 * 300 * 3)  # chunks of 3 candidates
    for c, m in zip(cands, many):
        assert np.array_equal(np.asarray(m), mutual_matches(q, c, 0.9))
    assert len(many[2]) >= 50
    packed = [pack_local(Features(np.zeros(1), np.zeros((len(c), 2)), c, None, None, (1, 1)))[1] for c in cands]
    as_stored = mutual_matches_many(q, packed, 0.9)  # int8 as stored == unpacked floats
    for p, m in zip(packed, as_stored):
        assert np.array_equal(m, mutual_matches(q, unpack_local(np.zeros((len(p), 2)), p)[1], 0.9))
    # Lowe's ratio test: the second nearest as a full sort finds it; a repeated feature (a tie for the
    # nearest) is ambiguous and dropped, and its query feature matches nothing else
    cands.append(np.concatenate([q[:1], q[:1], _scene(100, 6)[1]]))
    with_ratio = mutual_matches_many(q, cands, 0.9, max_elements=200 * 300 * 3, ratio=0.8)
    for c, m in zip(cands, with_ratio):
        assert np.array_equal(np.asarray(m), mutual_matches(q, c, 0.9, ratio=0.8))
    assert 0 < len(with_ratio[2]) <= len(many[2]) and 0 not in with_ratio[-1][:, 0]


@pytest.mark.parametrize("batch", [1, 2])
def test_inference_copy_matches_the_model(batch):
    """BatchNorm folding, oneDNN 1x1 convolutions and the cheaper "same" padding change nothing but speed;
    the caller's model is left as it was."""
    from models.extract import OneDNNPointwise, SamePadConv, inference_copy

    torch.manual_seed(1)
    model = DELG(ModelConfig(dim=32), num_classes=5, load_pretrained=True).eval()
    for m in model.attention.modules():  # the backbone's statistics are ImageNet's; the head's made non-trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model, "cpu", channels_last=True)
    kinds = {type(m) for m in fast.modules()}
    assert OneDNNPointwise in kinds and SamePadConv in kinds
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(batch, 3, 97, 130)  # odd and even sides: symmetric and asymmetric "same" padding
    with torch.inference_mode():
        ref_local, ref_global = model.features(x)
        out_local, out_global = fast.features(x.contiguous(memory_format=torch.channels_last))
        ref_attn, ref_desc = model.local_head(ref_local)
        out_attn, out_desc = fast.local_head(out_local)
        close = lambda a, b: ((a - b).abs().max() / a.abs().max()).item() < 1e-4  # float32 rounding only
        assert close(ref_local, out_local) and close(ref_global, out_global) and close(ref_attn, out_attn)
        assert torch.allclose(ref_desc, out_desc, atol=1e-4)
        assert torch.allclose(model.global_descriptor(ref_global), fast.global_descriptor(out_global), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_backbone_equals_torch():
    """The CPU default runs the backbone in ONNX Runtime: same global descriptors (float rounding), same
    keypoints and descriptors as the torch engine, at sides that are odd multiples and batched."""
    from models.extract import OnnxBackbone

    torch.manual_seed(2)
    model = DELG(ModelConfig(dim=32), num_classes=5, load_pretrained=True).eval()
    cfg = dict(max_side_px=160, cpu_batch_size=2, max_local_features=50, cpu_threads=1)
    onnx = Extractor(model, ExtractConfig(**cfg))
    plain = Extractor(model, ExtractConfig(**cfg, cpu_runtime="torch"))
    assert isinstance(onnx.onnx, OnnxBackbone) and plain.onnx is None
    x = torch.randn(2, 3, 97, 130)
    with torch.inference_mode():
        ref = model.features(x)
    for a, b in zip(onnx.onnx(x), ref):  # dynamic batch and sides; "same" padding follows the size
        assert a.shape == b.shape and ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    for a, b in zip(onnx.extract(_images()), plain.extract(_images())):
        assert np.abs(a.global_desc - b.global_desc).max() < 1e-5
        assert a.keypoints.shape == b.keypoints.shape and np.abs(a.descriptors - b.descriptors).max() < 1e-3


def test_ratio_test_drops_ambiguous_matches_on_repeated_texture():
    from models.rerank import mutual_matches_many

    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    base = rng.normal(size=(20, 32))
    q = unit(base + rng.normal(scale=0.05, size=base.shape))
    a = unit(base + rng.normal(scale=0.05, size=base.shape))
    b = unit(a + rng.normal(scale=0.002, size=a.shape))  # the same pattern again, a little further on
    repeated = np.concatenate([a, b])  # every feature twice, about equally close: each match is ambiguous
    assert len(mutual_matches_many(q, [repeated], 0.9)[0]) >= 15
    assert len(mutual_matches_many(q, [repeated], 0.9, ratio=0.9)[0]) == 0
    assert len(mutual_matches_many(q, [a], 0.9, ratio=0.9)[0]) == 20  # distinct features keep their matches

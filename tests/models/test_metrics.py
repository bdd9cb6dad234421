"""Hand-worked metric cases, including the edge cases the research code gets wrong."""
import math

import numpy as np
import pytest

from models.metrics import average_precision, gap, gldv2_map_at_k, retrieval_map, revisited_map


def test_trapezoid_ap_hand_worked():
    # positives at 0-based ranks 0 and 2: (1 + (1/2 + 2/3)/2) / 2
    assert average_precision(np.array([0, 2]), 2) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # a positive never retrieved still counts in the denominator
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)
    assert math.isnan(average_precision(np.array([]), 0))


def test_junk_ranked_first_is_ignored():
    order = np.array([5, 1, 7, 2, 9])  # junk 5 first, positives 1 and 2
    with_junk = retrieval_map([order], [[1, 2]], [[5]])
    without = retrieval_map([np.array([1, 7, 2, 9])], [[1, 2]])
    assert with_junk["map"] == pytest.approx(without["map"]) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)


def test_query_without_positives_is_skipped():
    r = retrieval_map([np.array([0, 1]), np.array([1, 0])], [[0], []])
    assert r["map"] == pytest.approx(1.0) and r["queries"] == 1 and math.isnan(r["aps"][1])


def test_mp_at_k_counts_up_to_last_positive():
    r = retrieval_map([np.array([0, 9, 8, 7, 6, 5])], [[0]], kappas=(1, 5))
    assert r["mp_at_1"] == 1.0 and r["mp_at_5"] == 1.0  # revisitop: k is capped at the last positive's rank


def test_revisited_easy_medium_hard():
    order = np.array([0, 1, 2, 3])
    g = [{"easy": [0], "hard": [2], "junk": [1]}]
    r = revisited_map([order], g)
    assert r["easy"] == pytest.approx(1.0)                     # ok {0}, junk {1, 2}
    assert r["medium"] == pytest.approx(1.0)  # ok {0, 2}, junk {1}: junk-free ranks 0, 1
    assert r["hard"] == pytest.approx(1.0)    # ok {2}, junk {1, 0}: junk-free rank 0
    r = revisited_map([np.array([3, 2, 1, 0])], g)
    assert r["medium"] == pytest.approx(((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)  # junk-free ranks 1, 2


def test_gldv2_map_at_100_definition():
    # 2 ground-truth images at ranks 5 and 103 (1-based): (1/5) / min(2, 100), not 1/5
    preds = [f"x{i}" for i in range(110)]
    preds[4], preds[102] = "a", "b"
    assert gldv2_map_at_k({"q": preds}, {"q": ["a", "b"]}) == pytest.approx(0.1)


def test_gldv2_duplicates_missing_and_unknown_queries():
    # duplicate predictions are skipped; a query without predictions scores 0
    assert gldv2_map_at_k({"q1": ["a", "a", "b"]}, {"q1": ["a", "b"], "q2": ["c"]}) == pytest.approx(
        ((1 + 2 / 3) / 2 + 0) / 2)
    with pytest.raises(ValueError):
        gldv2_map_at_k({"zz": ["a"]}, {"q1": ["a"]})


def test_gap_non_landmark_queries_dilute_precision():
    sol = {"q1": ["A"], "q2": [], "q3": ["C"], "q4": ["D"]}
    preds = {"q1": ("A", 0.9), "q2": ("B", 0.8), "q3": ("C", 0.7)}  # q4: no prediction
    assert gap(preds, sol) == pytest.approx((1 + 2 / 3) / 3)
    # ordering is by score over all queries, not per query
    assert gap({"q1": ("X", 0.99), "q3": ("C", 0.5)}, sol) == pytest.approx((1 / 2) / 3)


def test_gldv2_recognition_metrics_equal_delf():
    from models.metrics import top1_accuracy
    from tests import official

    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 30
        solution = {f"q{i}": ([str(rng.integers(0, 5))] if rng.random() < 0.7 else []) for i in range(n)}
        preds = {q: (str(rng.integers(0, 5)), float(rng.choice([0.1, 0.5, rng.random()]))) for q in solution
                 if rng.random() < 0.9}
        as_delf = {q: {"class": c, "score": s} for q, (c, s) in preds.items()}
        assert gap(preds, solution) == pytest.approx(official.delf_gap(as_delf, solution), abs=1e-12)
        assert gap(preds, solution, ignore_non_landmarks=True) == pytest.approx(
            official.delf_gap(as_delf, solution, ignore_non_gt=True), abs=1e-12)
        assert top1_accuracy(preds, solution) == pytest.approx(official.delf_top1(as_delf, solution), abs=1e-12)
    # hand-worked: a wrong prediction on a non-landmark query first, then two right ones
    sol = {"a": [], "b": ["1"], "c": ["2"]}
    pred = {"a": ("1", 0.9), "b": ("1", 0.8), "c": ("2", 0.7)}
    assert gap(pred, sol) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert gap(pred, sol, ignore_non_landmarks=True) == pytest.approx(1.0)
    assert top1_accuracy(pred, sol) == 1.0


def test_met_scores_and_knn_equal_the_official_code():
    from models.metrics import knn_classify, met_scores
    from tests import official

    # hand-worked: a distractor predicted with the highest confidence lowers GAP, not GAP without distractors
    s = met_scores(["a", "b", "c"], [0.9, 0.8, 0.7], ["a", "-", "c"], distractor="-")
    assert s == pytest.approx({"gap": (1 + 2 / 3) / 2, "gap_no_distractors": 1.0, "accuracy": 1.0})
    rng = np.random.default_rng(2)
    for _ in range(10):
        db = rng.normal(size=(40, 8))
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        db_labels = rng.integers(0, 12, 40).astype(object)
        q = rng.normal(size=(25, 8))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        truth = [int(x) if rng.random() < 0.7 else -1 for x in rng.integers(0, 12, 25)]
        for k, t in ((1, 1.0), (3, 10.0), (7, 0.1)):
            want_p, want_c = official.MetKNN(k, t).fit(db, db_labels).predict(q)
            sims = q @ db.T
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            p, c = knn_classify(np.take_along_axis(sims, top, 1), db_labels[top], len(set(db_labels)), k, t)
            assert list(p) == want_p and np.allclose(c, want_c)
            got = met_scores(p, c, np.array(truth, dtype=object), distractor=-1)
            assert got["gap"] == pytest.approx(official.met_gap(want_p, want_c, truth))
            assert got["gap_no_distractors"] == pytest.approx(official.met_gap_non_distr(want_p, want_c, truth))
            assert got["accuracy"] == pytest.approx(official.met_accuracy(want_p, truth))


def test_recall_at_k_hand_count_and_reference():
    from models.metrics import recall_at_k
    from tests import official

    # 4 images, classes a a b b; similarities chosen by hand
    sims = np.array([[1, .9, .8, .1], [.9, 1, .2, .3], [.8, .2, 1, .1], [.1, .3, .1, 1]], float)
    labels = np.array(["a", "a", "b", "b"])
    s = sims.copy()
    np.fill_diagonal(s, -np.inf)
    orders = np.argsort(-s, axis=1, kind="stable")
    positives = [np.flatnonzero((labels == labels[i]) & (np.arange(4) != i)) for i in range(4)]
    # image 0 -> 1 (hit); 1 -> 0 (hit); 2 -> 0 (miss, then 1, then 3); 3 -> 1 (miss, then 0 / 2)
    r = recall_at_k(orders, positives, (1, 2, 3))
    assert r == {"recall_at_1": 0.5, "recall_at_2": 0.5, "recall_at_3": 1.0}
    assert r["recall_at_1"] == official.sop_recall(sims, labels, (1,))[1]


def test_revisited_crop_keeps_the_stored_orientation_and_pads_outside(tmp_path):
    from PIL import Image

    from models.evaluate import _revisited_crop

    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": revisitop crops the pixels as stored, not the rotated view
    img.save(tmp_path / "q.jpg", exif=exif.tobytes(), quality=95)
    crop = _revisited_crop({"path": "q.jpg", "bbox": [30.0, 10.0, 50.0, 25.0]}, tmp_path)
    assert crop.shape == (15, 20, 3)
    assert crop[:5, :5].mean(axis=(0, 1))[0] > 150          # inside the stored 40 x 20 image: red
    assert crop[-3:, -3:].max() == 0 and crop[:, -5:].max() == 0  # outside: black, as PIL pads

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

"""Retrieval and recognition metrics, as pure functions of rankings and ground truth.

- Revisited Oxford/Paris: trapezoid-interpolated AP over the full ranking, junk images removed from the
  ranking; Easy/Medium/Hard ground truth; mP@k.
- GLDv2 retrieval mAP@100: per query, sum of precision at each new correct hit in the top 100, divided by
  min(#ground truth, 100), averaged over all solution queries (no prediction = 0; duplicates skipped).
- GLDv2 recognition GAP (micro-AP): one (label, score) per query, sorted by score over all queries,
  divided by the number of queries that have a landmark; non-landmark queries only dilute precision.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def average_precision(positive_ranks: np.ndarray, n_positives: int) -> float:
    """Trapezoid AP (revisitop's compute_ap). positive_ranks: sorted 0-based ranks of the positives in the
    (junk-free) ranking; n_positives: all positives, found or not."""
    if n_positives == 0:
        return float("nan")
    ranks = np.asarray(positive_ranks, dtype=np.float64)
    i = np.arange(len(ranks), dtype=np.float64)
    left = np.where(ranks == 0, 1.0, i / np.maximum(ranks, 1))
    right = (i + 1) / (ranks + 1)
    return float(((left + right) / 2).sum() / n_positives)


def _positive_ranks(order: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of positives after removing junk from the ranking. order: [N] db indices, best first."""
    is_ok = np.isin(order, ok)
    is_junk = np.isin(order, junk)
    pos = np.flatnonzero(is_ok)
    junk_before = np.cumsum(is_junk)[pos] - is_junk[pos]
    return pos - junk_before, pos


def retrieval_map(orders: np.ndarray | Sequence[np.ndarray], positives: Sequence[Sequence[int]],
                  junk: Sequence[Sequence[int]] | None = None, kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP and mP@k over queries (revisitop convention). orders[q]: db indices ranked best first;
    positives[q] / junk[q]: db indices. Queries without positives are skipped.

    Returns {"map", "mp@k"..., "aps": per-query AP (nan where skipped)}."""
    aps, prs = [], []
    for q, order in enumerate(orders):
        ok = np.asarray(positives[q], dtype=np.int64)
        jk = np.asarray(junk[q] if junk is not None else [], dtype=np.int64)
        if len(ok) == 0:
            aps.append(float("nan"))
            continue
        ranks, _ = _positive_ranks(np.asarray(order), ok, jk)
        aps.append(average_precision(ranks, len(ok)))
        # precision at k, counted only up to the last positive (revisitop's mP@k)
        last = ranks.max() + 1 if len(ranks) else 1
        prs.append([np.sum(ranks < min(k, last)) / min(k, last) for k in kappas])
    valid = [a for a in aps if not np.isnan(a)]
    out = {"map": float(np.mean(valid)) if valid else float("nan"), "aps": aps, "queries": len(valid)}
    if prs:
        mp = np.mean(np.asarray(prs), axis=0)
        out.update({f"mp_at_{k}": float(v) for k, v in zip(kappas, mp)})
    return out


def revisited_map(orders, gnd: Sequence[Mapping[str, Sequence[int]]], kappas=(1, 5, 10)) -> dict:
    """Easy / Medium / Hard of Revisited Oxford/Paris. gnd[q] has 'easy', 'hard', 'junk' (db indices).

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk; hard: ok = hard, junk = junk + easy.
    """
    out = {}
    for name, ok_keys, junk_keys in (("easy", ("easy",), ("junk", "hard")), ("medium", ("easy", "hard"), ("junk",)),
                                     ("hard", ("hard",), ("junk", "easy"))):
        ok = [np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok_keys]) for g in gnd]
        jk = [np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk_keys]) for g in gnd]
        r = retrieval_map(orders, ok, jk, kappas)
        out[name] = r["map"]
        out[f"{name}_aps"] = r["aps"]
        out.update({f"{name}_{k}": v for k, v in r.items() if k.startswith("mp_at_")})
    return out


def gldv2_map_at_k(predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
                   k: int = 100) -> float:
    """GLDv2 retrieval mAP@k. predictions[q]: ranked index ids; solution[q]: relevant ids (queries without
    relevant images are not part of the solution)."""
    unknown = set(predictions) - set(solution)
    if unknown:
        raise ValueError(f"predictions for queries outside the solution, e.g. {sorted(unknown)[0]!r}")
    total = 0.0
    for q, relevant in solution.items():
        rel = set(relevant)
        if not rel:
            continue
        seen, correct, ap = set(), 0, 0.0
        for i, pred in enumerate(list(predictions.get(q, []))[:k]):
            if pred in seen:
                continue
            seen.add(pred)
            if pred in rel:
                correct += 1
                ap += correct / (i + 1)
        total += ap / min(len(rel), k)
    n = sum(1 for r in solution.values() if len(r))
    return total / n if n else float("nan")


def gap(predictions: Mapping[str, tuple[str, float]], solution: Mapping[str, Sequence[str]],
        ignore_non_landmarks: bool = False) -> float:
    """Global Average Precision (micro-AP). predictions[q] = (label, score); solution[q] = labels of q (empty
    for non-landmark queries). Ties: score desc, then query id, then label (Kaggle's convention). A query
    without a prediction costs nothing but its recall; a wrong prediction dilutes the precision.
    ignore_non_landmarks: predictions for queries without labels are left out (DELF's
    `ignore_non_gt_test_images`, "GAP ignoring non-landmark queries")."""
    unknown = set(predictions) - set(solution)
    if unknown:
        raise ValueError(f"predictions for queries outside the solution, e.g. {sorted(unknown)[0]!r}")
    n_positives = sum(1 for v in solution.values() if len(v))
    if n_positives == 0:
        return float("nan")
    items = sorted(predictions.items(), key=lambda kv: (-kv[1][1], kv[0], kv[1][0]))
    correct = total = 0
    ap = 0.0
    for q, (label, _) in items:
        if ignore_non_landmarks and not len(solution[q]):
            continue
        total += 1
        if label in set(solution[q]):
            correct += 1
            ap += correct / total
    return ap / n_positives


def top1_accuracy(predictions: Mapping[str, tuple[str, float]], solution: Mapping[str, Sequence[str]]) -> float:
    """GLDv2 recognition top-1 accuracy (DELF's `Top1Accuracy`): over the queries that have labels, the
    fraction whose prediction is one of them (no prediction = wrong)."""
    with_labels = [q for q, v in solution.items() if len(v)]
    if not with_labels:
        return float("nan")
    return sum(1 for q in with_labels if q in predictions and predictions[q][0] in set(solution[q])) / len(with_labels)


def recall_at_k(orders: np.ndarray | Sequence[np.ndarray], positives: Sequence[Sequence[int]],
                ks: Sequence[int] = (1, 10, 100, 1000)) -> dict:
    """Recall@K of metric learning (Stanford Online Products, Song et al. 2016): the fraction of queries
    with at least one positive among their first K results. Queries without positives are skipped."""
    hits = {k: 0 for k in ks}
    n = 0
    for q, order in enumerate(orders):
        ok = np.asarray(positives[q], dtype=np.int64)
        if len(ok) == 0:
            continue
        n += 1
        first = np.flatnonzero(np.isin(np.asarray(order), ok))
        for k in ks:
            hits[k] += int(len(first) > 0 and first[0] < k)
    return {f"recall_at_{k}": (hits[k] / n if n else float("nan")) for k in ks}


def knn_classify(sims: np.ndarray, neighbour_labels: np.ndarray, n_classes: int, k: int,
                 t: float) -> tuple[np.ndarray, np.ndarray]:
    """The Met's k-NN classifier (nikosips/met `KNN_Classifier`). sims / neighbour_labels: [Q x >=k], the
    similarities and labels of each query's nearest database images, best first. Per query: the best
    similarity of each label among the first k, a softmax at temperature t over those labels and every
    other class of the database at similarity 0; the prediction is the arg-max label, the confidence its
    probability. Returns (predicted labels [Q], confidences [Q])."""
    preds, confs = [], []
    for s, labs in zip(np.asarray(sims, np.float64)[:, :k], np.asarray(neighbour_labels, dtype=object)[:, :k]):
        best: dict = {}
        for sim, lab in zip(s, labs):
            best[lab] = max(best.get(lab, 0.0), sim)  # as the official code: similarities start at 0
        names = list(best)
        e = np.exp(t * np.array([best[x] for x in names]))
        p = e / (e.sum() + (n_classes - len(names)))
        i = int(p.argmax())
        preds.append(names[i])
        confs.append(float(p[i]))
    return np.array(preds, dtype=object), np.array(confs, np.float64)


def met_scores(preds: Sequence, confs: Sequence[float], truth: Sequence, distractor) -> dict:
    """The Met's three official numbers (nikosips/met `evaluate`): GAP over all queries (distractors keep
    their predictions in the ranking and are never correct; divided by the non-distractor queries), GAP
    without the distractor queries, and accuracy on the non-distractor queries. Ranking by confidence,
    ties in query order."""
    preds, truth = np.asarray(preds, dtype=object), np.asarray(truth, dtype=object)
    confs = np.asarray(confs, np.float64)
    real = truth != distractor

    def _gap(p, c, y, n):
        if n == 0:
            return float("nan")
        rel = (p == y)[np.argsort(-c, kind="stable")].astype(np.float64)
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        return float((prec * rel).sum() / n)

    return {"gap": _gap(preds, confs, truth, int(real.sum())),
            "gap_no_distractors": _gap(preds[real], confs[real], truth[real], int(real.sum())),
            "accuracy": float((preds[real] == truth[real]).mean()) if real.any() else float("nan")}

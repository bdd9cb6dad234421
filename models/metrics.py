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


def gap(predictions: Mapping[str, tuple[str, float]], solution: Mapping[str, Sequence[str]]) -> float:
    """Global Average Precision (micro-AP). predictions[q] = (label, score); solution[q] = labels of q (empty
    for non-landmark queries). Ties: score desc, then query id, then label (Kaggle's convention)."""
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
        total += 1
        if label in set(solution[q]):
            correct += 1
            ap += correct / total
    return ap / n_positives

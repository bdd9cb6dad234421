"""Re-ranking of the global top-K: global refinement, then geometric verification with local features.

1. Global refinement (`rerank.refine`, default superglobal): the candidates' stored global descriptors
   refine their similarity to the query, in the style of SuperGlobal (Shao et al., ICCV 2023): each
   candidate is averaged with its nearest other candidate among the top-K, the query is expanded with
   the top results, and the refined similarity is the mean of the two (unweighted means here). `aqe`
   is alpha query expansion instead. Cheap: a [K x K] product per query.
2. Geometric verification: putative matches are mutual nearest neighbours within `max_distance` with
   Lowe's ratio test (vectorised: one matrix product per chunk of candidates); RANSAC is OpenCV's (USAC
   MAGSAC++ by default, or classic RANSAC) with an affine model, for the candidates in parallel threads.
3. Fused score: refined similarity + w * clip(inliers - floor, 0, cap - floor) / (cap - floor), w = 0.5,
   floor = 8, cap = 70: geometric evidence adds to the global similarity instead of overriding it, and
   inliers at the chance level of unrelated real photos add nothing. DELG's order by (inliers, cos) let a
   textured negative with a few dozen spurious inliers jump over a true match seen from far apart and
   lowered mAP on real photos (BENCHMARKS.md); `rerank.score: inliers_first` restores it. Recognition
   confidences stay DELG's min(70, inliers)/70 + 0.25 cos (plain cosine).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from models.config import RerankConfig, rerank_config
from models.features import recognition_score

_METHODS = {"magsac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC}


@dataclass
class Reranked:
    order: np.ndarray        # candidate indices, new order (best first)
    inliers: np.ndarray      # [K] inliers per candidate (input order)
    scores: np.ndarray       # [K] ranking score per candidate (input order): what `order` sorts by
    recognition: np.ndarray  # [K] DELG recognition score per candidate (input order)


def fused_score(inliers: np.ndarray, similarity: np.ndarray, weight: float = 0.5, cap: int = 70,
                floor: int = 0) -> np.ndarray:
    """Global similarity plus bounded geometric evidence beyond the chance level:
    sim + weight * clip(inliers - floor, 0, cap - floor) / (cap - floor)."""
    span = float(max(1, cap - floor))
    return np.asarray(similarity, np.float64) + weight * np.clip(np.asarray(inliers) - floor, 0, span) / span


def refined_similarity(q_global: np.ndarray, cand_global: np.ndarray, cosine: np.ndarray,
                       cfg: RerankConfig) -> np.ndarray:
    """Similarity of the query to each of its top-K candidates (best first), refined with the candidates'
    own global descriptors (cfg.refine: superglobal | aqe | none). q_global [D], cand_global [K x D]
    unit vectors (a zero row for a candidate deleted meanwhile), cosine [K] -> [K]."""
    cos = np.asarray(cosine, np.float64)
    if cfg.refine == "none" or len(cos) < 2:
        return cos
    q = np.asarray(q_global, np.float64)
    c = np.asarray(cand_global, np.float64)
    k = max(1, min(cfg.refine_k, len(c)))
    if cfg.refine == "aqe":
        w = np.clip(cos[:k], 0, None) ** cfg.aqe_alpha
        return c @ _unit(q + w @ c[:k])
    if cfg.refine == "superglobal":
        near = np.argsort(-(c @ c.T), axis=1, kind="stable")[:, :k]   # itself first, then its neighbours
        refined = c[near].mean(axis=1)
        refined /= np.linalg.norm(refined, axis=1, keepdims=True).clip(min=1e-12)
        return (refined @ q + c @ _unit(q + c[:k].sum(axis=0))) / 2
    raise ValueError(f"unknown rerank.refine {cfg.refine!r}: superglobal | aqe | none")


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def ranking_score(inliers: np.ndarray, cosine: np.ndarray, cfg: RerankConfig,
                  similarity: np.ndarray | None = None) -> np.ndarray:
    """What re-ranking sorts by (ties keep the global order). fused: the (refined) similarity plus the
    geometric evidence; inliers_first: DELG's (inliers, cos) order, as a score that sorts the same way."""
    if cfg.score == "fused":
        return fused_score(inliers, cosine if similarity is None else similarity, cfg.inlier_weight,
                           cfg.inlier_cap, cfg.inlier_floor)
    if cfg.score == "inliers_first":
        return np.asarray(inliers, np.float64) + np.clip(cosine, -1, 1) * 0.25  # cos in [-1, 1]: never flips inliers
    raise ValueError(f"unknown rerank.score {cfg.score!r}: fused | inliers_first")


def mutual_matches_many(q: np.ndarray, candidates: Sequence[np.ndarray], max_distance: float,
                        max_elements: int = 1 << 24, ratio: float = 1.0) -> list[np.ndarray]:
    """Mutual nearest neighbours of one query against many candidates: one matrix product per chunk of candidates.

    q: [N x d]; candidates[c]: [M_c x d], unit float vectors or int8 as stored (pack_local: renormalised
    here, as unpack_local would) -> list of [P_c x 2] index pairs (query, candidate), by query index.
    The similarity block of a chunk is [N x C*M] (at most `max_elements` floats); a pair (i, j) is mutual when
    j is i's best in its candidate and nothing in the query is closer to j (the column maximum), the first
    such i on ties, as an argmax would pick. ratio < 1 adds Lowe's test within each candidate: the best
    match must be closer than `ratio` times the second best (an ambiguous match on a repeated texture is
    dropped). NumPy's BLAS and reductions: on AMD CPUs they are about twice as fast as torch's MKL path
    for these shapes."""
    empty = np.zeros((0, 2), np.int64)
    if len(q) == 0:
        return [empty for _ in candidates]
    qf = np.ascontiguousarray(q, dtype=np.float32)
    n, dim = qf.shape
    min_sim = 1.0 - max_distance ** 2 / 2
    sizes = [len(c) for c in candidates]
    m = max(sizes + [1])
    chunk = max(1, max_elements // (n * m))
    out: list[np.ndarray] = []
    for start in range(0, len(candidates), chunk):
        group, gsizes = candidates[start:start + chunk], sizes[start:start + chunk]
        g = len(group)
        db = np.zeros((g * m, dim), np.float32)          # zero rows pad short candidates (similarity 0)
        quantized = False
        for i, c in enumerate(group):
            db[i * m:i * m + len(c)] = c
            quantized |= c.dtype == np.int8
        if quantized:
            db /= np.sqrt(np.einsum("ij,ij->i", db, db)).clip(min=1e-6)[:, None]
        sim = qf @ db.T                                    # [N x G*M]
        nn12 = sim.reshape(n, g, m).argmax(axis=2)         # [N x G] best feature in each candidate
        cols = nn12 + np.arange(g) * m
        best = np.take_along_axis(sim, cols, axis=1)       # [N x G]
        col_max = sim.max(axis=0)                          # [G*M] best query similarity of each feature
        keep = (best >= min_sim) & (best >= col_max[cols])
        if ratio < 1.0 and m >= 2:                         # distances from similarities of unit vectors
            # the second best in each candidate: the row's maximum once its best is masked out, in place (sim
            # is not needed after this); a third of np.partition's time, the same values (ties included)
            per_candidate = sim.reshape(n, g, m)
            np.put_along_axis(per_candidate, nn12[:, :, None], -np.inf, axis=2)
            second = per_candidate.max(axis=2)
            keep &= np.sqrt(np.clip(2 - 2 * best, 0, None)) < ratio * np.sqrt(np.clip(2 - 2 * second, 0, None))
        for i in range(g):
            rows = np.flatnonzero(keep[:, i] & (nn12[:, i] < gsizes[i]))
            js = nn12[rows, i]
            _, first = np.unique(js, return_index=True)    # ties: the first query feature, as argmax
            first.sort()
            out.append(np.stack([rows[first], js[first]], axis=1).astype(np.int64) if len(rows) else empty)
    return out


def threshold_px(cfg: RerankConfig, size: tuple[int, int] | None) -> float:
    """RANSAC threshold in a candidate's original pixels. Keypoints are located to a feature-map cell of the
    image as extracted (longest side capped), so a big original needs a proportionally larger threshold."""
    if size is None:
        return cfg.ransac_threshold_px
    return cfg.ransac_threshold_px * max(1.0, max(size) / cfg.threshold_reference_px)


def _ransac_mask(q_kp: np.ndarray, c_kp: np.ndarray, m: np.ndarray, cfg: RerankConfig,
                 c_size: tuple[int, int] | None = None) -> np.ndarray:
    """[P] bool: which putative matches the affine model verifies (all False below the minimum)."""
    if len(m) < max(3, cfg.min_inliers):
        return np.zeros(len(m), bool)
    _, mask = cv2.estimateAffine2D(q_kp[m[:, 0]].astype(np.float32), c_kp[m[:, 1]].astype(np.float32),
                                   method=_METHODS[cfg.ransac], ransacReprojThreshold=threshold_px(cfg, c_size),
                                   maxIters=cfg.ransac_iters, confidence=0.999)
    keep = mask.ravel().astype(bool) if mask is not None else np.zeros(len(m), bool)
    return keep if keep.sum() >= cfg.min_inliers else np.zeros(len(m), bool)


def _ransac(q_kp: np.ndarray, c_kp: np.ndarray, m: np.ndarray, cfg: RerankConfig,
            c_size: tuple[int, int] | None = None) -> int:
    return int(_ransac_mask(q_kp, c_kp, m, cfg, c_size).sum())


class Reranker:
    def __init__(self, cfg: RerankConfig | None = None):
        self.cfg = cfg or rerank_config()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.workers))

    def inliers(self, q_kp, q_desc, candidates: Sequence[tuple]) -> np.ndarray:
        """Inliers of the query against each candidate — (keypoints, descriptors) or (keypoints, descriptors,
        (width, height) of the original) — batched matching, then RANSAC for the candidates in parallel."""
        if len(candidates) == 0:
            return np.zeros(0, np.int64)
        matches = mutual_matches_many(q_desc, [c[1] for c in candidates], self.cfg.max_distance,
                                      ratio=self.cfg.ratio)
        jobs = self._pool.map(lambda cm: _ransac(q_kp, cm[0][0], cm[1], self.cfg, cm[0][2] if len(cm[0]) > 2 else None),
                              zip(candidates, matches))
        return np.fromiter(jobs, dtype=np.int64, count=len(candidates))

    def correspondences(self, q_kp, q_desc, candidate: tuple) -> dict[str, list]:
        """The putative matches of the query against one candidate, split by the geometric check (the same
        matching and RANSAC as inliers()): {"inliers": [[qx, qy, cx, cy], ...], "outliers": [...]}, in the
        keypoints' own pixels (original-image pixels as stored)."""
        m = mutual_matches_many(q_desc, [candidate[1]], self.cfg.max_distance, ratio=self.cfg.ratio)[0]
        keep = _ransac_mask(q_kp, candidate[0], m, self.cfg, candidate[2] if len(candidate) > 2 else None)
        pairs = np.concatenate([np.asarray(q_kp, np.float32)[m[:, 0]], np.asarray(candidate[0], np.float32)[m[:, 1]]],
                               axis=1).round(1) if len(m) else np.zeros((0, 4), np.float32)
        return {"inliers": pairs[keep].tolist(), "outliers": pairs[~keep].tolist()}

    def rerank(self, q_kp, q_desc, candidates, global_scores: np.ndarray, q_global: np.ndarray | None = None,
               cand_global: np.ndarray | None = None) -> Reranked:
        """Re-order candidates (already the global top-K, best first) by ranking_score(); with the query's
        and the candidates' global descriptors, their similarities are refined first (cfg.refine)."""
        inl = self.inliers(q_kp, q_desc, candidates)
        cos = np.asarray(global_scores, np.float64)
        sim = cos if q_global is None or cand_global is None else refined_similarity(q_global, cand_global, cos, self.cfg)
        score = ranking_score(inl, cos, self.cfg, sim)
        return Reranked(np.argsort(-score, kind="stable"), inl, score, recognition_score(inl, cos))

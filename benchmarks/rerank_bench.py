"""Re-ranking: ilr (vectorised mutual-NN matching + OpenCV MAGSAC affine, parallel candidates) against the
reference algorithm of the DELG code (scipy cKDTree distance-bound matching + scikit-image affine RANSAC,
1000 trials), on the same local features of the same queries.

Run: .venv/bin/python benchmarks/rerank_bench.py [--queries 12] [--features 500]
Targets: <= 300 ms per query (median) for 100 candidates x 500 features; >= 10x faster than the reference;
re-ranked mAP within 1 point of the reference's. Also: compact (int8) local features lose <= 1 mAP point.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import features, small_dataset, split  # noqa: E402
from models.artifacts import off_the_shelf  # noqa: E402
from models.config import ExtractConfig, RerankConfig  # noqa: E402
from models.evaluate import rank  # noqa: E402
from models.extract import Extractor  # noqa: E402
from models.features import pack_local, unpack_local  # noqa: E402
from models.metrics import retrieval_map  # noqa: E402
from models.rerank import Reranker  # noqa: E402


def reference_inliers(q_kp, q_desc, c_kp, c_desc, threshold=0.9, residual=20.0, trials=1000) -> int:
    """The DELG reference: cKDTree with a distance bound, then skimage RANSAC with an affine model."""
    from scipy.spatial import cKDTree
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    tree = cKDTree(c_desc)
    dist, idx = tree.query(q_desc, distance_upper_bound=threshold)
    ok = np.isfinite(dist)
    if ok.sum() <= 3:
        return 0
    src, dst = q_kp[ok], c_kp[idx[ok]]
    _, inliers = ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=residual,
                        max_trials=trials, rng=0)
    return int(inliers.sum()) if inliers is not None else 0


def reorder(orders, sims, qi, k, inliers):
    top = orders[qi, :k]
    new = top[np.lexsort((-sims[qi, top], -inliers))]
    return np.concatenate([new, orders[qi, k:]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=12, help="queries timed with the (slow) reference")
    ap.add_argument("--features", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--ransac", nargs="+", default=["magsac", "ransac"],
                    help="OpenCV RANSAC variants to compare (the first is timed against the reference)")
    args = ap.parse_args()
    folder, df = small_dataset("small")
    index, queries, positives = split(df)
    ecfg = ExtractConfig(max_local_features=args.features, max_side_px=384)
    idx_f, q_f = features(Extractor(off_the_shelf(), ecfg), folder, df, f"small-ots-{args.features}")
    orders, sims = rank(np.stack([f.global_desc for f in q_f]), np.stack([f.global_desc for f in idx_f]))
    k = min(args.top_k, len(index))
    nq = min(args.queries, len(queries))
    feats = lambda fs, compact: [unpack_local(*pack_local(f)) if compact else (f.keypoints, f.descriptors) for f in fs]
    db32, q32 = feats(idx_f, False), feats(q_f, False)
    db8, q8 = feats(idx_f, True), feats(q_f, True)
    def run_ours(qs, db, n, method):
        rr = Reranker(RerankConfig(top_k=k, ransac=method))
        for qi in range(2):  # warm-up
            rr.inliers(*qs[qi], [db[j] for j in orders[qi, :k]])
        times, new = [], orders.copy()
        for qi in range(n):
            t0 = time.perf_counter()
            inl = rr.inliers(*qs[qi], [db[j] for j in orders[qi, :k]])
            times.append(time.perf_counter() - t0)
            new[qi] = reorder(orders, sims, qi, k, inl)
        return times, new

    variants = {}
    for method in args.ransac:
        variants[method] = run_ours(q32, db32, len(queries), method), run_ours(q8, db8, len(queries), method)
    (ours_t, ours_orders), (_, ours8_orders) = variants[args.ransac[0]]
    ref_t, ref_orders = [], orders.copy()
    for qi in range(nq):
        t0 = time.perf_counter()
        inl = np.array([reference_inliers(*q32[qi], *db32[j]) for j in orders[qi, :k]])
        ref_t.append(time.perf_counter() - t0)
        ref_orders[qi] = reorder(orders, sims, qi, k, inl)
    m = lambda o, n: 100 * retrieval_map(o[:n], positives[:n])["map"]
    n_feat = int(np.median([len(f.keypoints) for f in idx_f]))
    print(f"{len(queries)} queries x top-{k} candidates, median {n_feat} local features per image "
          f"(off-the-shelf lite0, {q32[0][1].shape[1]}-d)")
    print(f"global only mAP: {m(orders, len(queries)):.2f}")
    for method, ((t32, o32), (t8, o8)) in variants.items():
        print(f"ilr rerank ({method}): median {1000 * statistics.median(t32):.0f} ms/query (p90 "
              f"{1000 * np.percentile(t32, 90):.0f}; int8 features {1000 * statistics.median(t8):.0f}); "
              f"mAP float32 {m(o32, len(queries)):.2f}, int8 {m(o8, len(queries)):.2f}")
    print(f"on the {nq} queries timed with the reference: ilr ({args.ransac[0]}) median {1000 * statistics.median(ours_t[:nq]):.0f} ms, "
          f"reference median {1000 * statistics.median(ref_t):.0f} ms -> "
          f"{statistics.median(ref_t) / statistics.median(ours_t[:nq]):.1f}x; "
          f"mAP ilr {m(ours_orders, nq):.2f} vs reference {m(ref_orders, nq):.2f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

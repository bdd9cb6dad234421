"""Milvus Lite top-100 search on 100k x D vectors: latency per query and recall@100 against exact search.

Run: .venv/bin/python benchmarks/milvus_bench.py [--n 100000] [--dim 512] [--queries 200] [--ef 128 256]
Target (retrieval-service issue): p50 <= 10 ms per query, recall@100 >= 0.95.
Vectors are clustered unit vectors (instances with several views), which is harder for ANN than
uniform noise; queries are new views of indexed instances. Runs in a temporary Milvus Lite data dir,
sealed (flushed and loaded, so every segment has its HNSW index) as `ilr index build` leaves it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.index import IndexConfig, VectorIndex  # noqa: E402


def clustered(n: int, dim: int, seed: int = 0, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n/5 instance centres (views of an instance); pass `centres` for new views of
    the same instances — queries of indexed instances, as the service sees them."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(size=(n // 5, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), centres


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--index-type", default="HNSW")
    args = ap.parse_args()
    x, centres = clustered(args.n, args.dim)
    q, _ = clustered(args.queries, args.dim, seed=1, centres=centres)
    tmp = tempfile.mkdtemp(prefix="ilr-milvus-")
    index = VectorIndex.connect("bench", uri=os.path.join(tmp, "milvus.db"))
    index.create(args.dim, IndexConfig(index_type=args.index_type))
    t0 = time.perf_counter()
    for start in range(0, args.n, 5000):
        index.insert([{"image_id": f"i{i}", "label": "x", "domain": "other", "vector": x[i].tolist()}
                      for i in range(start, min(args.n, start + 5000))])
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.seal()  # flush + load: every segment gets its HNSW index now (as `ilr index build` does)
    index.search(q[:1], 100)
    load_s = time.perf_counter() - t0
    exact = np.argsort(-(q @ x.T), axis=1)[:, :100]
    print(f"{args.n} x {args.dim} {args.index_type}: insert {insert_s:.1f}s, load/build {load_s:.1f}s")
    for ef in args.ef:
        lat, rec = [], []
        for i in range(len(q)):
            t0 = time.perf_counter()
            hits = index.search(q[i:i + 1], 100, ef)[0]
            lat.append(1000 * (time.perf_counter() - t0))
            rec.append(len({f"i{j}" for j in exact[i]} & {h["image_id"] for h in hits}) / 100)
        print(f"  ef {ef}: p50 {statistics.median(lat):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
              f"recall@100 {np.mean(rec):.4f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

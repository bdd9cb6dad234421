"""Milvus top-100 search on 100k x D vectors: latency per query and recall@100 against exact search,
through ilr's own `VectorIndex` (the Searcher's code path), for Milvus Lite and a Milvus standalone server.

Run: .venv/bin/python benchmarks/milvus_bench.py [--n 100000] [--dim 512] [--queries 100] [--ef 128 256]
         [--server lite standalone] [--data hierarchical flat]
Target (retrieval-service issue): p50 <= 10 ms per query, recall@100 >= 0.95.

Servers:
- lite: Milvus Lite 3.2 (ilr's default: in-process, `$ILR_HOME/milvus.db`).
- standalone: a real Milvus standalone server (Milvus 2.3.5, C++/Knowhere; the `milvus` package from the
  dev extra runs its binary without Docker). That server listens on every interface, so the benchmark
  re-runs itself in a private network namespace (`unshare -rn`: only a loopback device exists) — nothing
  outside this process tree can reach it. Against your own server use `--uri http://HOST:19530`.

Data (unit vectors; queries are new views of indexed instances, as the service sees them):
- hierarchical: n/200 scene types x 40 instances x 5 views — instances of a type resemble each other, as
  landmark/artwork descriptors do (churches look like churches), so a query's top-100 are its own views
  and its type's nearest instances.
- flat: n/5 unrelated instances x 5 views. The worst case for any ANN index: beyond a query's ~5 own
  views, its "exact top-100" are 95 random vectors at near-equal similarity (cos ~0 +- 0.04), whose order
  no index can recover without scanning everything. Reported to show that bound, not as a service figure.
Every index is sealed (flushed, its ANN index built and loaded) as `ilr index build` leaves it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.config import IndexConfig  # noqa: E402
from serving.vectors import VectorIndex  # noqa: E402

NETNS_FLAG = "ILR_BENCH_PRIVATE_NETNS"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(index vectors [n, dim], query vectors [n_queries, dim]): 5 views per instance; queries are new views
    of random indexed instances."""
    rng = np.random.default_rng(seed)
    n_inst = n // 5
    if kind == "flat":
        inst = rng.normal(size=(n_inst, dim)).astype(np.float32)
    elif kind == "hierarchical":
        types = rng.normal(size=(max(1, n_inst // 40), dim)).astype(np.float32)
        inst = types[np.arange(n_inst) % len(types)] + 0.8 * rng.normal(size=(n_inst, dim)).astype(np.float32)
    else:
        raise ValueError(kind)

    def views(which: np.ndarray) -> np.ndarray:
        return _unit(inst[which] + 0.35 * rng.normal(size=(len(which), dim)).astype(np.float32))

    return views(np.arange(n) % n_inst), views(rng.integers(0, n_inst, n_queries))


@contextmanager
def standalone_server(base: Path):
    """A Milvus standalone server on loopback; only inside the private network namespace."""
    try:
        from milvus import MilvusServer
    except ImportError as e:
        raise SystemExit("the `milvus` package is missing: ./scripts/venv.sh installs it (dev extra)") from e
    server = MilvusServer()
    server.set_base_dir(str(base))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


@contextmanager
def server_uri(kind: str, base: Path, uri: str | None):
    if uri:
        yield uri
    elif kind == "lite":
        yield str(base / "milvus.db")  # Milvus Lite in-process, as `ilr` uses it by default
    else:
        with standalone_server(base) as u:
            yield u


def run(server: str, data: str, args, base: Path) -> list[str]:
    x, q = make_data(data, args.n, args.dim, args.queries)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :100]
    out = []
    work = base / f"{server}-{data}"
    work.mkdir()
    with server_uri(server, work, args.uri) as uri:
        index = VectorIndex.connect(f"bench_{data}", uri=uri)
        if index.client.has_collection(index.name):
            index.client.drop_collection(index.name)
        index.create(args.dim, IndexConfig(index_type="HNSW", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction))
        t0 = time.perf_counter()
        for start in range(0, args.n, 5000):
            index.insert([{"image_id": f"i{i}", "label": "x", "domain": "other", "vector": x[i].tolist()}
                          for i in range(start, min(args.n, start + 5000))])
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.seal()  # flush, wait for the server's index build, load
        index.search(q[:1], 100)
        out.append(f"{server:10s} {data:12s} {args.n} x {args.dim} HNSW M {args.hnsw_m} efC {args.ef_construction}: "
                   f"insert {insert_s:.0f} s, flush + index + load {time.perf_counter() - t0:.0f} s")
        print(out[-1], flush=True)
        for ef in args.ef:
            lat, rec = [], []
            for i in range(len(q)):
                t0 = time.perf_counter()
                hits = index.search(q[i:i + 1], 100, ef)[0]
                lat.append(1000 * (time.perf_counter() - t0))
                rec.append(len({f"i{j}" for j in exact[i]} & {h["image_id"] for h in hits}) / 100)
            out.append(f"    ef {ef:4d}: p50 {statistics.median(lat):6.1f} ms, p99 {np.percentile(lat, 99):6.1f} ms, "
                       f"recall@100 {np.mean(rec):.4f}")
            print(out[-1], flush=True)
        index.client.drop_collection(index.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--ef", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--server", nargs="+", default=["lite", "standalone"], choices=["lite", "standalone"])
    ap.add_argument("--data", nargs="+", default=["hierarchical", "flat"], choices=["hierarchical", "flat"])
    ap.add_argument("--uri", help="an existing Milvus server instead (then --server only labels the rows)")
    args = ap.parse_args()
    if "standalone" in args.server and not args.uri and os.environ.get(NETNS_FLAG) != "1":
        # re-run in a private network namespace (only loopback) so the server is unreachable from outside
        env = {**os.environ, NETNS_FLAG: "1"}
        cmd = ["unshare", "-rn", sys.executable, *sys.argv]
        try:
            sys.exit(subprocess.call(cmd, env=env))
        except FileNotFoundError as e:
            raise SystemExit("`unshare` is missing; run with --server lite, or --uri for your own server") from e
    if os.environ.get(NETNS_FLAG) == "1":
        r = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"cannot bring up loopback in the private network namespace: {r.stderr.strip()}")
    base = Path(tempfile.mkdtemp(prefix="ilr-milvus-bench-"))
    lines = []
    try:
        for data in args.data:
            for server in args.server:
                lines += run(server, data, args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\nsummary")
    print("\n".join(lines))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

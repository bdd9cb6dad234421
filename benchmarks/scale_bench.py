"""Scale figures for docs/scaling.md ("Not yet measured"): a Milvus server at 1M x 512 under HNSW and the
compressed index types, the local-feature store at 100k images, and index build throughput at 1k and 10k.

Run: .venv/bin/python benchmarks/scale_bench.py milvus [--n 1000000] [--queries 200]
         [--index HNSW IVF_SQ8 IVF_PQ DISKANN] [--ef-construction 128] [--ef 128] [--nprobe 32] [--nlist N]
     .venv/bin/python benchmarks/scale_bench.py store [--n 100000] [--draws 200] [--candidates 100]
     .venv/bin/python benchmarks/scale_bench.py build [--n 1000 10000] [--engines local ray] [--raw]
     .venv/bin/python benchmarks/scale_bench.py all     (the three at these full defaults, in sequence)
Each prints a table and writes its figures as JSON (--out; default a new file in the temp folder). On 2
cores the full run takes most of a day (the two 10k-image builds about 1 h, each 1M-vector index build up to
hours); milvus at 1M needs ~9 GB of memory to make its vectors, beside the server.

- milvus: the Milvus 2.3.5 standalone of milvus_bench.py in a private network namespace (`unshare -rn`, only
  loopback), with its `hierarchical` unit vectors (clustered as real descriptors are). Per index type: ilr's
  collection schema, inserts of --batch rows (rows/s), flush + the server's index build; then the server is
  restarted on the same data, so that its memory holds nothing of the build, and memory = RSS of its
  process tree after `load_collection` minus before (psutil; +-10 MB of noise), beside the expected size
  (HNSW: vectors + 2M links; SQ8: 1 byte per dim; PQ: m=64 x 8 bits = 64 bytes per vector, 1/32 of raw;
  DiskANN: PQ codes 0.125x + cache 0.1x raw, graph on disk). Top-100 one query at a time (with label and
  domain, as the Searcher asks): p50/p99 ms, recall@100 against exact inner-product top-100 (numpy, in
  chunks). IVF nlist 4*sqrt(n) by default: Milvus builds one index per sealed segment (<= 512 MB, ~250k
  512-d rows), so each segment gets nlist lists. Each collection is dropped before the next.
- store: `LocalFeatureStore.add_packed` (what a build writes) of --features keypoints per image: uint16
  keypoints, int8 descriptors of the default model's local dim, float32 global vectors; images/s, bytes on
  disk; then `get_many` of --candidates random ids, alone (it returns memory-mapped views) and with every
  byte read (as the re-ranker reads them), cold (a fresh store, the feature files dropped from the page
  cache with posix_fadvise(DONTNEED) before each draw; `fincore` checks the first) and warm.
- build: `ilr index build` (Milvus Lite, off-the-shelf model, default extraction settings) of a generated
  dataset of exactly n index images, from an empty workspace per engine, as index_bench.py; images/s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.milvus_bench import NETNS_FLAG, make_data, standalone_server  # noqa: E402

TOP_K = 100
PQ_M = 64  # IVF_PQ sub-quantizers: 8 dims each at 512-d, 8 bits each
MB = 2 ** 20
INDEX_TYPES = ("HNSW", "IVF_SQ8", "IVF_PQ", "DISKANN")
FEATURE_FILES = ("keypoints.u16", "descriptors.i8", "global.f32")  # LocalFeatureStore's files


def percentiles(ms: list[float], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}p50_ms": statistics.median(ms), f"{prefix}p99_ms": float(np.percentile(ms, 99))}


def report(command: str, args: argparse.Namespace, columns: list[str], rows: list[dict], notes: list[str]) -> None:
    """Print the notes and rows as a table; write everything as JSON to --out (else a new file)."""
    table = [columns] + [[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in (r.get(c, "") for c in columns)]
                         for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print("\n".join([*notes, *("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)]))
    machine = {"arch": platform.machine(), "cores": os.cpu_count()}
    print(f"machine: {machine['arch']}, {machine['cores']} cores")
    out = args.out or Path(tempfile.gettempdir()) / f"ilr-scale-{command}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with open(out, "w" if args.out else "x") as fh:  # the default: never through a file or link already there
        json.dump({"command": command, "args": {k: v for k, v in vars(args).items() if k != "func"},
                   "machine": machine, "notes": notes, "results": rows}, fh, indent=1, default=str)
    print(f"results: {out}")


# ---- milvus ----------------------------------------------------------------------------------------------

def index_params(kind: str, n: int, args) -> tuple[dict, dict, float]:
    """(build params, search params, expected bytes in memory) of one index type over n x dim vectors."""
    d, nlist = args.dim, args.nlist or int(4 * math.sqrt(n))
    return {"HNSW": ({"M": args.hnsw_m, "efConstruction": args.ef_construction}, {"ef": max(args.ef, TOP_K)},
                     n * (4 * d + 8 * args.hnsw_m)),
            "IVF_SQ8": ({"nlist": nlist}, {"nprobe": args.nprobe}, n * (d + 8) + 4 * nlist * d),
            "IVF_PQ": ({"nlist": nlist, "m": PQ_M, "nbits": 8}, {"nprobe": args.nprobe},
                       n * (PQ_M + 8) + 4 * (nlist + 256) * d),
            "DISKANN": ({}, {"search_list": max(args.ef, TOP_K)}, 0.225 * n * d * 4)}[kind]


def exact_top(x: np.ndarray, q: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """[len(q), TOP_K] exact inner-product top ids, best first, over x in chunks (1M x 512 fits)."""
    ids, scores = [], []
    for start in range(0, len(x), chunk):
        s = q @ x[start:start + chunk].T
        top = np.argpartition(-s, min(TOP_K, s.shape[1] - 1), axis=1)[:, :TOP_K]
        ids.append(top + start)
        scores.append(np.take_along_axis(s, top, axis=1))
    ids, scores = np.concatenate(ids, axis=1), np.concatenate(scores, axis=1)
    return np.take_along_axis(ids, np.argsort(-scores, axis=1)[:, :TOP_K], axis=1)


def server_rss() -> int:
    """RSS of the Milvus server's process tree: the `milvus` processes under this one, and their children."""
    import psutil

    tree = {}
    for p in psutil.Process().children(recursive=True):
        if p.name().startswith("milvus"):
            tree.update((c.pid, c) for c in [p, *p.children(recursive=True)])
    return sum(c.memory_info().rss for c in tree.values())


def wait_indexed(client, name: str, log: Path, timeout_s: float) -> None:
    """Until the server has indexed every row. A build the server fails it retries for ever, saying so only
    in its log: an error here."""
    deadline, seen = time.monotonic() + timeout_s, 0
    while True:
        info = client.describe_index(name, "vector") or {}
        if not info.get("pending_index_rows") and info.get("indexed_rows", 0) >= info.get("total_rows", 1):
            return
        with open(log, errors="replace") as fh:
            fh.seek(seen)
            new, seen = fh.read(), fh.tell()
        if failed := re.search(r'failed to create index, ([^\\"]+)', new):
            raise RuntimeError(f"the server fails to build it: {failed.group(1).strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not indexed within {timeout_s:.0f} s")
        time.sleep(1)


def bench_index(kind: str, x: np.ndarray, q: np.ndarray, exact: np.ndarray, args, work: Path) -> dict:
    from serving.config import IndexConfig
    from serving.vectors import VectorIndex, milvus_client

    build_p, search_p, expected = index_params(kind, len(x), args)
    name = f"scale_{kind.lower()}"
    row = {"index": kind, "build": build_p, "search": search_p, "raw MB": x.nbytes / MB, "expected MB": expected / MB}
    with standalone_server(work) as uri:
        index = VectorIndex.connect(name, uri=uri)
        index.create(x.shape[1], IndexConfig())  # ilr's schema; its HNSW index is replaced by this kind's
        c = index.client
        c.release_collection(name)
        c.drop_index(name, "vector")
        params = c.prepare_index_params()
        params.add_index(field_name="vector", index_type=kind, metric_type="IP", params=build_p)
        c.create_index(name, params)
        t0 = time.perf_counter()
        for s in range(0, len(x), args.batch):
            index.insert([{"image_id": f"i{i}", "label": "x", "domain": "other", "vector": x[i].tolist()}
                          for i in range(s, min(len(x), s + args.batch))])
        row["insert rows/s"], t0 = len(x) / (time.perf_counter() - t0), time.perf_counter()
        c.flush(name)
        wait_indexed(c, name, work / "logs" / "milvus-stdout.log", args.build_timeout)
        row["flush+index s"] = time.perf_counter() - t0
    with standalone_server(work) as uri:  # restarted on the same data: nothing of the build in its memory
        c = milvus_client(uri)
        time.sleep(5)
        before, t0 = server_rss(), time.perf_counter()
        c.load_collection(name)
        row["load s"] = time.perf_counter() - t0
        time.sleep(3)
        row.update({"RSS before MB": before / MB, "RSS loaded MB": server_rss() / MB,
                    "segments": len(c.list_loaded_segments(name))})
        row["memory MB"] = row["RSS loaded MB"] - row["RSS before MB"]

        def search(v: np.ndarray) -> list[dict]:
            return c.search(name, data=[v.tolist()], limit=TOP_K, output_fields=["label", "domain"],
                            search_params={"metric_type": "IP", "params": search_p})[0]

        for v in q[:5]:  # warm-up
            search(v)
        lat, rec = [], []
        for v, e in zip(q, exact):
            t0 = time.perf_counter()
            hits = search(v)
            lat.append(1000 * (time.perf_counter() - t0))
            rec.append(len({f"i{j}" for j in e} & {h["id"] for h in hits}) / TOP_K)
        row.update(percentiles(lat), **{"recall@100": float(np.mean(rec)), "RSS searched MB": server_rss() / MB})
        c.drop_collection(name)
    return row


def cmd_milvus(args) -> None:
    if os.environ.get(NETNS_FLAG) != "1":  # the server listens on every interface: only loopback may exist
        if not shutil.which("unshare"):
            sys.exit("`unshare` is missing: the Milvus server must not run in this machine's network namespace")
        child = subprocess.Popen(["unshare", "-rn", sys.executable, *sys.argv], env={**os.environ, NETNS_FLAG: "1"})
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # passed on: the child stops its server
        sys.exit(child.wait())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so that the server is stopped
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["QUERYNODE_ENABLEDISK"] = "true"  # queryNode.enableDisk (the yaml says false) for DiskANN, as
    # Milvus reads settings from the environment too (unverified: this server build fails to build DiskANN)
    t0 = time.perf_counter()
    x, q = make_data("hierarchical", args.n, args.dim, args.queries)
    exact = exact_top(x, q)
    notes = [f"Milvus 2.3.5 standalone, {args.n:,} x {args.dim} hierarchical unit vectors, {args.queries} queries "
             f"one at a time, top-{TOP_K}, inner product; data + exact search {time.perf_counter() - t0:.0f} s"]
    rows, base = [], Path(tempfile.mkdtemp(prefix="ilr-scale-milvus-"))
    try:
        for kind in args.index:
            for attempt in (1, 2):
                try:
                    rows.append(bench_index(kind, x, q, exact, args, base / f"{kind}-{attempt}"))
                except Exception as e:  # noqa: BLE001 (e.g. a type the server cannot build: the others run)
                    if attempt == 1 and "not startd" in str(e):  # a start on a busy machine took over 180 s
                        continue
                    rows.append({"index": kind, "error": f"{type(e).__name__}: {e}"[:300]})
                    notes.append(f"{kind}: {rows[-1]['error']}")
                break
            print(json.dumps(rows[-1], default=str), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report("milvus", args, ["index", "insert rows/s", "flush+index s", "load s", "segments", "p50_ms", "p99_ms",
                            "recall@100", "memory MB", "expected MB", "raw MB"], rows, notes)


# ---- local-feature store ---------------------------------------------------------------------------------

def model_dims() -> tuple[int, int]:
    """(local descriptor dim, global descriptor dim) of the default model (params.yaml `model`)."""
    from models.config import model_config
    from models.delg import DELG

    m = DELG(model_config(), load_pretrained=False)
    local = m.backbone.feature_info.channels()[0] if m.cfg.local_descriptors == "backbone" else m.local_dim
    return local, m.descriptor_dim


def evict(folder: Path, check: bool = False) -> float | None:
    """Drop the feature files from the page cache; with check, the share of their bytes still resident."""
    for name in FEATURE_FILES:
        fd = os.open(folder / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if not check or not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          *[str(folder / n) for n in FEATURE_FILES]], check=True, capture_output=True, text=True)
    return sum(map(int, out.stdout.split())) / sum((folder / n).stat().st_size for n in FEATURE_FILES)


def time_draws(folder: Path, draws: list[list[str]], cold: bool) -> dict:
    """p50/p99 of get_many alone and with the bytes read, over the draws."""
    from serving.store import LocalFeatureStore

    warm = None if cold else LocalFeatureStore(folder)
    for ids in draws if warm else ():  # every page into the cache first
        [np.array(f[1]) for f in warm.get_many(ids)]
    lookup, read = [], []
    for ids in draws:
        store = warm or LocalFeatureStore(folder)  # cold: a fresh store, so that no page is mapped
        if cold:
            evict(folder)
        t0 = time.perf_counter()
        feats = store.get_many(ids)
        t1 = time.perf_counter()
        [(np.array(kp), np.array(desc)) for kp, desc, _ in feats]
        lookup.append(1000 * (t1 - t0))
        read.append(1000 * (time.perf_counter() - t0))
        del feats  # its views map the files
    return {"cache": "cold" if cold else "warm", **percentiles(lookup, "get_many "), **percentiles(read, "+read ")}


def cmd_store(args) -> None:
    from serving.store import LocalFeatureStore

    d, g = (args.local_dim, args.global_dim) if args.local_dim and args.global_dim else model_dims()
    rng = np.random.default_rng(0)
    pool = []  # a few images, written round-robin (their content does not change the cost)
    for desc, glob in ((rng.normal(size=(args.features, d)), rng.normal(size=g)) for _ in range(8)):
        pool.append((rng.integers(0, 384, (args.features, 2)).astype(np.uint16),
                     np.rint(127 * desc / np.linalg.norm(desc, axis=1, keepdims=True)).astype(np.int8),
                     (glob / np.linalg.norm(glob)).astype(np.float32)))
    folder = Path(tempfile.mkdtemp(prefix="ilr-scale-store-", dir=args.dir or None))
    try:
        store, t0 = LocalFeatureStore(folder), time.perf_counter()
        for i in range(args.n):
            store.add_packed(f"img{i:07d}", *pool[i % len(pool)], (384, 288))
        write_s = time.perf_counter() - t0
        store.close()
        for p in folder.iterdir():  # on disk, so that eviction can drop the pages
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        total, features = (sum(p.stat().st_size for p in paths) for paths in
                           (list(folder.iterdir()), [folder / n for n in FEATURE_FILES]))
        draws = [[f"img{i:07d}" for i in rng.choice(args.n, min(args.candidates, args.n), replace=False)]
                 for _ in range(args.draws)]
        resident = evict(folder, check=True)
        rows = [time_draws(folder, draws, cold) for cold in (True, False)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cold = "not checked (no fincore)" if resident is None else f"{100 * resident:.1f}% of the feature bytes resident"
    notes = [f"local-feature store: {args.n:,} images x {args.features} features, local d={d} (int8, uint16 "
             f"keypoints), global {g} float32",
             f"write: {args.n / write_s:,.0f} images/s ({write_s:.1f} s); on disk {total / MB:,.1f} MB, "
             f"{total / args.n / 1024:.1f} KiB/image (feature files {features / args.n / 1024:.1f}, expected "
             f"{(args.features * (4 + d) + 4 * g) / 1024:.1f})",
             f"get_many of {args.candidates} random ids, {args.draws} draws; cold after eviction: {cold}"]
    for r in rows:
        r.update(images_per_s=args.n / write_s, disk_bytes=total, feature_bytes=features, local_dim=d,
                 global_dim=g, cold_resident_share=resident)
    report("store", args, ["cache", "get_many p50_ms", "get_many p99_ms", "+read p50_ms", "+read p99_ms"], rows, notes)


# ---- index build -----------------------------------------------------------------------------------------

def dataset_of(n: int) -> Path:
    """A generated dataset of exactly n index images (2 views of n/4 instances, n/2 distractors), cached."""
    from benchmarks.common import CACHE
    from data import manifest, synthetic

    folder = CACHE / f"synthetic-scale{n}-0"
    if not (folder / manifest.MANIFEST).exists():
        synthetic.generate(folder, synthetic.SyntheticSpec(
            train_classes=3, eval_instances=n // 4, train_views=3, index_views=2, query_views=1,
            distractors=n - 2 * (n // 4), image_px=384), seed=0, workers=2)
    return folder


def cmd_build(args) -> None:
    rows = []
    for n in args.n:
        src = dataset_of(n)  # in the bench cache of the caller's workspace, before ILR_HOME moves
        root = Path(tempfile.mkdtemp(prefix="ilr-scale-build-"))
        try:
            (root / "repo").mkdir()
            for git in (["init", "-q"], ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q",
                                         "--allow-empty", "-m", "init"]):
                subprocess.run(["git", *git], cwd=root / "repo", check=True)
            os.environ.update(ILR_REPO=str(root / "repo"), ILR_HOME=str(root / "home"),
                              ILR_PARAMS=str(root / "defaults.yaml"))  # no such file: every setting's default
            from data import manifest
            from data.versioning import dataset_dir, ingest
            from models.config import ExtractConfig
            from serving.index import build

            ingest("synthetic", str(src), "scale", log=lambda *_: None)
            if args.raw:
                from models.artifacts import off_the_shelf
                from models.extract import Extractor

                df = manifest.read(folder := dataset_dir("scale")[1])
                paths, t0 = [folder / p for p in df[df["split"] == "index"]["path"]], time.perf_counter()
                Extractor(off_the_shelf(), ExtractConfig()).extract(paths)
                rows.append({"n": n, "what": "raw extraction", "images": len(paths), "s": time.perf_counter() - t0})
            for engine in args.engines:
                shutil.copytree(root / "home", root / f"home-{engine}")
                os.environ["ILR_HOME"], t0 = str(root / f"home-{engine}"), time.perf_counter()
                res = build("scale", "off-the-shelf", ecfg=ExtractConfig(), log_fn=lambda *_: None, engine=engine)
                rows.append({"n": n, "what": f"index build ({engine})", "images": res.added,
                             "s": time.perf_counter() - t0})
                print(rows[-1], flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for r in rows:
        r["images/s"] = r["images"] / r["s"]
    notes = ["`ilr index build` of generated datasets (384 px): off-the-shelf model, default extraction settings, "
             "Milvus Lite, each build from an empty workspace"]
    report("build", args, ["n", "what", "images", "s", "images/s"], rows, notes)


def cmd_all(args) -> None:
    """The three at their full defaults, each in its own process (milvus re-runs itself in a namespace)."""
    failed = []
    for command in ("milvus", "store", "build"):
        print(f"\n== {command}", flush=True)
        if subprocess.run([sys.executable, __file__, command]).returncode:
            failed.append(command)
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)


def options(p: argparse.ArgumentParser, helps: dict[str, str], **defaults) -> None:
    for name, default in defaults.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=helps.get(name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(required=True)
    m = sub.add_parser("milvus", help="Milvus server: insert, index build, memory, top-100 latency and recall")
    options(m, {"ef": "HNSW ef and DiskANN search_list (ilr's index.ef_search)", "nlist": "IVF lists per segment; "
                "0 = 4*sqrt(n)", "batch": "rows per insert", "build_timeout": "seconds per index build"},
            n=1_000_000, dim=512, queries=200, hnsw_m=16, ef_construction=128, ef=128, nlist=0, nprobe=32,
            batch=5000, build_timeout=6 * 3600.0)
    m.add_argument("--index", nargs="+", default=list(INDEX_TYPES), choices=INDEX_TYPES)
    s = sub.add_parser("store", help="local-feature store: write rate, bytes on disk, get_many latency")
    options(s, {"features": "keypoints per image (ilr's CPU default)", "local_dim": "with --global-dim; 0 = the "
                "default model's", "dir": "where the store is written (default: the temp folder)"},
            n=100_000, features=500, candidates=100, draws=200, local_dim=0, global_dim=0, dir="")
    b = sub.add_parser("build", help="index build throughput per engine and size")
    b.add_argument("--n", type=int, nargs="+", default=[1000, 10_000])
    b.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    b.add_argument("--raw", action="store_true", help="also raw extraction over the same images")
    for p, func in ((m, cmd_milvus), (s, cmd_store), (b, cmd_build)):
        p.add_argument("--out", type=Path, help="JSON results (default: a new file in the temp folder)")
        p.set_defaults(func=func)
    sub.add_parser("all", help="milvus, store and build at their full defaults").set_defaults(func=cmd_all)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

"""Load test of /v1/search on a running service (loopback only; bounded in count and time).

    .venv/bin/ilr serve --background            # or after ./scripts/demo, which leaves it running
    .venv/bin/python benchmarks/load_test.py --dataset synthetic-small --concurrency 4 --duration 120

Queries are the dataset's query images resized so their longest side is --side px (384-512), sent as
multipart with re-ranking on. Reports p50/p90/p99 latency, throughput, errors, and the resident memory of
the Serve replicas sampled during the run (first vs last 20%: "memory flat").
"""
from __future__ import annotations

import argparse
import io
import json
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from data import manifest
from data.versioning import dataset_dir


def replica_rss_mb() -> float:
    import psutil

    total = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            name = " ".join(p.info["cmdline"] or []) + (p.info["name"] or "")
            if "ServeReplica" in name or "ServeController" in name or "ProxyActor" in name:
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 1e6


def queries(dataset: str, side: int, n: int) -> list[bytes]:
    _, folder = dataset_dir(dataset)
    df = manifest.read(folder)
    out = []
    for path in df[df["split"] == "query"]["path"].head(n):
        img = Image.open(folder / path).convert("RGB")
        s = side / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(url: str, images: list[bytes], concurrency: int, duration: float, max_requests: int, top_k: int) -> dict:
    lat, errors, lock, stop = [], [], threading.Lock(), threading.Event()
    stages: dict[str, list[float]] = {}
    count = [0]

    def worker(i: int):
        with httpx.Client(base_url=url, timeout=60) as http:
            j = i
            while not stop.is_set():
                with lock:
                    if count[0] >= max_requests:
                        return
                    count[0] += 1
                t = time.perf_counter()
                try:
                    r = http.post("/v1/search", files={"image": ("q.jpg", images[j % len(images)])},
                                  data={"top_k": str(top_k), "rerank": "true"})
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    ok, r = False, e
                with lock:
                    (lat if ok else errors).append((time.perf_counter() - t) if ok else str(getattr(r, "status_code", r)))
                    if ok:
                        for k, v in r.json()["timings_ms"].items():
                            stages.setdefault(k, []).append(v)
                j += concurrency

    mem = []
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while time.perf_counter() - t0 < duration and any(t.is_alive() for t in threads):
        mem.append(replica_rss_mb())
        time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    k = max(1, len(mem) // 5)
    return {"requests": len(lat) + len(errors), "errors": len(errors), "error_samples": errors[:5],
            "seconds": round(wall, 1), "qps": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(a, 50)), 1) if len(a) else None,
            "p90_ms": round(float(np.percentile(a, 90)), 1) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 1) if len(a) else None,
            "stage_median_ms": {k: round(float(np.median(v)), 1) for k, v in stages.items()},
            "replica_rss_mb_first": round(float(np.mean(mem[:k])), 1) if mem else None,
            "replica_rss_mb_last": round(float(np.mean(mem[-k:])), 1) if mem else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--dataset", default="synthetic-small")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds (at most 600)")
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--side", type=int, default=448, help="query longest side, px")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=8)
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {host}: loopback only")
    images = queries(args.dataset, args.side, 64)
    run(args.url, images, 1, 60, args.warmup, args.top_k)  # warm-up, not measured
    res = run(args.url, images, args.concurrency, min(args.duration, 600), args.max_requests, args.top_k)
    print(json.dumps({"concurrency": args.concurrency, "side_px": args.side, **res}, indent=1))


if __name__ == "__main__":
    main()

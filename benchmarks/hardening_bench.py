"""Cheap requests that must not exhaust the service, and replicas that die under load (loopback only).

    .venv/bin/ilr serve --background            # or after ./scripts/demo, which leaves it running
    .venv/bin/python benchmarks/hardening_bench.py [--only bigpng slow kill] [--url http://127.0.0.1:8000]

- bigpng: 40-megapixel PNG queries (a few KB each: 120 MB once decoded) at concurrency 8; the resident
  memory of the Serve replicas and of the Ingress alone is sampled every 0.2 s (peak over the idle level).
- slow: 64 uploads that send their headers and then one byte per second; meanwhile /healthz is asked every
  0.5 s: its latency, and what the slow uploads get in the end.
- kill: search load at concurrency 4 while the Extractor, the Searcher and the Reranker replicas are killed
  with SIGKILL one after the other (Serve restarts each); every failed request is counted.
Bounded in count and time; prints one JSON document.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image


def replicas() -> dict[str, list]:
    """{deployment: [psutil.Process]} of the running Serve app's replicas, plus the proxy."""
    import psutil

    out: dict[str, list] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for name in ("Ingress", "Extractor", "Searcher", "Reranker"):
            if f"ServeReplica:ilr:{name}" in cmd:
                out.setdefault(name, []).append(p)
        if "ProxyActor" in cmd:
            out.setdefault("Proxy", []).append(p)
    return out


def rss_mb(procs: list) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except Exception:  # noqa: BLE001 - a replica restarting
            pass
    return total / 1e6


def big_png(width: int = 7300, height: int = 5470) -> bytes:
    """~40 MP, a few KB: flat colour with a little structure, compresses to almost nothing."""
    img = Image.new("RGB", (width, height), (120, 140, 160))
    img.paste((200, 60, 40), (1000, 1000, 3000, 2500))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def bigpng(url: str, concurrency: int = 8, requests: int = 48) -> dict:
    data = big_png()
    procs = replicas()
    everything = [p for ps in procs.values() for p in ps]
    idle_all, idle_ingress = rss_mb(everything), rss_mb(procs.get("Ingress", []))
    peak_all, peak_ingress, statuses, lat = idle_all, idle_ingress, [], []
    lock, done = threading.Lock(), threading.Event()
    left = [requests]

    def worker():
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                t = time.perf_counter()
                try:
                    r = http.post("/v1/search", files={"image": ("big.png", data)}, data={"top_k": "5"})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    statuses.append(code)
                    lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak_all = max(peak_all, rss_mb(everything))
        peak_ingress = max(peak_ingress, rss_mb(procs.get("Ingress", [])))
        time.sleep(0.2)
    done.set()
    return {"png_bytes": len(data), "megapixels": round(7300 * 5470 / 1e6, 1), "concurrency": concurrency,
            "requests": len(statuses), "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "p50_s": round(float(np.median(lat)), 2), "replicas_idle_mb": round(idle_all),
            "replicas_peak_over_idle_mb": round(peak_all - idle_all), "ingress_idle_mb": round(idle_ingress),
            "ingress_peak_over_idle_mb": round(peak_ingress - idle_ingress)}


def slow(url: str, uploads: int = 64, seconds: float = 30.0) -> dict:
    u = urlparse(url)
    socks, results = [], []
    for _ in range(uploads):
        s = socket.create_connection((u.hostname, u.port or 80), timeout=5)
        s.sendall(f"POST /v1/search HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: multipart/form-data; "
                  "boundary=xx\r\nContent-Length: 1000000\r\n\r\n--xx\r\n".encode())
        socks.append(s)
    health, t0 = [], time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() - t0 < seconds:
            for s in socks:
                try:
                    s.sendall(b"x")  # one byte per round: far too slow to ever finish
                except OSError:
                    pass
            t = time.perf_counter()
            try:
                ok = http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            health.append((time.perf_counter() - t, ok))
            time.sleep(max(0.0, 0.5 - (time.perf_counter() - t)))
    for s in socks:
        s.settimeout(2)
        try:
            first = s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError as e:
            first = type(e).__name__
        results.append(first or "closed")
        s.close()
    lat = np.array([h for h, _ in health])
    return {"slow_uploads": uploads, "seconds": seconds, "healthz_checks": len(health),
            "healthz_ok": sum(ok for _, ok in health), "healthz_p50_ms": round(float(np.median(lat)) * 1000, 1),
            "healthz_max_ms": round(float(lat.max()) * 1000, 1),
            "slow_uploads_got": {r: results.count(r) for r in set(results)}}


def kill(url: str, images: list[bytes], concurrency: int = 4, settle_s: float = 25.0) -> dict:
    statuses, stop, lock = [], threading.Event(), threading.Lock()

    def worker(i: int):
        with httpx.Client(base_url=url, timeout=120) as http:
            j = i
            while not stop.is_set() and len(statuses) < 5000:
                try:
                    r = http.post("/v1/search", files={"image": ("q.jpg", images[j % len(images)])}, data={"top_k": "5"})
                    code = r.status_code
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    statuses.append(code)
                j += concurrency

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    killed = []
    try:
        time.sleep(5)
        for name in ("Extractor", "Searcher", "Reranker"):
            procs = replicas().get(name, [])
            if procs:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed.append(f"{name} (pid {procs[0].pid})")
            time.sleep(settle_s)  # Serve restarts it; the load goes on
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    failed = [s for s in statuses if s != 200]
    return {"concurrency": concurrency, "killed": killed, "requests": len(statuses), "failed": len(failed),
            "failed_samples": [str(s) for s in failed[:5]]}


def query_images(n: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        arr = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((448, 336), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--only", nargs="+", default=["bigpng", "slow", "kill"], choices=["bigpng", "slow", "kill"])
    ap.add_argument("--settle", type=float, default=25.0, help="seconds between replica kills")
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {host}: loopback only")
    httpx.get(f"{args.url}/healthz", timeout=30).raise_for_status()
    out = {}
    if "bigpng" in args.only:
        out["bigpng"] = bigpng(args.url)
    if "slow" in args.only:
        out["slow"] = slow(args.url)
    if "kill" in args.only:
        out["kill"] = kill(args.url, query_images(), settle_s=args.settle)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

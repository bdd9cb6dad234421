"""Data-layer figures: generating `small`, and ingest + validate + version of 1,000 images.

Run: .venv/bin/python benchmarks/data_bench.py [--repeats 3]
Targets (issue: foundation and data): generate small < 60 s; ingest + validate of 1,000 images < 60 s on 2 cores.
Ingest runs against a throw-away git + DVC repository and ILR_HOME, so it leaves this checkout alone.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ilr-bench-"))
    os.environ["ILR_HOME"] = str(tmp / "home")
    os.environ["ILR_REPO"] = str(tmp / "repo")
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    from data import synthetic
    from data.validate import image_facts
    from data.config import DataConfig
    from data import manifest
    from data.versioning import ingest

    gen = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        df = synthetic.generate(tmp / f"small-{r}", "small", seed=0, workers=2)
        gen.append(time.perf_counter() - t0)
    print(f"generate small ({len(df)} images, 2 workers): median {statistics.median(gen):.1f} s "
          f"(runs: {', '.join(f'{g:.1f}' for g in gen)})")

    spec = synthetic.SyntheticSpec(train_classes=100, eval_instances=100, train_views=5, index_views=3,
                                   query_views=2, distractors=0, image_px=384)
    src = tmp / "thousand"
    df = synthetic.generate(src, spec, seed=1, workers=2)
    facts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        image_facts(manifest.read(src), src, DataConfig())
        facts.append(time.perf_counter() - t0)
    runs = []
    for r in range(args.repeats):
        repo = tmp / f"repo-{r}"
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        os.environ["ILR_REPO"] = str(repo)
        t0 = time.perf_counter()
        v, _ = ingest("synthetic", str(src), "bench", repo=repo, log=lambda *_: None)
        runs.append(time.perf_counter() - t0)
    print(f"per-image checks of {len(df)} images (decode, pHash, sha1): median {statistics.median(facts):.1f} s")
    print(f"ingest + validate + version of {len(df)} images: median {statistics.median(runs):.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in runs)}) -> {v.ref}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")


if __name__ == "__main__":
    main()

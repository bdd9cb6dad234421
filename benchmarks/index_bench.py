"""Index build throughput vs raw extraction throughput on the same images (the index must not be the
bottleneck: within 10%).

Run: .venv/bin/python benchmarks/index_bench.py [--size small|medium] [--repeats 2] [--engines local ray]
In a temporary workspace: the generated dataset is ingested once, then per repeat (interleaved):
raw `Extractor.extract` over the index images; `ilr index build --engine local` (extract + Milvus +
local store + recall check); `--engine ray` (Ray Data map_batches actors). Each build starts from an
empty index (new workspace data dir). Figures are medians of images/s.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ilr-index-bench-"))
    repo = root / "repo"
    repo.mkdir()
    subprocess.run("git init -q && git -c user.name=b -c user.email=b@b commit -q --allow-empty -m init",
                   shell=True, cwd=repo, check=True)
    os.environ.update(ILR_REPO=str(repo), ILR_HOME=str(root / "home"), ILR_PARAMS=str(root / "none.yaml"))
    from benchmarks.common import small_dataset
    from data import manifest
    from data.versioning import dataset_dir, ingest
    from models.artifacts import off_the_shelf
    from models.config import ExtractConfig
    from models.extract import Extractor
    from serving.index import build, choose_engine

    src, _ = small_dataset(args.size)
    ingest("synthetic", str(src), "bench", log=lambda *_: None)
    _, folder = dataset_dir("bench")
    df = manifest.read(folder)
    paths = [folder / p for p in df[df["split"] == "index"]["path"]]
    n = len(paths)
    ecfg = ExtractConfig()
    rates: dict[str, list[float]] = {"raw extraction": [], **{f"index build ({e})": [] for e in args.engines}}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        Extractor(off_the_shelf(), ecfg).extract(paths)
        rates["raw extraction"].append(n / (time.perf_counter() - t0))
        for engine in args.engines:
            shutil.rmtree(root / "home" / "local_features", ignore_errors=True)
            shutil.rmtree(root / "home" / "milvus.db", ignore_errors=True)
            os.environ["ILR_HOME"] = str(root / f"home-{engine}-{r}")
            shutil.copytree(root / "home", root / f"home-{engine}-{r}", dirs_exist_ok=True)
            t0 = time.perf_counter()
            res = build("bench", "off-the-shelf", ecfg=ecfg, log_fn=lambda *_: None, engine=engine)
            rates[f"index build ({engine})"].append(res.added / (time.perf_counter() - t0))
            os.environ["ILR_HOME"] = str(root / "home")
    base = statistics.median(rates["raw extraction"])
    print(f"{n} index images of synthetic-{args.size}, max side {ecfg.max_side_px}px, scales {ecfg.scales}; "
          f"--engine auto would take: {'%s (%s)' % choose_engine('auto', n)}")
    for k, v in rates.items():
        med = statistics.median(v)
        print(f"  {k:22s} {med:6.2f} img/s  ({med / base:.2f}x raw)  runs: {', '.join(f'{x:.2f}' for x in v)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

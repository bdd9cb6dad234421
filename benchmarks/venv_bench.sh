#!/usr/bin/env bash
# README setup time: `scripts/venv.sh` creating a new .venv, for two revisions in the same run, alternating
# (REPEATS rounds, default 1), then how long one process takes to import the heavy libraries in that .venv
# (byte-compiled files missing would show here):
#   benchmarks/venv_bench.sh OLD_REV [NEW_REV]
# Each revision is cloned into a temporary folder and builds its own .venv there (pip's download cache is
# shared, so run one round first if it is cold). Prints one line per install. The install writes about 7 GB
# (torch's CUDA build) and varies with the disk by tens of seconds; COMPILE=1 also times the CPU-bound part
# alone in the last .venv: byte-compiling site-packages on one core (as pip does) and on every core.
set -uo pipefail
old="$1"; new="${2:-HEAD}"; repeats="${REPEATS:-1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
imports="import torch, timm, ray.tune, ray.serve, ray.data, mlflow, prefect, great_expectations, dvc.repo, pymilvus, milvus_lite, onnxruntime, cv2, fastapi, sklearn, skimage"
for round in $(seq "$repeats"); do
  for rev in "$old" "$new"; do
    d="$out/$rev"
    rm -rf "$d"
    git clone -q "$root" "$d" && (cd "$d" && git checkout -q "$rev") || exit 1
    start=$(date +%s.%N)
    (cd "$d" && ./scripts/venv.sh > /dev/null 2>&1) || { echo "$rev: venv.sh failed"; exit 1; }
    mid=$(date +%s.%N)
    "$d/.venv/bin/python" -c "$imports" 2> /dev/null || { echo "$rev: imports failed"; exit 1; }
    end=$(date +%s.%N)
    python3 -c "print(f'round $round  $rev  venv.sh {$mid - $start:.1f} s  first import {$end - $mid:.1f} s')"
    if [ "${COMPILE:-0}" = 1 ] && [ "$round" = "$repeats" ] && [ "$rev" = "$new" ]; then
      site=$("$d/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
      for jobs in 1 0 1 0; do
        find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
        t0=$(date +%s.%N)
        "$d/.venv/bin/python" -m compileall -q -j "$jobs" "$site" > /dev/null 2>&1
        python3 -c "print(f'byte-compile site-packages, -j $jobs (0: every core): {$(date +%s.%N) - $t0:.1f} s')"
      done
    fi
    rm -rf "$d"
  done
done

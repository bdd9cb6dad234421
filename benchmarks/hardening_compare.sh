#!/usr/bin/env bash
# benchmarks/hardening_bench.py against two revisions, one after the other on this machine (same run):
#   benchmarks/hardening_compare.sh OLD_REV [NEW_REV]      e.g. benchmarks/hardening_compare.sh 3e67957
# Each revision is cloned into a temporary folder (its own code through PYTHONPATH, this checkout's .venv),
# serves the generated `tiny` dataset with the off-the-shelf model on 127.0.0.1:8100, is measured, stopped.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
for rev in "$1" "${2:-HEAD}"; do
  d="$out/$rev"
  git clone -q "$root" "$d" && (cd "$d" && git checkout -q "$rev") && ln -s "$root/.venv" "$d/.venv"
  (cd "$d" && env -u ILR_HOME -u ILR_REPO -u ILR_PARAMS PYTHONPATH="$d" bash -c "
    .venv/bin/ilr data ingest --format synthetic tiny --name hb > /dev/null
    .venv/bin/ilr index build --dataset hb --engine local > /dev/null
    .venv/bin/ilr serve --background --port 8100 > /dev/null
    .venv/bin/python '$root/benchmarks/hardening_bench.py' --url http://127.0.0.1:8100 > '$out/$rev.json'
    .venv/bin/ilr stop > /dev/null")
  echo "== $rev"; cat "$out/$rev.json"
done

#!/usr/bin/env bash
# A service benchmark against two revisions, one after the other on this machine (the same run):
#   benchmarks/compare_revisions.sh hardening OLD_REV [NEW_REV]   # benchmarks/hardening_bench.py
#   benchmarks/compare_revisions.sh load OLD_REV [NEW_REV]        # benchmarks/load_test.py, concurrency 4
# Each revision is cloned into a temporary folder (its own code through PYTHONPATH, this checkout's .venv),
# ingests the generated dataset (SIZE, default tiny), indexes it with the off-the-shelf model, serves it on
# 127.0.0.1:8100, is measured with THIS checkout's benchmark script, and is stopped.
set -uo pipefail
bench="$1"; old="$2"; new="${3:-HEAD}"; size="${SIZE:-tiny}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
case "$bench" in
  hardening) cmd="'$root/benchmarks/hardening_bench.py' --url http://127.0.0.1:8100" ;;
  load) cmd="'$root/benchmarks/load_test.py' --url http://127.0.0.1:8100 --dataset hb --concurrency 4 --duration ${DURATION:-90}" ;;
  *) echo "unknown benchmark $bench (hardening | load)"; exit 2 ;;
esac
for rev in "$old" "$new"; do
  d="$out/$rev"
  git clone -q "$root" "$d" && (cd "$d" && git checkout -q "$rev") && ln -s "$root/.venv" "$d/.venv"
  (cd "$d" && env -u ILR_HOME -u ILR_REPO -u ILR_PARAMS PYTHONPATH="$d" bash -c "
    .venv/bin/ilr data ingest --format synthetic $size --name hb > /dev/null
    .venv/bin/ilr index build --dataset hb --engine local > /dev/null
    .venv/bin/ilr serve --background --port 8100 > /dev/null
    .venv/bin/python $cmd > '$out/$rev.json'
    .venv/bin/ilr stop > /dev/null")
  echo "== $rev"; cat "$out/$rev.json"
done

#!/usr/bin/env bash
# The test suite's time against a baseline revision, in the same run (one after the other on this machine),
# wall time and machine-wide CPU seconds (/proc/stat) for each:
#   benchmarks/suite_bench.sh suite OLD_REV [FILES...]   # OLD_REV's own tests as its scripts/test ran them
#                                                        # (one process, no xdist), then FILES (default: all)
#                                                        # at this checkout with ./scripts/test (two workers)
#   benchmarks/suite_bench.sh chain                      # the e2e demo test's chain by hand in a fresh clone:
#                                                        # README command 1 (tiny, 2 trials x 2 steps),
#                                                        # `ilr tune` there, README command 1 again
# OLD_REV runs from a clone with its own code (PYTHONPATH) and this checkout's .venv. Run it on an otherwise
# idle machine: both sides are CPU-bound. Commit first: the e2e tests clone HEAD.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mktemp -d)"
cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
measure() {  # LABEL CMD...: runs CMD, prints its wall and CPU seconds and its last line
  local label="$1"; shift
  local c0 t0 rc; c0=$(cpu); t0=$(date +%s.%N)
  "$@" > "$out/$label.log" 2>&1; rc=$?
  sleep 3   # what the command left to exit (Ray, servers) is counted
  awk -v l="$label" -v rc="$rc" -v w="$(echo "$(date +%s.%N) - $t0 - 3" | bc)" -v c="$(( $(cpu) - c0 ))" \
    'BEGIN{printf "%-10s exit %s  wall %6.1f s  CPU %6.1f s\n", l, rc, w, c/100}'
  grep -E "passed|failed|error" "$out/$label.log" | tail -1
}
unset ILR_HOME ILR_REPO ILR_PARAMS ILR_URL MLFLOW_TRACKING_URI MILVUS_URI RAY_ADDRESS PREFECT_API_URL
case "${1:-}" in
  suite)
    old="$2"; shift 2
    git clone -q "$root" "$out/old" && (cd "$out/old" && git checkout -q "$old") && ln -s "$root/.venv" "$out/old/.venv"
    measure "$old" env -C "$out/old" PATH="$out/old/.venv/bin:$PATH" PYTHONPATH="$out/old" GX_ANALYTICS_ENABLED=false \
      DVC_NO_ANALYTICS=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1 \
      .venv/bin/python -m pytest -q -p no:xdist -p no:cacheprovider --durations=10
    measure HEAD env -C "$root" ./scripts/test -q --durations=10 "$@"
    ;;
  chain)
    d="$out/user/ilr"
    git clone -q "$root" "$d" && ln -s "$root/.venv" "$d/.venv"
    user=(env -C "$d" -i HOME="$HOME" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PYTHONPATH="$d")
    c0=$(cpu)
    measure demo "${user[@]}" ./scripts/demo --size tiny --trials 2 --steps 2 --port 8123
    measure tune "${user[@]}" .venv/bin/ilr tune --dataset synthetic-tiny --trials 1 --steps 2 --no-register
    measure demo-again "${user[@]}" ./scripts/demo --size tiny --trials 2 --steps 2 --port 8123
    while pgrep -f "ilr retrain" > /dev/null; do sleep 2; done   # the background retrain of the second version
    echo "the chain with its background retrain: CPU $(( ($(cpu) - c0) / 100 )) s"
    "${user[@]}" .venv/bin/ilr stop > /dev/null 2>&1
    ;;
  *) echo "usage: $0 suite OLD_REV [FILES...] | chain"; exit 2 ;;
esac
echo "logs: $out"

#!/usr/bin/env bash
# The MLflow tracking server as README/docs start it, with and without MLflow 3's job runner
# (MLFLOW_SERVER_ENABLE_JOB_EXECUTION), alternating, REPEATS rounds (default 2): seconds until /health
# answers, its processes and their memory once up, and the machine's CPU seconds from start to 10 s after.
#   benchmarks/mlflow_server_bench.sh
# Uses a new SQLite store in a temporary folder and port 5077 on 127.0.0.1. Run it on an otherwise idle
# machine: the CPU figure is machine-wide.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
port=5077
trap 'pkill -f "$work" 2>/dev/null; rm -rf "$work"' EXIT
cpu() { read -r _ u n s _ _ q sq _ < /proc/stat; echo $((u + n + s + q + sq)); }
tree() { pgrep -d, -f "$work|port $port|huey_consumer|mlflow.server.jobs" ; }
for round in $(seq "${REPEATS:-2}"); do
  for jobs in true false; do
    rm -rf "$work/store" && mkdir -p "$work/store"
    c0=$(cpu); t0=$(date +%s.%N)
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$jobs "$root/.venv/bin/mlflow" server --host 127.0.0.1 --port $port \
      --workers 1 --backend-store-uri "sqlite:///$work/store/db.db" --artifacts-destination "$work/store/art" \
      > "$work/log" 2>&1 &
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 0.2; done
    up=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
    sleep 10
    pids=$(tree)
    n=$(echo "$pids" | tr ',' '\n' | grep -c .)
    rss=$(ps -o rss= -p "$pids" | awk '{s += $1} END {print int(s / 1024)}')
    c1=$(cpu)
    echo "round $round  job execution $jobs: healthy after $up s, $n processes, $rss MB, $(( (c1 - c0) / $(getconf CLK_TCK) )) CPU-s"
    pkill -f "port $port"; pkill -f huey_consumer; pkill -f mlflow.server.jobs; wait 2> /dev/null
  done
done

#!/usr/bin/env bash
# Scheduling benchmark: the same open-loop load against `osprey serve` under each policy, one
# after another in one run, at a rate the most accurate variant alone cannot sustain.
# Usage: bench/scheduling.sh [MODEL] [RATE_RPS] [SLO_MS] [DURATION_S] [THREADS]
# Prints one row per policy; figures are recorded in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-spoken_digits}
RATE=${2:-900}
SLO=${3:-50}
DUR=${4:-8}
THREADS=${5:-1}
cargo build --release --quiet
BIN=target/release/osprey
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "model $MODEL, open loop $RATE req/s for ${DUR}s, latency objective ${SLO} ms, $THREADS worker thread(s)"
printf "%-14s %7s %7s %6s %6s %7s %9s %8s %8s %8s  %s\n" policy sent ok late rej late% accuracy utility p50_ms p99_ms variants
for policy in most-accurate fastest fixed profiled per-class data-aware; do
  cat >"$TMP/osprey.toml" <<CONF
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_batch = 16
[limits]
max_queue = 4096
[[agents]]
name = "local-0"
threads = $THREADS
[scheduler]
policy = "$policy"
[[tenants]]
name = "bench"
latency_slo_ms = $SLO
CONF
  $BIN serve --config "$TMP/osprey.toml" >"$TMP/serve.log" 2>"$TMP/serve.err" &
  PID=$!
  for _ in $(seq 1 600); do grep -q '^ready ' "$TMP/serve.log" && break; sleep 0.1; done
  HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$TMP/serve.log")
  $BIN loadgen --model "$MODEL" --target "$HTTP" --rate "$RATE" --duration "$DUR" --json |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); p=sys.argv[1]; print("%-14s %7d %7d %6d %6d %7.1f %9.3f %8.3f %8.2f %8.2f  %s" % (p, r["sent"], r["ok"], r["late"], r["rejected"], r["late_pct"], r["accuracy"] or 0, r["utility"], r["p50_ms"], r["p99_ms"], r["variants"]))' "$policy"
  kill -TERM $PID; wait $PID || true
done

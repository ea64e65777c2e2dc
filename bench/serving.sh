#!/usr/bin/env bash
# Serving benchmark: per-request overhead over the engine, and loadgen throughput/latency at a
# few concurrencies, both protocols, against a release `osprey serve` on loopback.
# Usage: bench/serving.sh [DURATION_S]   (prints tables; figures are recorded in bench/RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}   # OSPREY_BIN: measure another build
echo "== per-request overhead over direct engine calls (osprey overhead)"
$BIN overhead --requests 2000
LOG=$(mktemp)
$BIN serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 >"$LOG" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do grep -q '^ready ' "$LOG" && break; sleep 0.1; done
HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$LOG")
GRPC=$(sed -n 's/^ready http=[^ ]* grpc=\(.*\)/\1/p' "$LOG")
echo "== loadgen, closed loop, ${DUR}s per cell (scheduler chooses the variant; default deadline)"
printf "%-14s %-5s %5s %8s %8s %6s %7s %8s %8s %9s  %s\n" model proto conc sent ok rej lost rps p50_ms p99_ms variants
for model in digits spoken_digits; do
  for proto in http grpc; do
    target=$HTTP; [ "$proto" = grpc ] && target=$GRPC
    for c in 1 4 16; do
      $BIN loadgen --model $model --protocol $proto --target "$target" --concurrency $c --duration "$DUR" --json |
        python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("%-14s %-5s %5d %8d %8d %6d %7d %8.1f %8.2f %9.2f  %s" % (r["model"], r["protocol"], r["concurrency"], r["sent"], r["ok"], r["rejected"], r["lost"], r["throughput_rps"], r["p50_ms"], r["p99_ms"], r["variants"]))'
    done
  done
done
kill -TERM $PID; wait $PID

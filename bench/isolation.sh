#!/usr/bin/env bash
# Tenant isolation: a victim tenant's latency alone, then with an aggressor sending batches of
# 48 samples to the largest variant at 10x its cost quota, in one run (ratio, since the machine
# is noisy). The aggressor's quota counts compute (compute_rate_ms), so its admitted load is
# bounded by what it costs, not by how many samples it sends.
# Usage: bench/isolation.sh [DURATION_S] [ROUNDS]   (figures recorded in bench/RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
ROUNDS=${2:-3}
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
DIR=$(mktemp -d)
hash() { $BIN hash-key "$1"; }
# The aggressor may spend 40 compute ms per second (4% of one core); one batch of 48 on
# spoken_digits/large costs ~40 ms by the profile, so its quota is ~1 request/s.
cat >"$DIR/osprey.toml" <<EOF
[[tenants]]
name = "victim"
api_keys = ["$(hash victim-key)"]

[[tenants]]
name = "aggressor"
api_keys = ["$(hash aggressor-key)"]
compute_rate_ms = 40.0
compute_burst_ms = 60.0
EOF
LOG="$DIR/serve.log"
OSPREY_STATE_DIR="$DIR" $BIN serve --config "$DIR/osprey.toml" --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 >"$LOG" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 1 600); do grep -q '^ready ' "$LOG" && break; sleep 0.1; done
HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$LOG")
victim() {
  $BIN loadgen --model spoken_digits --target "$HTTP" --api-key victim-key --concurrency 2 --duration "$DUR" --json
}
aggressor() {
  # 10 requests/s of 48 samples: 10x what its quota admits.
  $BIN loadgen --model spoken_digits --version large --batch 48 --target "$HTTP" --api-key aggressor-key \
    --rate 10 --duration "$DUR" --json
}
field() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r['$1'])"; }
printf "%-6s %12s %12s %12s %12s %10s %10s\n" round alone_p50 alone_p99 shared_p50 shared_p99 p99_ratio aggr_ok
for r in $(seq 1 "$ROUNDS"); do
  A=$(victim)
  aggressor >"$DIR/aggr.json" &
  APID=$!
  S=$(victim)
  wait $APID
  printf "%-6s %12.2f %12.2f %12.2f %12.2f %10.3f %10s\n" "$r" \
    "$(echo "$A" | field p50_ms)" "$(echo "$A" | field p99_ms)" \
    "$(echo "$S" | field p50_ms)" "$(echo "$S" | field p99_ms)" \
    "$(python3 -c "print($(echo "$S" | field p99_ms) / $(echo "$A" | field p99_ms))")" \
    "$(field ok <"$DIR/aggr.json")/$(field sent <"$DIR/aggr.json")"
done
kill -TERM $PID; wait $PID

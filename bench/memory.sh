#!/usr/bin/env bash
# Memory of `osprey serve` while it parses large JSON bodies: RSS idle, peak (VmHWM) after one
# 11.7 MB JSON request (256 clips of INT16 audio), and after six at once; then RSS once idle
# again (freed memory is handed back after a quiet tick).
# Usage: bench/memory.sh   (OSPREY_BIN: measure another build; figures in bench/RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
DIR=$(mktemp -d)
python3 - "$DIR/big.json" <<'PY'
import json, random, sys
random.seed(1)
data = [random.randint(-32768, 32767) for _ in range(256 * 6400)]
json.dump({"inputs": [{"name": "waveform", "datatype": "INT16", "shape": [256, 6400], "data": data}]},
          open(sys.argv[1], "w"))
PY
OSPREY_STATE_DIR="$DIR" $BIN serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 >"$DIR/log" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 1 600); do grep -q '^ready ' "$DIR/log" && break; sleep 0.1; done
HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$DIR/log")
mb() { awk -v k="$1:" '$1 == k { printf "%.1f", $2 / 1024 }' /proc/$PID/status; }
post() { curl -s -o /dev/null -w "%{http_code} " -X POST -H 'Content-Type: application/json' \
  --data-binary @"$DIR/big.json" "http://$HTTP/v2/models/spoken_digits/infer"; }
echo "body $(du -m "$DIR/big.json" | cut -f1) MB; idle RSS $(mb VmRSS) MB"
post; echo "-> after one: peak $(mb VmHWM) MB"
(for _ in 1 2 3 4 5 6; do post & done; wait); echo "-> after six at once: peak $(mb VmHWM) MB"
sleep 5; echo "idle again: RSS $(mb VmRSS) MB"

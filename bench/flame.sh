#!/usr/bin/env bash
# Where a served request's time goes: a `profiling` build (release + line tables) of
# `osprey serve` under wrk (digits/medium pinned, HTTP, Triton's binary body), sampled by
# `perf record --call-graph dwarf` for a few seconds mid-run; prints the breakdown of
# bench/flame/collapse.py and writes bench/flame/NAME.folded (+ NAME.svg when
# inferno-flamegraph is installed: cargo install inferno).
# Usage: bench/flame.sh [NAME] [CONNECTIONS] [DURATION_S]   (needs perf and wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-http-c32}
CONNS=${2:-32}
DUR=${3:-12}
cargo build --profile profiling --quiet --bin osprey
TMP=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
HL=$(python3 bench/peers/make_body.py models "$TMP")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/profiling/osprey serve --http-addr 127.0.0.1:"$PORT" --grpc-addr 127.0.0.1:0 >"$TMP/serve.log" 2>&1 &
PID=$!
for _ in $(seq 1 600); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" && break; sleep 0.1; done
BODY=$TMP/body.bin HEADER_LEN=$HL wrk -t2 -c"$CONNS" -d"${DUR}s" -s bench/peers/infer.lua \
  "http://127.0.0.1:$PORT/v2/models/digits/versions/medium/infer" >"$TMP/wrk.out" 2>&1 &
WRK=$!
sleep 3
perf record -q -F 1999 -g --call-graph dwarf,32768 -p "$PID" -o "$TMP/perf.data" -- sleep $((DUR - 6)) 2>/dev/null
wait $WRK
grep -E '^(Requests/sec|WRK)' "$TMP/wrk.out" || true
perf script -i "$TMP/perf.data" -F comm,tid,ip,sym --no-inline 2>/dev/null >"$TMP/perf.script"
python3 bench/flame/collapse.py "$TMP/perf.script" "bench/flame/$NAME.folded"
if command -v inferno-flamegraph >/dev/null; then
  inferno-flamegraph --minwidth 0.5 --title "osprey serve under wrk -c$CONNS ($NAME)" \
    <"bench/flame/$NAME.folded" >"bench/flame/$NAME.svg"
  echo "flame graph: bench/flame/$NAME.svg"
fi

#!/usr/bin/env bash
# Live cluster benchmark: a gateway (no local agents) and three `osprey agent` processes on
# loopback — a, b healthy, c under contention (--slowdown SLOW, default 6) — open-loop load with
# a deadline; node b is killed halfway. Compared in one run: instance selection `predicted`
# (Osprey's), `round-robin` and `least-queue`. The last column is the slowdown the gateway
# observed on a and on c (read from /v2/cluster at the end of the run).
# Usage: bench/cluster.sh [RATE] [DURATION_S] [DEADLINE_MS] [MODEL] [SLOW]
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1500}
DUR=${2:-8}
DEADLINE=${3:-20}
MODEL=${4:-digits}
SLOW=${5:-6}
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}   # OSPREY_BIN: compare another build
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
echo "model $MODEL, open loop $RATE req/s for ${DUR}s, deadline ${DEADLINE} ms; c is ${SLOW}x slower; b is killed at $((DUR / 2)) s"
printf "%-12s %7s %7s %6s %5s %6s %7s %9s %8s %8s  %-40s %s\n" selector sent ok late rej lost late% accuracy p50_ms p99_ms nodes slowdown_a/c
for sel in predicted round-robin least-queue; do
  $BIN serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --local-agents 0 --selector $sel >"$TMP/gw.log" 2>/dev/null &
  GW=$!
  for _ in $(seq 1 600); do grep -q '^ready ' "$TMP/gw.log" && break; sleep 0.1; done
  HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$TMP/gw.log")
  GRPC=$(sed -n 's/^ready http=[^ ]* grpc=\(.*\)/\1/p' "$TMP/gw.log")
  $BIN agent --join "$GRPC" --name a >"$TMP/a.log" 2>/dev/null & A=$!
  $BIN agent --join "$GRPC" --name b >"$TMP/b.log" 2>/dev/null & B=$!
  $BIN agent --join "$GRPC" --name c --slowdown "$SLOW" >"$TMP/c.log" 2>/dev/null & C=$!
  PIDS=($GW $A $B $C)
  for f in a b c; do for _ in $(seq 1 300); do grep -q '^joined' "$TMP/$f.log" && break; sleep 0.1; done; done
  ( sleep $((DUR / 2)); kill -9 $B 2>/dev/null ) 2>/dev/null &
  $BIN loadgen --model "$MODEL" --target "$HTTP" --rate "$RATE" --duration "$DUR" --deadline-ms "$DEADLINE" --json >"$TMP/load.json"
  python3 - "$sel" "$HTTP" "$TMP/load.json" <<'PY'
import json, sys, urllib.request
sel, http, path = sys.argv[1:]
r = json.loads(open(path).read().strip().splitlines()[-1])
nodes = json.load(urllib.request.urlopen("http://%s/v2/cluster" % http))["nodes"]
sd = {n["name"]: n["slowdown"] for n in nodes}
print("%-12s %7d %7d %6d %5d %6d %7.2f %9.3f %8.2f %8.2f  %-40s %s" % (sel, r["sent"], r["ok"], r["late"], r["rejected"], r["lost"], r["late_pct"], r["accuracy"] or 0, r["p50_ms"], r["p99_ms"], json.dumps(r["nodes"]), "/".join("%.1f" % sd[k] if k in sd else "-" for k in ("a", "c"))))
PY
  kill $A $C 2>/dev/null || true
  kill -TERM $GW; wait $GW 2>/dev/null || true
  wait 2>/dev/null || true
done

#!/usr/bin/env bash
# Chaos: a release gateway and three `osprey agent` processes on loopback under open-loop load;
# every PERIOD seconds one agent (in turn) is SIGKILLed and restarted. At the end the gateway
# must list all three nodes up and the load generator must have lost nothing.
# Usage: bench/chaos.sh [DURATION_S] [PERIOD_S] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-45}
PERIOD=${2:-15}
RATE=${3:-500}
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
TMP=$(mktemp -d)
declare -A PID
GW=
cleanup() { for p in "${PID[@]:-}" $GW; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
$BIN serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --local-agents 0 >"$TMP/gw.log" 2>"$TMP/gw.err" &
GW=$!
for _ in $(seq 1 600); do grep -q '^ready ' "$TMP/gw.log" && break; sleep 0.1; done
HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$TMP/gw.log")
GRPC=$(sed -n 's/^ready http=[^ ]* grpc=\(.*\)/\1/p' "$TMP/gw.log")
start_agent() { $BIN agent --join "$GRPC" --name "$1" >"$TMP/$1.log" 2>/dev/null & PID[$1]=$!; }
for n in a b c; do start_agent $n; done
sleep 2
$BIN loadgen --model digits --target "$HTTP" --rate "$RATE" --duration "$DUR" --deadline-ms 50 --json >"$TMP/load.json" &
LG=$!
t=0; k=0; names=(a b c)
while [ $((t + PERIOD)) -lt "$DUR" ]; do
  sleep "$PERIOD"; t=$((t + PERIOD))
  n=${names[$((k % 3))]}; k=$((k + 1))
  kill -9 "${PID[$n]}" 2>/dev/null || true
  wait "${PID[$n]}" 2>/dev/null || true
  echo "t=${t}s: killed $n, restarting it"
  start_agent "$n"
done
wait $LG
sleep 1
python3 - "$HTTP" "$TMP/load.json" <<'PY'
import json, sys, urllib.request
http, path = sys.argv[1:]
r = json.loads(open(path).read().strip().splitlines()[-1])
nodes = json.load(urllib.request.urlopen("http://%s/v2/cluster" % http, timeout=5))["nodes"]
print("sent %d ok %d late %d rejected %d failed %d lost %d p99 %.2f ms; answers per node %s" % (
    r["sent"], r["ok"], r["late"], r["rejected"], r["failed"], r["lost"], r["p99_ms"], json.dumps(r["nodes"])))
print("nodes at the end: %s" % ", ".join("%s(%s)" % (n["name"], "up" if n["up"] else "down") for n in sorted(nodes, key=lambda n: n["name"])))
ok = r["lost"] == 0 and sorted(n["name"] for n in nodes) == ["a", "b", "c"]
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY

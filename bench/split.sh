#!/usr/bin/env bash
# Split inference live: MiniLM-L6 over three `osprey agent` processes with unequal thread budgets
# and memory, each in its own network namespace joined to the gateway by a veth pair on a bridge,
# with `tc netem` delay and rate limits on every agent's link (both directions; where the kernel
# has no netem, `tbf` limits the rate and the delay is not emulated, which the output says):
#   a (trusted, 1 thread at half speed, 60 MB): 0.5 ms, 1000 Mbit/s  (the small box the gateway is on)
#   b (2 threads, 40 MB):                       2 ms,   200 Mbit/s
#   c (1 thread, 40 MB):                        5 ms,    50 Mbit/s
# Prints, as markdown: p50/p99 latency and throughput per strategy (planner, even,
# memory-weighted, single node); pipelined throughput of two 1-thread agents against one (on
# loopback, throughput objective); and the time to re-split after a 3x slowdown of the agent the
# plan uses most, with the requests lost meanwhile. Needs root for the namespaces; without them
# it says so and runs on loopback. Usage: bench/split.sh [SECONDS per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
cargo build --release --quiet -p osprey
BIN=$PWD/target/release/osprey
python3 scripts/fetch_minilm.py >/dev/null
REPO=$(mktemp -d)
ln -s "$PWD/models/minilm" "$REPO/minilm"
STATE=$(mktemp -d)
export OSPREY_JOIN_TOKEN=osprey-bench-split-token-0123456789
export OSPREY_LOG=warn
PIDS=()
NETNS=0
GW_IP=127.0.0.1

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$NETNS" = 1 ]; then
    for i in 1 2 3; do ip netns del "ospsplit$i" 2>/dev/null || true; done
    ip link del ospsplitbr 2>/dev/null || true
  fi
  rm -rf "$REPO" "$STATE"
}
trap cleanup EXIT

# name delay rate
LINKS=("a 0.5ms 1000mbit" "b 2ms 200mbit" "c 5ms 50mbit")
setup_netns() {
  ip link add ospsplitbr type bridge || return 1
  ip addr add 10.77.0.1/24 dev ospsplitbr && ip link set ospsplitbr up || return 1
  for i in 1 2 3; do
    read -r _ delay rate <<<"${LINKS[$((i - 1))]}"
    ip netns add "ospsplit$i" || return 1
    ip link add "ospsv$i" type veth peer name eth0 netns "ospsplit$i" || return 1
    ip link set "ospsv$i" master ospsplitbr up || return 1
    ip -n "ospsplit$i" addr add "10.77.0.1$i/24" dev eth0 || return 1
    ip -n "ospsplit$i" link set eth0 up && ip -n "ospsplit$i" link set lo up || return 1
    if [ "$QDISC" = netem ]; then
      ip netns exec "ospsplit$i" tc qdisc add dev eth0 root netem delay "$delay" rate "$rate" || return 1
      tc qdisc add dev "ospsv$i" root netem delay "$delay" rate "$rate" || return 1
    else
      ip netns exec "ospsplit$i" tc qdisc add dev eth0 root tbf rate "$rate" burst 64kb latency 100ms || return 1
      tc qdisc add dev "ospsv$i" root tbf rate "$rate" burst 64kb latency 100ms || return 1
    fi
  done
}
# netem when the kernel has it, else tbf (rate only).
QDISC=netem
if ! tc qdisc add dev lo root netem delay 0ms 2>/dev/null; then QDISC=tbf; else tc qdisc del dev lo root; fi
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null; then
  if setup_netns 2>/tmp/osprey-split-netns.err; then
    NETNS=1
    GW_IP=10.77.0.1
    if [ "$QDISC" = tbf ]; then
      echo "this kernel has no netem: link rates are limited with tbf, link delays are not emulated"
    fi
  else
    echo "network namespaces unavailable ($(head -1 /tmp/osprey-split-netns.err)); links are loopback, not emulated"
    for i in 1 2 3; do ip netns del "ospsplit$i" 2>/dev/null || true; done
    ip link del ospsplitbr 2>/dev/null || true
  fi
else
  echo "not root or no ip/tc: links are loopback, not emulated"
fi

HTTP="$GW_IP:18180"
GRPC="$GW_IP:18181"

start_gateway() { # extra serve args...
  OSPREY_STATE_DIR=$STATE $BIN serve --http-addr "$HTTP" --grpc-addr "$GRPC" --local-agents 0 \
    --model-repository "$REPO" "$@" >"$STATE/gw.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 300); do curl -sf "http://$HTTP/v2/health/live" >/dev/null && return 0; sleep 0.1; done
  echo "gateway did not start"; cat "$STATE/gw.log"; exit 1
}

start_agent() { # index name threads memory [trusted] [slowdown]
  local i=$1 name=$2 threads=$3 mem=$4 label=()
  [ "${5:-}" = trusted ] && label=(--label zone=trusted)
  label+=(--slowdown "${6:-1}")
  local run=() peer=127.0.0.1:0
  if [ "$NETNS" = 1 ]; then run=(ip netns exec "ospsplit$i"); peer="10.77.0.1$i:0"; fi
  "${run[@]}" $BIN agent --join "$GRPC" --name "$name" --threads "$threads" --memory-mb "$mem" \
    --model-repository "$REPO" --peer-listen "$peer" "${label[@]}" >"$STATE/$name.log" 2>&1 &
  PIDS+=($!)
}

status() { curl -sf "http://$HTTP/v2/cluster"; }

# Waits until a plan over N profiled agents is active; prints it.
wait_plan() {
  local n=$1
  for _ in $(seq 600); do
    if status | python3 -c '
import json, sys
s = json.load(sys.stdin)["splits"][0]
ok = s["epoch"] is not None and s["pending"] is None and len(s["nodes"]) == int(sys.argv[1]) and all(x["profiled"] for x in s["nodes"])
print(" ".join(f"{a}={b}" for a, b in s["stages"])) if ok else sys.exit(1)' "$n" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "no plan"; status; exit 1
}

stop_all() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

loadgen() { # concurrency
  $BIN loadgen --model minilm --model-repository "$REPO" --target "$HTTP" --concurrency "$1" \
    --duration "$SECS" --json --timeout 30 | tail -1
}

row() { # strategy json plan
  python3 -c '
import json, sys
r = json.loads(sys.argv[2])
lost = r["lost"] + r["failed"]
p50, p99, tput = r["p50_ms"], r["p99_ms"], r["throughput_rps"]
print(f"| {sys.argv[1]} | {p50:.1f} | {p99:.1f} | {tput:.1f} | {lost} | {sys.argv[3]} |")' "$1" "$2" "$3"
}

echo
echo "#### Strategies ($([ "$NETNS" = 1 ] && echo "netns, $QDISC links" || echo loopback), ${SECS} s each, 4 clients)"
echo
echo "| strategy | p50 ms | p99 ms | throughput/s | lost | plan |"
echo "|---|---|---|---|---|---|"
for strategy in planner even memory-weighted single-node; do
  start_gateway --split-strategy "$strategy"
  start_agent 1 a 1 60 trusted 2
  start_agent 2 b 2 40
  start_agent 3 c 1 40
  plan=$(wait_plan 3)
  SECS_SAVED=$SECS; SECS=2; loadgen 4 >/dev/null; SECS=$SECS_SAVED   # warm-up
  r=$(loadgen 4)
  row "${strategy/single-node/single node}" "$r" "$plan"
  stop_all
done

echo
echo "#### Pipelined throughput (loopback, throughput objective, 8 clients)"
echo
echo "| agents | p50 ms | p99 ms | throughput/s | lost | plan |"
echo "|---|---|---|---|---|---|"
SAVED_NETNS=$NETNS
NETNS=0
HTTP=127.0.0.1:18180
GRPC=127.0.0.1:18181
start_gateway --split-objective throughput
start_agent 1 a 1 200 trusted
plan=$(wait_plan 1)
SECS_SAVED=$SECS; SECS=2; loadgen 8 >/dev/null; SECS=$SECS_SAVED   # warm-up
one=$(loadgen 8)
row "one 1-thread agent" "$one" "$plan"
stop_all
start_gateway --split-objective throughput
start_agent 1 a 1 200 trusted
start_agent 2 b 1 200 trusted
plan=$(wait_plan 2)
SECS_SAVED=$SECS; SECS=2; loadgen 8 >/dev/null; SECS=$SECS_SAVED   # warm-up
two=$(loadgen 8)
row "two 1-thread agents" "$two" "$plan"
stop_all
python3 -c '
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ratio = b["throughput_rps"] / max(a["throughput_rps"], 1e-9)
print(f"\ntwo / one agent throughput: {ratio:.2f}x")' "$one" "$two"
NETNS=$SAVED_NETNS
if [ "$NETNS" = 1 ]; then HTTP="10.77.0.1:18180"; GRPC="10.77.0.1:18181"; fi

echo
echo "#### Re-split after a 3x slowdown (planner, latency objective, 2 clients)"
echo
start_gateway
start_agent 1 a 1 60 trusted 2
start_agent 2 b 2 40
start_agent 3 c 1 40
before=$(wait_plan 3)
# The agent with the most units in the plan; its process is the one to slow.
busiest=$(status | python3 -c '
import json, sys
s = json.load(sys.stdin)["splits"][0]
best = max(s["stages"], key=lambda st: int(st[1].split("..")[1]) - int(st[1].split("..")[0]))
print(best[0])')
pid=$(pgrep -f -- "--name $busiest " | head -1)
SECS_SAVED=$SECS
SECS=$((SECS + 8))
loadgen 2 >"$STATE/resplit.json" &
LG=$!
sleep 3
epoch=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["splits"][0]["epoch"])')
kill -USR1 "$pid"
t0=$(date +%s.%N)
took="none within 20 s"
for _ in $(seq 400); do
  now=$(status | python3 -c 'import json,sys; s=json.load(sys.stdin)["splits"][0]; print(s["epoch"] if s["pending"] is None else -1)')
  if [ "$now" != "$epoch" ] && [ "$now" != "-1" ]; then
    took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" "$t0" "$(date +%s.%N)")
    break
  fi
  sleep 0.05
done
after=$(status | python3 -c 'import json,sys; s=json.load(sys.stdin)["splits"][0]; print(" ".join(f"{a}={b}" for a, b in s["stages"]))')
wait $LG
SECS=$SECS_SAVED
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("| slowed | plan before | plan after | re-split | requests | lost |")
print("|---|---|---|---|---|---|")
sent, lost = r["sent"], r["lost"] + r["failed"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {sys.argv[5]} | {sent} | {lost} |")' \
  "$STATE/resplit.json" "$busiest" "$before" "$after" "$took"
stop_all

#!/usr/bin/env bash
# OPD's experiment live on loopback: `osprey serve` with the control loop on (a decision every
# 5 s) and the zoo pipeline under OPD's fluctuating load (open loop, 200 to 2000 req/s, period
# 60 s) from `osprey loadgen`, once per policy: random, greedy, ipa, opd (weights trained by
# `osprey train opd scenarios/opd-live.toml`, the simulator twin of this run). Prints a markdown
# table: the controller's mean cost / QoS / objective over its intervals (eq. 1-4 at the measured
# load, as logged per decision) beside what the client saw.
# Usage: bench/opd-live.sh [SECONDS]   (default 90)
#   AGENTS=N: serve with no in-process agent and N `osprey agent` processes (1 thread each) on
#   loopback instead; POLICIES="ipa opd": only these.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-90}
cargo build --release --quiet
BIN=target/release/osprey
OUT=bench/opd/live${AGENTS:+-agents$AGENTS}
mkdir -p "$OUT"
export OSPREY_STATE_DIR=$(mktemp -d)
trap 'rm -rf "$OSPREY_STATE_DIR"' EXIT
echo "| policy | cost | qos | objective | decisions | sent | ok | rejected | lost | duplicates | accuracy | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for policy in ${POLICIES:-random greedy ipa opd}; do
  cfg="$OUT/$policy.toml"
  cat > "$cfg" <<TOML
[control]
interval_s = 5
policy = "$policy"
predictor = "lstm"
predictor_weights = "models/digits_pipeline/predictor-live.safetensors"
opd_weights = "models/digits_pipeline/opd-live.safetensors"
seed = 31
[control.resources]
f_max = 4
b_max = 32
w_max = 1024
cores_max = 8
[control.objective]
alpha = 2.0
beta = 0.5
gamma = 4.0
delta = 0.6
lambda = 0.05
[control.reward]
beta = 0.05
gamma = 0.002
TOML
  local_args=()
  [ "${AGENTS:-0}" -gt 0 ] && local_args=(--local-agents 0)
  $BIN serve --config "$cfg" --http-addr 127.0.0.1:18300 --grpc-addr 127.0.0.1:18301 "${local_args[@]}" \
    > "$OUT/$policy.log" 2>&1 &
  pid=$!
  agents=()
  for i in $(seq 1 "${AGENTS:-0}"); do
    until [ -s "$OSPREY_STATE_DIR/join-token" ]; do sleep 0.05; done
    $BIN agent --join 127.0.0.1:18301 --token-file "$OSPREY_STATE_DIR/join-token" --name "agent-$i" \
      --threads 1 > "$OUT/$policy.agent-$i.log" 2>&1 &
    agents+=($!)
  done
  for _ in $(seq 1 600); do
    curl -sf 127.0.0.1:18300/v2/models/digits_pipeline/ready >/dev/null && break
    sleep 0.05
  done
  $BIN loadgen --model digits_pipeline --target 127.0.0.1:18300 --rate 200 --high 2000 --period-s 60 \
    --duration "$SECS" --json > "$OUT/$policy.json"
  kill -TERM $pid
  wait $pid || true
  for a in "${agents[@]}"; do kill $a 2>/dev/null || true; wait $a 2>/dev/null || true; done
  python3 - "$policy" "$OUT/$policy.log" "$OUT/$policy.json" <<'PY'
import json, re, sys
policy, log, js = sys.argv[1:]
plain = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(log)]
ran = [l for l in plain if "configured" in l and "target=digits_pipeline" in l]
def mean(key):
    v = [float(m.group(1)) for l in ran if (m := re.search(key + r'\W*=\W*"?([-0-9.]+)', l))]
    # The first decision measures the start-up interval (the initial configuration): skip it.
    v = v[1:] if len(v) > 1 else v
    return sum(v) / max(1, len(v))
j = json.loads(open(js).read().strip().splitlines()[-1])
print(f"| {policy} | {mean('ran_cost'):.2f} | {mean('ran_qos'):.4f} | {mean('ran_objective'):.4f} | {len(ran)} "
      f"| {j['sent']} | {j['ok']} | {j['rejected']} | {j['lost']} | {j.get('duplicates', 0)} "
      f"| {j.get('accuracy', 0):.4f} | {j['p50_ms']:.2f} | {j['p99_ms']:.2f} |")
PY
done

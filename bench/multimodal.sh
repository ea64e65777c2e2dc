#!/usr/bin/env bash
# The multi-modal scenario (scenarios/multimodal.toml) live on loopback: a release gateway with
# no in-process agent and three `osprey agent` processes standing for the scenario's nodes
# (nano ~10x slower than orin, xavier 1.2x; 1, 2 and 2 worker threads), the same three tenants
# and quality objectives, and one open-loop `osprey loadgen` per tenant on `digit_events` (the
# held-out paired events; camera sends only the image). Over the run, scaled from the
# scenario's 60 s: orin is slowed 3x from 1/3 to 7/12 of the time (SIGUSR1, SIGUSR2 restores)
# and xavier is killed at 2/3 and restarted at 5/6 (SIGKILL, a fresh agent). Every policy runs
# the same timeline, one after another, each on a fresh cluster.
# Writes OUT/summary.csv (policy,requests,accuracy,late_pct,rejected_pct,lost,goodput_rps) and
# OUT/multimodal.csv (the simulator's columns; goodput_of_oracle is empty live: the oracle
# needs hindsight), prints both, and draws them (`osprey report OUT`: mm_*.svg/png per policy
# and tenant, report.html).
# Usage: bench/multimodal.sh [SECONDS] [RATE] [OUT]   (default 30 s, 300 req/s, bench/multimodal/live)
#   POLICIES="quality-driven edf": only these.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-30}
RATE=${2:-300}
OUT=${3:-bench/multimodal/live}
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export OSPREY_STATE_DIR="$TMP/state"
unset OSPREY_JOIN_TOKEN # the gateway generates one in the state dir; agents read it there
declare -A PID
GW=
LOADS=()
cleanup() {
  for p in "${PID[@]:-}" "${LOADS[@]:-}" $GW; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
at() { python3 -c "print(round($DUR * $1, 2))"; }
T_SLOW=$(at 1/3); T_FAST=$(at 7/12); T_FAIL=$(at 2/3); T_BACK=$(at 5/6)
echo "digit_events live, $DUR s at $RATE req/s: orin 3x slower ${T_SLOW}-${T_FAST} s, xavier down ${T_FAIL}-${T_BACK} s"

start_agent() { # name slowdown threads
  local speed
  speed=$(python3 -c "print(1 / $2)")
  $BIN agent --join "$GRPC" --token-file "$OSPREY_STATE_DIR/join-token" --name "$1" --slowdown "$2" --speed-hint "$speed" --threads "$3" \
    >"$TMP/$1.log" 2>&1 &
  PID[$1]=$!
}
nodes_up() { # how many nodes the gateway lists up
  python3 - "$HTTP" <<'PY'
import json, sys, urllib.request
try:
    req = urllib.request.Request("http://%s/v2/cluster" % sys.argv[1], headers={"Authorization": "Bearer ops-key"})
    nodes = json.load(urllib.request.urlopen(req, timeout=2))["nodes"]
    print(sum(1 for n in nodes if n["up"]))
except Exception:
    print(0)
PY
}

for policy in ${POLICIES:-quality-driven no-refinement profiled fixed-ensemble edf llf dream}; do
  case $policy in
    quality-driven | no-refinement) rule=data-aware ;;
    profiled | fixed-ensemble) rule=profiled ;;
    *) rule=$policy ;;
  esac
  cat >"$TMP/osprey.toml" <<TOML
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_batch = 16
[limits]
max_queue = 4096
[scheduler]
policy = "$rule"
multimodal = "$policy"
fixed_variant = "medium"

# The script's own key, to watch the cluster (no load).
[[tenants]]
name = "ops"
role = "monitor"
api_keys = ["$($BIN hash-key ops-key)"]

[[tenants]]
name = "safety"
api_keys = ["$($BIN hash-key safety-key)"]
latency_slo_ms = 25
weight = 2.0
[tenants.quality]
max_ensemble = 3
min_confidence = 0.95
strategy = "enhance_confidence"
fusion = "product"

[[tenants]]
name = "analytics"
api_keys = ["$($BIN hash-key analytics-key)"]
latency_slo_ms = 150
[tenants.quality]
max_ensemble = 4
min_accuracy = 0.85
min_confidence = 0.99
strategy = "select_by_overall_accuracy"
fusion = "weighted_average"
explain = "always"

[[tenants]]
name = "camera"
api_keys = ["$($BIN hash-key camera-key)"]
latency_slo_ms = 40
[tenants.quality]
modalities = ["image"]
max_ensemble = 2
min_confidence = 0.9
TOML
  rm -rf "$OSPREY_STATE_DIR"
  $BIN serve --config "$TMP/osprey.toml" --local-agents 0 >"$TMP/gw.log" 2>"$TMP/gw.err" &
  GW=$!
  for _ in $(seq 1 600); do grep -q '^ready ' "$TMP/gw.log" && break; sleep 0.1; done
  HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$TMP/gw.log")
  GRPC=$(sed -n 's/^ready http=[^ ]* grpc=\(.*\)/\1/p' "$TMP/gw.log")
  [ -n "$HTTP" ] || { echo "gateway did not start:"; cat "$TMP/gw.err"; exit 1; }
  start_agent nano 10 1
  start_agent xavier 1.2 2
  start_agent orin 1 2
  for _ in $(seq 1 300); do [ "$(nodes_up)" = 3 ] && break; sleep 0.1; done
  [ "$(nodes_up)" = 3 ] || { echo "$policy: the three agents did not join"; for f in "$TMP"/*.log "$TMP/gw.err"; do echo "== $f"; tail -n 3 "$f"; done; exit 1; }
  # Warm up (not counted): every variant loaded and measured once.
  $BIN loadgen --model digit_events --target "$HTTP" --api-key analytics-key --rate 50 --duration 2 \
    --json >/dev/null
  LOADS=()
  for t in safety:0.3: analytics:0.5: camera:0.2:image; do
    IFS=: read -r name share mods <<<"$t"
    r=$(python3 -c "print($RATE * $share)")
    $BIN loadgen --model digit_events --target "$HTTP" --api-key "$name-key" --rate "$r" \
      --duration "$DUR" --timeout 10 --json ${mods:+--modalities "$mods"} >"$TMP/$policy-$name.json" &
    LOADS+=($!)
  done
  start=$(date +%s.%N)
  wait_until() { local left; left=$(python3 -c "print(max(0, $start + $1 - $(date +%s.%N)))"); sleep "$left"; }
  wait_until "$T_SLOW"; kill -USR1 "${PID[orin]}"
  wait_until "$T_FAST"; kill -USR2 "${PID[orin]}"
  wait_until "$T_FAIL"; kill -9 "${PID[xavier]}"; wait "${PID[xavier]}" 2>/dev/null || true
  wait_until "$T_BACK"; start_agent xavier 1.2 2
  for p in "${LOADS[@]}"; do wait "$p"; done
  LOADS=()
  for n in nano xavier orin; do kill "${PID[$n]}" 2>/dev/null || true; wait "${PID[$n]}" 2>/dev/null || true; done
  PID=()
  kill -TERM $GW; wait $GW || true
  GW=
  echo "$policy done"
done

python3 - "$TMP" "$OUT" ${POLICIES:-quality-driven no-refinement profiled fixed-ensemble edf llf dream} <<'PY'
import json, sys
tmp, out, policies = sys.argv[1], sys.argv[2], sys.argv[3:]
tenants = ["safety", "analytics", "camera"]
summary = ["policy,requests,accuracy,late_pct,rejected_pct,lost,goodput_rps"]
per = ["policy,tenant,requests,accuracy,late_pct,refined_pct,calls_per_request,explained_pct,goodput,goodput_of_oracle"]
for p in policies:
    rows = {t: json.loads(open("%s/%s-%s.json" % (tmp, p, t)).read().strip().splitlines()[-1]) for t in tenants}
    def row(name, rs):
        sent = sum(r["sent"] for r in rs)
        ok = sum(r["ok"] for r in rs)
        correct = sum(r["correct"] for r in rs)
        labelled = sum(r["labelled"] for r in rs)
        not_on_time = sum(r["late"] + r["rejected"] + r["failed"] + r["lost"] for r in rs)
        answers = sum(r.get("multimodal_answers", 0) for r in rs)
        share = lambda k: 100.0 * sum(r.get(k, 0) for r in rs) / answers if answers else 0.0
        calls = sum(r.get("calls", 0) for r in rs)
        goodput = sum(r.get("on_time_correct", 0) for r in rs)
        per.append("%s,%s,%d,%.4f,%.3f,%.2f,%.3f,%.2f,%d," % (
            p, name, sent, correct / labelled if labelled else 0.0, 100.0 * not_on_time / max(sent, 1),
            share("refined"), calls / max(sent, 1), share("explained"), goodput))
        return sent, labelled, correct, not_on_time, goodput
    for t in tenants:
        row(t, [rows[t]])
    sent, ok, correct, not_on_time, goodput = row("all", list(rows.values()))
    rejected = sum(r["rejected"] for r in rows.values())
    lost = sum(r["lost"] for r in rows.values())
    dur = rows["safety"]["duration_s"]
    summary.append("%s,%d,%.4f,%.3f,%.3f,%d,%.1f" % (
        p, sent, correct / ok if ok else 0.0, 100.0 * not_on_time / max(sent, 1),
        100.0 * rejected / max(sent, 1), lost, goodput / dur))
open(out + "/summary.csv", "w").write("\n".join(summary) + "\n")
open(out + "/multimodal.csv", "w").write("\n".join(per) + "\n")
print("\n".join(summary))
print()
print("\n".join(per))
PY
$BIN report "$OUT" --title "Osprey multi-modal, live on loopback ($DUR s, $RATE req/s)"

#!/usr/bin/env bash
# Fidelity: the same scenario live (release `osprey serve` + `osprey loadgen` on loopback) and
# in the simulator (profiles measured on this machine), policy by policy, with the gaps.
# Usage: bench/fidelity.sh [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
SCN=scenarios/accuracy-scaling.toml   # spoken_digits, 1 worker, Poisson (its rate), 50 ms objective
RATE=$(sed -n "s/^rate = \([0-9.]*\)$/\1/p" "$SCN")   # the live run offers the same rate
cargo build --release --quiet
BIN=target/release/osprey
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
POLICIES="fixed profiled data-aware"
$BIN bench "$SCN" --out "$TMP/sim" --duration "$DUR" --policies "${POLICIES// /,}" >/dev/null
for policy in $POLICIES; do
  cat >"$TMP/osprey.toml" <<CONF
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
max_batch = 16
[limits]
max_queue = 65536
[[agents]]
name = "edge-1"
threads = 1
[scheduler]
policy = "$policy"
[[tenants]]
name = "ops"
latency_slo_ms = 50
CONF
  $BIN serve --config "$TMP/osprey.toml" >"$TMP/serve.log" 2>/dev/null &
  PID=$!
  for _ in $(seq 1 600); do grep -q '^ready ' "$TMP/serve.log" && break; sleep 0.1; done
  HTTP=$(sed -n 's/^ready http=\([^ ]*\) grpc=.*/\1/p' "$TMP/serve.log")
  $BIN loadgen --model spoken_digits --target "$HTTP" --rate "$RATE" --duration "$DUR" --json | tail -1 >"$TMP/live-$policy.json"
  kill -TERM $PID; wait $PID || true
done
python3 - "$TMP" $POLICIES <<'PY'
import csv, json, sys
tmp, policies = sys.argv[1], sys.argv[2:]
sim = {r["policy"]: r for r in csv.DictReader(open(f"{tmp}/sim/summary.csv"))}
print(f"{'policy':12} {'metric':16} {'live':>10} {'sim':>10} {'gap':>8}")
for p in policies:
    live = json.load(open(f"{tmp}/live-{p}.json"))
    s = sim[p]
    dur = float(live["duration_s"])
    on_time_live = (live["sent"] * (1 - live["late_pct"] / 100)) / dur
    rows = [("on-time rps", on_time_live, float(s["throughput_rps"])),
            ("accuracy", live["accuracy"] or 0, float(s["accuracy"])),
            ("late %", live["late_pct"], float(s["late_pct"])),
            ("p50 ms", live["p50_ms"], float(s["p50_ms"])),
            ("p99 ms", live["p99_ms"], float(s["p99_ms"]))]
    for name, a, b in rows:
        gap = (b - a) / a * 100 if a else float("nan")
        print(f"{p:12} {name:16} {a:10.3f} {b:10.3f} {gap:7.1f}%")
PY

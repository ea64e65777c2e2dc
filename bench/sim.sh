#!/usr/bin/env bash
# Re-runs every shipped scenario in the simulator (release build) and writes its summary.csv
# and plots under bench/sim/NAME/, then prints each summary as a markdown table (the headline
# tables of bench/RESULTS.md) and the simulator's speed.
# Usage: bench/sim.sh [SCENARIO...]   (default: every scenarios/*.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/osprey
SCNS=("$@")
[ ${#SCNS[@]} -eq 0 ] && SCNS=(scenarios/*.toml)
for scn in "${SCNS[@]}"; do
  # Pipeline scenarios (OPD's experiment) print their own table: bench/opd.sh.
  grep -q '^pipeline = ' "$scn" && continue
  name=$(basename "$scn" .toml)
  out=bench/sim/$name
  speed=$($BIN bench "$scn" --out "$out" | sed -n 's/^simulated \([0-9]*\) events in .*: \([0-9]*\) events\/s/\1 \2/p')
  echo "#### $name"
  echo
  python3 - "$out/summary.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = ["policy", "requests", "late_pct", "rejected_pct", "accuracy", "utility", "throughput_rps", "cost", "qos", "p50_ms", "p99_ms"]
print("| " + " | ".join(c.replace("throughput_rps", "on-time rps").replace("_pct", " %").replace("_ms", " ms") for c in cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(r[c] for c in cols) + " |")
PY
  echo
  echo "events, events/s: $speed"
  echo
done

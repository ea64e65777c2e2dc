#!/usr/bin/env bash
# OPD's experiment in the simulator: Random / Greedy / IPA / OPD on the three workloads of
# scenarios/opd-*.toml (1200 s, 10 s interval, seeds fixed), with the shipped weights, into
# bench/opd/NAME/; prints each summary as a markdown table and the decision-time table.
# Usage: bench/opd.sh [--retrain]   (--retrain: train the LSTM and the three OPD policies first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/osprey
if [ "${1:-}" = "--retrain" ]; then
  $BIN train predictor --trace scenarios/opd-fluctuating.toml --trace scenarios/opd-steady-low.toml \
    --trace scenarios/opd-steady-high.toml --draws 2 --iterations 1500 \
    --out models/digits_pipeline/predictor.safetensors
  for w in steady-low fluctuating steady-high; do $BIN train opd scenarios/opd-$w.toml; done
fi
for w in steady-low fluctuating steady-high; do
  out=bench/opd/$w
  $BIN bench scenarios/opd-$w.toml --out "$out" | grep '^opd / ipa' || true
  echo "#### opd-$w"
  echo
  python3 - "$out/summary.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = ["policy", "cost", "qos", "objective", "late_pct", "lost", "decision_ms_p50", "decision_ms_p99"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(r[c] for c in cols) + " |")
PY
  echo
done
echo "#### decision time (ms, p50) against pipeline size"
echo
python3 - bench/opd/fluctuating/decision_time.csv <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
sizes = sorted({(int(r["stages"]), int(r["variants"])) for r in rows})
print("| policy | " + " | ".join(f"{s}x{v}" for s, v in sizes) + " |")
print("|" + "---|" * (len(sizes) + 1))
for p in ["random", "greedy", "ipa", "opd"]:
    cells = [next(r["decision_ms_p50"] for r in rows if r["policy"] == p and (int(r["stages"]), int(r["variants"])) == sz) for sz in sizes]
    print(f"| {p} | " + " | ".join(cells) + " |")
PY

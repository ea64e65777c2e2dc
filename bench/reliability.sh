#!/usr/bin/env bash
# The reliability suite's long runs, on release builds: 3x-capacity overload at full engine
# speed and agent chaos, each for SECONDS, plus the malformed-input suite and the drain test.
# Prints each run's figures (recorded in bench/RESULTS.md).
# Usage: bench/reliability.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-120}
echo "== overload at 3x capacity for ${SECS}s (one engine thread at full speed)"
OSPREY_OVERLOAD_SPEED=1 OSPREY_OVERLOAD_SECS=$SECS \
  cargo test --release -q -p osprey --test reliability three_times -- --nocapture 2>&1 | grep -E "capacity|test result"
echo "== agents killed and restarted in a loop for ${SECS}s"
OSPREY_CHAOS_SECS=$SECS \
  cargo test --release -q -p osprey --test cluster agents_killed -- --nocapture 2>&1 | grep -E "kills|test result"
echo "== malformed requests, graceful shutdown"
cargo test --release -q -p osprey --test reliability -- --nocapture hundreds sigterm 2>&1 |
  grep -E "malformed requests|drained|test result"

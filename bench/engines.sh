#!/usr/bin/env bash
# The two engines side by side on this machine: every variant of the zoo (models/) and the three
# models from the wild (tests/wild/, built by scripts/fetch_wild.py) run on tract and on
# onnxruntime at batch 1, 8 and 32, one thread per call on both, one engine after the other on
# the same inputs (`osprey profile --compare-engines`). Prints the table: p50 per engine, their
# ratio, throughput per engine and the largest output difference; a model one engine cannot
# load is listed under "not compared" with the reason.
# Needs the onnxruntime wheel (pip install onnxruntime). Usage: bench/engines.sh [ITERATIONS, default 30]
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=${1:-30}
cargo build --release --quiet -p osprey
BIN=$PWD/target/release/osprey
export OSPREY_ONNXRUNTIME=${OSPREY_ONNXRUNTIME:-$(python3 -c 'import onnxruntime, glob, os; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')}
[ -d tests/wild/magika ] || python3 scripts/fetch_wild.py >/dev/null
export OSPREY_LOG=warn
echo "## zoo (models/)"
"$BIN" profile --compare-engines --batch-sizes 1,8,32 --iterations "$ITER"
echo
echo "## models from the wild (tests/wild/)"
"$BIN" profile --compare-engines --model-repository tests/wild --batch-sizes 1,8,32 --iterations "$ITER"

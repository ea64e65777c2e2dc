#!/usr/bin/env bash
# Dynamic batching under load: does served throughput pass the engine's batch-1 throughput?
# A release `osprey serve` with ONE agent worker thread, the variant pinned, wrk at 1, 8 and 32
# connections with Triton's binary body (one held-out input), per model: requests/s, p50, p99,
# mean batch size formed and mean per-request accuracy-estimate time (both from /metrics),
# server CPU per request, and served requests/s over
# the engine's batch-1 single-thread calls/s (1e6 / `osprey overhead`'s engine p50, measured in
# the same run).
# Usage: bench/batching.sh [DURATION_S] [MODEL:VARIANT ...]
#        (default: 8 digits:medium spoken_digits:small; OSPREY_BIN=path for another build)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-8}
shift $(( $# < 1 ? $# : 1 ))
PAIRS=${*:-digits:medium spoken_digits:small}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
TMP=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$TMP"' EXIT
python3 bench/peers/make_body.py models "$TMP" >"$TMP/digits.hl"
cp "$TMP/body.bin" "$TMP/digits.bin"
cp "$TMP/body-spoken.bin" "$TMP/spoken_digits.bin"; cp "$TMP/body-spoken.hl" "$TMP/spoken_digits.hl"
printf '[[agents]]\nname = "local-0"\nthreads = 1\n' >"$TMP/one-worker.toml"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "| model | variant | connections | req/s | p50 ms | p99 ms | mean batch | estimate µs/req | server CPU µs/req | engine b1 calls/s | served / engine b1 |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for pair in $PAIRS; do
  model=${pair%%:*}; variant=${pair#*:}
  # The engine figure comes from this checkout's build unless ENGINE_BIN says otherwise (an
  # older OSPREY_BIN may have no `overhead --json`).
  "${ENGINE_BIN:-target/release/osprey}" overhead --variant "$variant" --batch-sizes 1 --requests 2000 --json 2>/dev/null >"$TMP/overhead.json"
  engine=$(python3 -c "import json,sys; print(next(json.loads(l)['engine_us_p50'] for l in open(sys.argv[1]) if json.loads(l)['model']=='$model'))" "$TMP/overhead.json")
  for c in 1 8 32; do
    "$BIN" serve --config "$TMP/one-worker.toml" --http-addr 127.0.0.1:"$PORT" --grpc-addr 127.0.0.1:0 >"$TMP/serve.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 600); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/health/ready" && break; sleep 0.1; done
    before=$(python3 bench/peers/proc.py "$PID")
    t=2; [ "$c" -lt 2 ] && t=1
    BODY=$TMP/$model.bin HEADER_LEN=$(cat "$TMP/$model.hl") wrk -t$t -c"$c" -d"${DUR}s" -s bench/peers/infer.lua \
      "http://127.0.0.1:$PORT/v2/models/$model/versions/$variant/infer" >"$TMP/wrk.out" 2>&1 || true
    after=$(python3 bench/peers/proc.py "$PID")
    curl -s "http://127.0.0.1:$PORT/metrics" >"$TMP/metrics.txt"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    python3 - "$model" "$variant" "$c" "$engine" "$before" "$after" "$TMP/wrk.out" "$TMP/metrics.txt" <<'PY'
import sys
model, variant, c, engine, before, after, wrk, metrics = sys.argv[1:]
f = next(l for l in open(wrk) if l.startswith("WRK")).split()
req, p50, p99, dur = int(f[1]), float(f[3]), float(f[4]), int(f[5]) / 1e6
cpu = (float(after.split()[0]) - float(before.split()[0])) * 1e6 / max(req, 1)
lab = f'{{model="{model}",variant="{variant}"}}'
val = {l.split()[0]: float(l.split()[1]) for l in open(metrics) if l.startswith("osprey_batch_size_") and lab in l}
batch = val.get(f"osprey_batch_size_sum{lab}", 0) / max(val.get(f"osprey_batch_size_count{lab}", 0), 1)
elab = f'{{model="{model}"}}'
est = {l.split()[0]: float(l.split()[1]) for l in open(metrics) if l.startswith("osprey_estimator_duration_seconds_") and elab in l}
est_us = 1e6 * est.get(f"osprey_estimator_duration_seconds_sum{elab}", 0) / max(est.get(f"osprey_estimator_duration_seconds_count{elab}", 0), 1)
rps, eng = req / dur, 1e6 / float(engine)
print(f"| {model} | {variant} | {c} | {rps:.0f} | {p50/1e3:.2f} | {p99/1e3:.2f} | {batch:.2f} | {est_us:.1f} | {cpu:.1f} | {eng:.0f} | {rps/eng:.2f}x |")
PY
  done
done

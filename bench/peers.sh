#!/usr/bin/env bash
# Osprey against MLServer (scikit-learn runtime) and Ray Serve (onnxruntime in a deployment),
# serving one model: digits/medium, the MLP 64-128-10 of models/digits (the same ONNX file for
# Osprey and Ray; for MLServer an sklearn MLPClassifier holding the file's weights, checked
# against onnxruntime before the run). All are driven by the same wrk script and V2 JSON body
# (one held-out image), in alternating rounds (A, B, C, A, B, C, ...), and the table shows
# requests/s, p50, p99, server CPU per request (process tree, user + system) and resident
# memory, then Osprey's ratios. "osprey-bin" is Osprey on the same request in Triton's binary
# form. Servers answer their default output: probabilities (Osprey, Ray) or the label
# (MLServer's sklearn runtime, computed from the same probabilities).
#
# Installs MLServer and Ray into a virtual environment (target/peers-venv, ~1 GB; kept between
# runs); not part of CI. Everything binds 127.0.0.1 (Ray: node address 127.0.0.1, no dashboard).
# Usage: bench/peers.sh [DURATION_S] [ROUNDS] [CONNECTIONS...]   (default: 10 2 1 8 32)
#        PEERS_ONLY=osprey bench/peers.sh ...   Osprey alone, nothing installed
#        OSPREY_BIN=path bench/peers.sh ...     another Osprey build
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
ROUNDS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
CONNS=${*:-1 8 32}
ONLY=${PEERS_ONLY:-}
VENV=${PEERS_VENV:-target/peers-venv}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
[ -n "${OSPREY_BIN:-}" ] || cargo build --release --quiet
BIN=${OSPREY_BIN:-target/release/osprey}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -- -"$p" 2>/dev/null; kill "$p" 2>/dev/null; done
  [ -x "$VENV/bin/ray" ] && [ -z "$ONLY" ] && "$VENV/bin/ray" stop --force >/dev/null 2>&1
  rm -rf "$TMP"
}
trap cleanup EXIT
HL=$(python3 bench/peers/make_body.py models "$TMP")
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {  # URL
  for _ in $(seq 1 1200); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "server at $1 did not become ready" >&2; exit 1
}

SERVERS=(osprey osprey-bin)
declare -A URL PID
OP=$(port)
setsid "$BIN" serve --http-addr 127.0.0.1:"$OP" --grpc-addr 127.0.0.1:0 >"$TMP/osprey.log" 2>&1 &
PID[osprey]=$!; PID[osprey-bin]=$!; PIDS+=($!)
URL[osprey]=http://127.0.0.1:$OP; URL[osprey-bin]=http://127.0.0.1:$OP
wait_ready "http://127.0.0.1:$OP/v2/health/ready"

if [ -z "$ONLY" ]; then
  if ! "$VENV/bin/python" -c 'import mlserver, mlserver_sklearn, ray.serve, onnxruntime, onnx, uvloop; assert tuple(map(int, uvloop.__version__.split(".")[:2])) < (0, 22)' 2>/dev/null; then
    echo "installing MLServer and Ray Serve into $VENV (once)" >&2
    python3 -m venv "$VENV"
    # MLServer 1.7.1's inference workers fail on uvloop >= 0.22 ("no current event loop").
    "$VENV/bin/pip" install -q mlserver mlserver-sklearn "ray[serve]" onnxruntime onnx "uvloop<0.22"
  fi
  mkdir -p "$TMP/mlserver/digits"
  "$VENV/bin/python" bench/peers/sklearn_model.py models/digits/medium.onnx models/digits/eval/inputs.bin "$TMP/mlserver/digits" >&2
  MP=$(port)
  printf '{"host": "127.0.0.1", "http_port": %s, "grpc_port": %s, "metrics_port": %s}\n' "$MP" "$(port)" "$(port)" >"$TMP/mlserver/settings.json"
  setsid "$VENV/bin/mlserver" start "$TMP/mlserver" >"$TMP/mlserver.log" 2>&1 &
  PID[mlserver]=$!; PIDS+=($!)
  URL[mlserver]=http://127.0.0.1:$MP
  RP=$(port)
  setsid "$VENV/bin/python" bench/peers/ray_app.py models/digits/medium.onnx "$RP" >"$TMP/ray.log" 2>&1 &
  PID[ray]=$!; PIDS+=($!)
  URL[ray]=http://127.0.0.1:$RP
  wait_ready "http://127.0.0.1:$MP/v2/health/ready"
  for _ in $(seq 1 1200); do grep -q '^ready' "$TMP/ray.log" && break; sleep 0.1; done
  grep -q '^ready' "$TMP/ray.log" || { echo "Ray Serve did not start:" >&2; tail -20 "$TMP/ray.log" >&2; exit 1; }
  SERVERS+=(mlserver ray)
fi

measure() {  # SERVER CONNS -> appends a row to $TMP/rows
  local s=$1 c=$2 body=$TMP/body.json hl="" threads=2
  [ "$s" = osprey-bin ] && { body=$TMP/body.bin; hl=$HL; }
  [ "$c" -lt 2 ] && threads=1
  # Osprey pins the variant; MLServer and Ray serve only this model. The process tree counts
  # MLServer's inference worker and every Ray process (the app's ray.init starts them).
  local path=/v2/models/digits/infer before after
  case $s in osprey*) path=/v2/models/digits/versions/medium/infer ;; esac
  before=$(python3 bench/peers/proc.py "${PID[$s]}")
  BODY=$body HEADER_LEN=$hl wrk -t"$threads" -c"$c" -d"${DUR}s" -s bench/peers/infer.lua \
    "${URL[$s]}$path" >"$TMP/wrk.out" 2>&1 || true
  after=$(python3 bench/peers/proc.py "${PID[$s]}")
  echo "$s $c $before $after $(grep '^WRK' "$TMP/wrk.out" || echo 'WRK 0 0 0 0 1')" >>"$TMP/rows"
}
echo "digits/medium, ${DUR}s per cell, $ROUNDS round(s), connections: $CONNS; servers: ${SERVERS[*]}" >&2
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONNS; do
    for s in "${SERVERS[@]}"; do
      echo "round $r/$ROUNDS: $s at $c connection(s)" >&2
      measure "$s" "$c"
    done
  done
done
python3 bench/peers/report.py "$TMP/rows"

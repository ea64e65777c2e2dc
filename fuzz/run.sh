#!/usr/bin/env bash
# Builds the fuzz targets with AFL++ instrumentation (cargo-afl, stable toolchain) and fuzzes
# each for SECONDS, then reports executions and crashes per target; exits 1 on any crash.
# Needs: cargo install cargo-afl (it builds and runs its own AFL++).
# Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]   (CI smoke: a few seconds each)
# OSPREY_FUZZ_PROFILE=smoke builds unoptimised targets (quick to build, slow to run):
# cargo-afl sets -C opt-level from AFL_OPT_LEVEL (3 unless told), over any profile's.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-10}
shift || true
TARGETS=${*:-json_tensor http_body grpc_request model_toml}
PROFILE=${OSPREY_FUZZ_PROFILE:-release}
if [ "$PROFILE" = smoke ]; then export AFL_OPT_LEVEL=${AFL_OPT_LEVEL:-0}; fi
cargo afl build --profile "$PROFILE" --quiet
# No core-dump handler or CPU governor changes in CI: tell afl-fuzz not to insist.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_QUIET=1
export AFL_SKIP_CRASHES=1 AFL_NO_AFFINITY=1
status=0
printf "%-14s %12s %8s %8s %8s\n" target executions paths crashes hangs
for t in $TARGETS; do
  out="out/$t"
  rm -rf "$out"; mkdir -p out
  timeout -s INT $((SECS + 30)) cargo afl fuzz -V "$SECS" -i "seeds/$t" -o "$out" "target/$PROFILE/$t" >/dev/null 2>&1 || true
  stats="$out/default/fuzzer_stats"
  if [ ! -f "$stats" ]; then
    echo "$t: afl-fuzz did not run (see: cargo afl fuzz -i seeds/$t -o $out target/$PROFILE/$t)"
    status=1
    continue
  fi
  val() { sed -n "s/^$1 *: *//p" "$stats"; }
  printf "%-14s %12s %8s %8s %8s\n" "$t" "$(val execs_done)" "$(val corpus_count)" "$(val saved_crashes)" "$(val saved_hangs)"
  if [ "$(val saved_crashes)" != "0" ]; then
    echo "  crashes in $out/default/crashes/"
    status=1
  fi
done
exit $status

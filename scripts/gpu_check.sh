#!/usr/bin/env bash
# GPU check: the `gpu` tests, then the forward attention benchmark, in one call.
# Runs from the source tree with the machine's own torch and triton (no install, no network).
#   scripts/gpu_check.sh OUTDIR [all|tests|bench] [default|quick]
# Writes pytest's log, junit XML and the benchmark's JSON/markdown/PNG into OUTDIR. The
# parts can run in separate calls where one call has a time limit.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [all|tests|bench] [default|quick]}
what=${2:-all}
suite=${3:-default}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODELACCEL_COMMIT=${MODELACCEL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

python3 -m modelaccel info 2>&1 | tee "$out/info.txt"
tests_rc=0
bench_rc=0
if [ "$what" != bench ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$out/gpu_tests.xml" tests 2>&1 | tee "$out/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
if [ "$what" != tests ]; then
  python3 -m modelaccel bench attention --suite "$suite" --out "$out" 2>&1 | tee "$out/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
echo "gpu tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

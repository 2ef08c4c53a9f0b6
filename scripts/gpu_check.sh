#!/usr/bin/env bash
# GPU check: the `gpu` tests and the benchmarks, in one call.
# Runs from the source tree with the machine's own torch and triton (no install, no network).
#   scripts/gpu_check.sh OUTDIR [PART ...]
# PART: tests, fwd, bwd, varlen, train, decode, transformers (default: all, in that order);
# gluon (benchmarks/gluon_fwd.py: each Gluon forward configuration against the tuned
# flash_attn_func and SDPA), profile_bwd (benchmarks/profile_bwd.py: the backward's kernels
# by time, next to SDPA's), gluon_bwd (the Gluon backward's GPU tests, then
# benchmarks/gluon_bwd.py) and bwd_host (benchmarks/profile_host.py bwd: host time of a short
# backward, Triton and Gluon launches), alloc (profile_host.py alloc: torch.empty's host
# time), gluon_order (benchmarks/gluon_launch_order.py: the
# Gluon kernels' launch groups), timeline (benchmarks/gluon_fwd_timeline.py: where a tile of
# the Gluon forward spends its time, from the kernel's trace), profile_tf
# (benchmarks/profile_transformers.py on PROFILE_SHAPES, default "8x2048 8x512 1x2048": a
# 4-layer prefill's kernels per attention implementation, and where they differ), generate
# (benchmarks/generate_rows.py: the Transformers benchmark's generate rows alone), gaps
# (benchmarks/prefill_gaps.py on GAPS_ROWS: GPU idle time, host time and syncs of the TTFT
# and training rows per provider), clocks (benchmarks/clock_probe.py on CLOCK_ROWS: the same
# rows' forward/backward ms, kernel classes, SM clock and power per provider), host_call
# (benchmarks/host_attention_call.py: host time of one attention call and of a 1-layer
# forward, ours against SDPA's), integrations_on_cuda (all of tests/integrations, the CPU
# suite's tests included, on the GPU: generate there compiles static-cache steps), paged_probe
# (benchmarks/decode_paged_probe.py: paged against contiguous decoding, pages in order and scattered) and dq_tma (the GPU tests of the
# Gluon backward's dQ-by-TMA-reduce launches (DQ_TMA_TESTS: their pytest -k), then those
# launches against their atomic twins in benchmarks/gluon_bwd.py, untuned) and dealt_probe
# (the dealt dq_tma launch, its atomic twin and the per-tile dq_tma launch timed five times
# in turn at 1K, 2K and the 48-head row: the dealt one ran two rows 16-23% slow once) only
# when named; GLUON_BWD_ARGS narrows the gluon_bwd sweep
# (benchmarks/gluon_bwd.py's arguments after OUT.json). A device call
# has a time limit, so the parts can go in separate calls. TRANSFORMERS_ARGS=--no-generate
# leaves the generate rows out of part transformers (part generate runs them alone). PYTEST_ARGS narrows the tests
# (test paths, e.g. PYTEST_ARGS=tests/attention/test_flash_bwd_gpu.py); SUITE=quick runs the benchmarks' smoke rows.
# Writes logs, junit XML and the benchmarks' JSON/markdown/PNG into OUTDIR. Pass
# MODELACCEL_COMMIT when the tree has no .git (the device copy has none).
# The tests run with MODELACCEL_TUNING=off (first launch candidates, nothing timed; the
# test_every_launch_configuration tests cover each candidate); set MODELACCEL_TUNING=on to
# tune as users do. Launch-tuning choices go to OUTDIR/tuning (MODELACCEL_CACHE_DIR). TUNING_SEED=DIR copies
# earlier choices (such a tuning folder, carried to the machine) in first: each class then
# compiles one configuration instead of timing every candidate, which is most of the GPU
# tests' time. Leave it unset for benchmarks after a kernel change (stale choices).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [tests|fwd|bwd|varlen|train|decode|transformers|gluon ...]}
shift
parts=${*:-tests fwd bwd varlen train decode transformers}
suite=${SUITE:-default}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the script moves to the repo root
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODELACCEL_COMMIT=${MODELACCEL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

export MODELACCEL_CACHE_DIR=${MODELACCEL_CACHE_DIR:-$out/tuning}
mkdir -p "$MODELACCEL_CACHE_DIR"
if [ -n "${TUNING_SEED:-}" ] && [ -d "$TUNING_SEED" ]; then
  cp -n "$TUNING_SEED"/*.json "$MODELACCEL_CACHE_DIR"/ 2>/dev/null
fi
python3 -m modelaccel info > "$out/info.txt" 2>&1
failed=""
run() {  # run NAME COMMAND...: log to OUTDIR/NAME.log, remember failures
  local name=$1
  shift
  "$@" > "$out/$name.log" 2>&1 || failed="$failed $name"
  tail -n 40 "$out/$name.log"
}
for part in $parts; do
  case $part in
    tests) run gpu_tests env MODELACCEL_TUNING=${MODELACCEL_TUNING:-off} python3 -m pytest -q -m gpu -p no:cacheprovider \
             --durations=25 --junitxml="$out/gpu_tests.xml" ${PYTEST_ARGS:-tests} ;;
    fwd) run bench_fwd python3 -m modelaccel bench attention --suite "$suite" --out "$out" ;;
    bwd) run bench_bwd python3 -m modelaccel bench attention --mode bwd --suite "$suite" --out "$out" ;;
    varlen) run bench_varlen python3 -m modelaccel bench attention --varlen --suite "$suite" --out "$out" ;;
    train) run train python3 -m modelaccel bench train --out "$out" ;;
    decode) run bench_decode python3 -m modelaccel bench decode-attention --suite "$suite" --out "$out" ;;
    transformers) run bench_transformers python3 -m modelaccel bench transformers --suite "$suite" --out "$out" ${TRANSFORMERS_ARGS:-} ;;
    gluon) run bench_gluon python3 benchmarks/gluon_fwd.py "$out/gluon_fwd.json" ;;
    profile_bwd) run profile_bwd python3 benchmarks/profile_bwd.py "$out/profile_bwd.json" ;;
    bwd_host) run bwd_host python3 benchmarks/profile_host.py bwd ;;
    alloc) run alloc python3 benchmarks/profile_host.py alloc ;;
    dq_tma) run dq_tma_tests timeout 300 env MODELACCEL_TUNING=off python3 -m pytest -q -m gpu -p no:cacheprovider -x \
              tests/attention/test_gluon_bwd_gpu.py -k "${DQ_TMA_TESTS:-K1SIT or K1ST or G8K1T}"
            run bench_dq_tma timeout 300 env MODELACCEL_TUNING=off python3 benchmarks/gluon_bwd.py "$out/gluon_bwd_dq_tma.json" \
              gluon_s2q32pG8K1SI,gluon_s2q32pG8K1SIT,gluon_s2q64pG8K1S,gluon_s2q64pG8K1ST,gluon_s2q64,gluon_s2q64G8K1T ;;
    dealt_probe) run dealt_probe timeout 400 env MODELACCEL_TUNING=off python3 benchmarks/gluon_bwd.py \
                   "$out/gluon_bwd_dealt_probe.json" gluon_s2q64pG8K1S,gluon_s2q64pG8K1ST,gluon_s2q64G8K1T --rounds=5 \
                   --rows=16x16x16x1024,2x48x48x1024,8x16x16x2048 ;;
    paged_probe) run paged_probe python3 benchmarks/decode_paged_probe.py "$out/decode_paged_probe.json" ;;
    integrations_on_cuda) run integrations_on_cuda env MODELACCEL_TUNING=${MODELACCEL_TUNING:-off} python3 -m pytest -q \
                            -p no:cacheprovider -rfE --durations=15 --junitxml="$out/integrations_on_cuda.xml" tests/integrations ;;
    host_call) run host_call python3 benchmarks/host_attention_call.py "$out/host_attention_call.json" ;;
    gaps) run prefill_gaps python3 benchmarks/prefill_gaps.py "$out/prefill_gaps.json" ${GAPS_ROWS:-} ;;
    clocks) run clocks python3 benchmarks/clock_probe.py "$out/clock_probe.json" ${CLOCK_ROWS:-} ;;
    generate) run generate python3 benchmarks/generate_rows.py "$out/generate_rows.json" ;;
    profile_tf) run profile_tf python3 benchmarks/profile_transformers.py ${PROFILE_SHAPES:-8x2048 8x512 1x2048} ;;
    timeline) run timeline python3 benchmarks/gluon_fwd_timeline.py "$out/gluon_fwd_timeline.json" ;;
    gluon_order) run gluon_order python3 benchmarks/gluon_launch_order.py "$out/gluon_launch_order.json" ;;
    gluon_bwd) run gluon_bwd_tests env MODELACCEL_TUNING=off python3 -m pytest -q -m gpu -p no:cacheprovider -x \
                 tests/attention/test_gluon_bwd_gpu.py
               run bench_gluon_bwd python3 benchmarks/gluon_bwd.py "$out/gluon_bwd.json" ${GLUON_BWD_ARGS:-} ;;
    *) echo "unknown part: $part"; failed="$failed $part" ;;
  esac
done
echo "failed parts:${failed:- none}"
[ -z "$failed" ]

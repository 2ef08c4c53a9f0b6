"""Each launch configuration of the warp-specialized Gluon forward against flash_attn_func
(tuned over the Triton and Gluon candidates) and SDPA, same inputs.

Each configuration of attention/gluon_fwd.GLUON_WS_CONFIGS is checked against SDPA flash's
output first (a wrong one is reported and not timed), then timed by bench() (median);
modelaccel (flash_attn_func as users call it), SDPA FLASH_ATTENTION and CUDNN_ATTENTION in
the same run. bf16, head dim 128, causal: the forward benchmark's square rows and the
Llama-3-8B prefill shapes; fp16 d128 non-causal on two rows.
With --hf-layout, the Llama-3-8B rows only, with q and k laid out as Transformers hands
them over after RoPE ([batch, heads, seqlen, headdim] contiguous, seen through a transpose)
and v as [batch, seqlen, heads, headdim]: the layout of the TTFT benchmark's calls.
--hf-rows: those rows in the plain layout.
Usage: python benchmarks/gluon_fwd.py OUT.json [--hf-layout | --hf-rows | --short-rows] [--eager]
(--short-rows: SHORT_HF_ROWS; with --hf-layout, in Transformers' layout; --eager: bench())
"""

import json
import sys

import torch
import triton

from modelaccel.attention.gluon_fwd import GLUON_WS_CONFIGS, flash_attn_forward_gluon_ws
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import attention_flops, collect_metadata, compare_outputs, _provider_call, tflops

# (batch, query heads, kv heads, tokens, causal, dtype)
ROWS = [(16, 16, 16, 1024, True), (8, 16, 16, 2048, True), (4, 16, 16, 4096, True), (2, 16, 16, 8192, True),
        (1, 16, 16, 16384, True), (1, 32, 8, 2048, True), (1, 32, 8, 8192, True), (4, 16, 16, 4096, False),
        (1, 16, 16, 16384, False)]
HF_ROWS = [(1, 32, 8, 2048, True), (1, 32, 8, 8192, True), (8, 32, 8, 2048, True), (8, 32, 8, 8192, True)]
# Llama-3-8B prefills below the Gluon forward's tuning floor (flash_fwd._GLUON_MIN_FLOPS):
# Transformers' 512-token batch-8 TTFT is GPU-bound and 0.4-1.4% slower than SDPA's.
SHORT_HF_ROWS = [(8, 32, 8, 512, True), (4, 32, 8, 512, True), (1, 32, 8, 1024, True), (2, 32, 8, 1024, True)]


def bench(fn):
    """GPU time alone (CUDA graph replay, L2 emptied before each): below ~0.1 ms a call the
    GPU machine's host time exceeds the GPU's, and do_bench's numbers for the 512-1024-token
    rows moved by 1.5x between runs (results/tuning/gluon_fwd_persistent_*); --eager times
    direct calls with do_bench instead."""
    if "--eager" in sys.argv[2:]:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return _gpu_ms(fn)


def main():
    result = {**collect_metadata(), "rows": []}
    hf_layout = "--hf-layout" in sys.argv[2:]
    result["layout"] = "q, k: [b, h, s, d] seen as [b, s, h, d]; v: [b, s, h, d]" if hf_layout else "[b, s, h, d]"
    rows = HF_ROWS if hf_layout or "--hf-rows" in sys.argv[2:] else ROWS
    if "--short-rows" in sys.argv[2:]:
        rows = SHORT_HF_ROWS
    for batch, hq, hk, n, causal in rows:
        dtype = torch.bfloat16 if causal else torch.float16
        q = torch.randn(batch, n, hq, 128, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, n, hk, 128, device="cuda", dtype=dtype) for _ in range(2))
        if hf_layout:
            q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
        flops = attention_flops(batch, hq, n, n, 128, causal)
        row = {"shape": [batch, hq, hk, n], "causal": causal, "dtype": str(dtype), "tflops": {}, "errors": {}}
        with torch.inference_mode():
            # A peer's context (SDPA's backend choice) is a one-shot context manager: one per use.
            fn, ctx = _provider_call("flash", q, k, v, causal)
            with ctx:
                ref = fn().transpose(1, 2)
            for name in ("modelaccel", "flash", "cudnn"):
                fn, ctx = _provider_call(name, q, k, v, causal)
                with ctx:
                    row["tflops"][name] = tflops(flops, bench(fn))
            candidates = {}
            for config in GLUON_WS_CONFIGS:
                bn, stages, pingpong, *persistent = config
                name = (f"ws{bn}x{stages}{'pp' if pingpong else ''}{'per' if persistent and persistent[0] else ''}"
                        f"{f'G{persistent[1]}' if len(persistent) > 1 else ''}"
                        f"{'kv' if len(persistent) > 2 and persistent[2] else ''}")
                candidates[name] = (lambda config=config:
                                    flash_attn_forward_gluon_ws(q, k, v, 128 ** -0.5, causal, *config)[0])
            for name, call in candidates.items():
                try:
                    check = compare_outputs(call(), ref, "bf16" if dtype == torch.bfloat16 else "fp16")
                except Exception as exc:  # noqa: BLE001 - out of shared memory, compile errors: report and go on
                    row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    continue
                if not check["ok"]:
                    row["errors"][name] = f"wrong output: {check}"
                    continue
                row["tflops"][name] = tflops(flops, bench(call))
        result["rows"].append(row)
        ours = [(t, p) for p, t in row["tflops"].items() if p not in ("modelaccel", "flash", "cudnn")]
        best = max(ours) if ours else (None, None)
        print(batch, hq, hk, n, "causal" if causal else "full",
              {p: round(t, 1) for p, t in row["tflops"].items()}, "best gluon", best, row["errors"] or "", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

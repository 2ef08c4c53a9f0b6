"""Tuning experiment for the forward kernel: every block shape x {TMA, pointers} on a few
shapes, next to SDPA's flash and cuDNN backends, on one GPU.

Usage: python benchmarks/tune_attention_fwd.py [OUT_JSON]
It checks each variant against SDPA before timing it; a variant that fails to compile or
disagrees is recorded as such, not timed.
"""

import json
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelaccel.attention.flash_fwd import _GPU_CONFIGS, flash_attn_forward

SHAPES = [  # (batch, hq, hk, seqlen_q, seqlen_k, headdim, causal, dtype)
    (4, 16, 16, 4096, 4096, 128, False, torch.float16),
    (16, 16, 16, 1024, 1024, 128, False, torch.float16),
    (2, 48, 48, 1021, 1020, 128, False, torch.float16),
    (4, 16, 16, 4096, 4096, 128, True, torch.bfloat16),
    (4, 16, 16, 4096, 4096, 64, False, torch.float16),
]

# Candidates under trial, not yet in the kernel's autotuning list: 256-row query tiles over
# four warpgroups halve the K/V shared-memory reads per FLOP.
EXTRA_CONFIGS = {
    128: [(256, 128, 16, 2), (256, 64, 16, 3), (256, 64, 16, 2)],
    64: [(256, 64, 16, 3), (256, 128, 16, 2)],
}


def tflops(ms, b, hq, sq, sk, d, causal):
    flops = 4 * b * hq * sq * sk * d * (0.5 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def main(out_path):
    results = []
    for b, hq, hk, sq, sk, d, causal, dtype in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        row = {"shape": [b, hq, hk, sq, sk, d, causal, str(dtype)], "variants": {}}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            try:
                ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                row["variants"][name] = round(tflops(ms, b, hq, sq, sk, d, causal), 1)
            except Exception as e:  # a backend that refuses a shape is recorded, not fatal
                row["variants"][name] = f"error: {type(e).__name__}"
        block_d = max(triton.next_power_of_2(d), 16)
        configs = _GPU_CONFIGS[min(c for c in _GPU_CONFIGS if c >= block_d)] + EXTRA_CONFIGS.get(block_d, [])
        for bm, bn, warps, stages in configs:
            for use_tma in (True, False):
                name = f"bm{bm}_bn{bn}_w{warps}_s{stages}_{'tma' if use_tma else 'ptr'}"

                def run(bm=bm, bn=bn, use_tma=use_tma, warps=warps, stages=stages):
                    return flash_attn_forward(q, k, v, d ** -0.5, causal, use_tma=use_tma, block_m=bm,
                                              block_n=bn, num_warps=warps, num_stages=stages)[0]
                try:
                    out = run()
                    err = (out.float() - ref.float()).abs().max().item()
                    if not err < 2e-2:
                        row["variants"][name] = f"mismatch {err:.3g}"
                        continue
                    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                    row["variants"][name] = round(tflops(ms, b, hq, sq, sk, d, causal), 1)
                except Exception as e:  # compile failures and out-of-resources are data here
                    row["variants"][name] = f"error: {type(e).__name__}: {str(e)[:120]}"
        best = max((v, k) for k, v in row["variants"].items() if isinstance(v, float) and not k.startswith("sdpa"))
        print(row["shape"], "flash", row["variants"]["sdpa_flash"], "cudnn", row["variants"]["sdpa_cudnn"],
              "best", best, flush=True)
        results.append(row)
        del q, k, v, qt, kt, vt, ref
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tune_attention_fwd.json")

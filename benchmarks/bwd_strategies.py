"""Time the two backward strategies side by side on the backward benchmark's rows:
deterministic (dQ kernel + dK/dV kernel, 7 matmuls per tile pair) and atomic dQ (delta
kernel + dK/dV kernel adding dS K into a float32 dQ, 5 matmuls). Each is tuned on its own
candidates first; the tuners' choices are printed with the timings.

bf16, head dim 128, causal. do_bench median of flash_attn_backward alone (forward once).
Usage: python benchmarks/bwd_strategies.py OUT.json
"""

import json
import sys

import torch
import triton

from modelaccel.attention import flash_bwd
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.bench.attention import BWD_FLOPS_FACTOR, attention_flops, collect_metadata, make_tables


def main():
    (table,) = make_tables(mode="bwd")
    results = {"metadata": collect_metadata(), "rows": []}
    for batch, hq, hk, sq, sk in table.shapes:
        torch.manual_seed(0)
        q = torch.randn(batch, sq, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, sk, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        scale = 128 ** -0.5
        out, lse = flash_attn_forward(q, k, v, scale, causal=True)
        flops = BWD_FLOPS_FACTOR * attention_flops(batch, hq, sq, sk, 128, True)
        row = {"shape": [batch, hq, hk, sq, sk]}
        grads = {}
        for name, atomic in (("deterministic", False), ("atomic_dq", True)):
            def call():
                return flash_bwd.flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True, atomic_dq=atomic)
            grads[name] = call()
            ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        row["max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                  for a, b in zip(grads["deterministic"], grads["atomic_dq"]))
        row["ratio_atomic_over_deterministic"] = row["deterministic"]["ms"] / row["atomic_dq"]["ms"]
        results["rows"].append(row)
        print(row, flush=True)
    results["choices"] = {"dq": flash_bwd._dq_tuner.choices, "dkdv": flash_bwd._dkdv_tuner.choices}
    print(json.dumps(results["choices"], indent=0))
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

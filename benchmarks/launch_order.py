"""Causal attention launched in grid order or longest first in groups of batch-heads.

Under a causal mask the forward's (and dQ's) last query blocks and the dK/dV kernel's first
key blocks do the most work. In grid order the last batch-head's long programs start at
the end and run on a few SMs while the rest idle; flash_fwd.LAUNCH_GROUP = G numbers the
programs of all three kernels longest first within groups of G batch-heads
(flash_fwd._grid_position). This times the forward and the backward
(launchers, the tuned launch of grid order for every G) on the backward benchmark's rows
and the Llama-3-8B prefill shape; two rounds, the orders interleaved.
Usage: python benchmarks/launch_order.py OUT.json [G ...]   (default G: 0 4 16)
"""

import datetime
import json
import sys

import torch
import triton

from modelaccel.attention import flash_fwd
from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.bench.attention import BWD_FLOPS_FACTOR, attention_flops

# (batch, query heads, kv heads, tokens)
SHAPES = [(16, 16, 16, 1024), (8, 16, 16, 2048), (4, 16, 16, 4096), (2, 16, 16, 8192), (1, 16, 16, 16384),
          (2, 48, 48, 1024), (2, 32, 8, 8192), (1, 32, 8, 8192), (1, 32, 8, 2048)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def set_group(group):
    flash_fwd.LAUNCH_GROUP = group


def main():
    groups = [int(g) for g in sys.argv[2:]] or [0, 4, 16]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "timing": "do_bench median",
              "groups": groups, "rows": []}
    for batch, hq, hk, n in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(batch, n, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, n, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        scale = 128 ** -0.5
        row = {"shape": [batch, hq, hk, n], "ms": {}}
        set_group(0)
        out, lse = flash_attn_forward(q, k, v, scale, causal=True)  # tunes the class once, in grid order
        ref = flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True)
        for rnd in range(2):
            for group in (groups if rnd == 0 else groups[::-1]):
                set_group(group)
                f_ms = bench(lambda: flash_attn_forward(q, k, v, scale, causal=True))
                b_ms = bench(lambda: flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True))
                row["ms"].setdefault(f"fwd G{group}", []).append(f_ms)
                row["ms"].setdefault(f"bwd G{group}", []).append(b_ms)
        for group in groups:  # every order computes the same function (atomic dQ: up to rounding)
            set_group(group)
            got = flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True)
            row[f"bwd_max_abs_diff G{group}"] = max((a.float() - b.float()).abs().max().item()
                                                    for a, b in zip(got, ref))
        set_group(0)
        fl = attention_flops(batch, hq, n, n, 128, causal=True)
        row["tflops"] = {key: (fl * (BWD_FLOPS_FACTOR if key.startswith("bwd") else 1.0)) / (min(v) * 1e-3) / 1e12
                         for key, v in row["ms"].items()}
        t = row["tflops"]
        print((batch, hq, hk, n), "TFLOPS fwd", " ".join(f"G{g} {t[f'fwd G{g}']:.1f}" for g in groups),
              "| bwd", " ".join(f"G{g} {t[f'bwd G{g}']:.1f}" for g in groups), flush=True)
        result["rows"].append(row)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Causal attention with the query blocks launched last-first (HEAVY_FIRST) or in order.

Under a causal mask query block i sees i + 1 key blocks, so the grid's last programs are
its longest; launched in order they finish on a few SMs while the rest idle. This times
the forward and the backward (launchers, same launch configuration for both orders) on
the benchmark's causal bf16 head-dim-128 rows and the Llama-3-8B prefill shape, with SDPA's
cuDNN and FlashAttention-2 backends in the same run; two rounds, orders interleaved.
Usage: python benchmarks/heavy_first.py OUT.json
"""

import datetime
import json
import sys

import torch
import triton

from modelaccel.attention import flash_fwd
from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.bench.attention import BWD_FLOPS_FACTOR, _forward_with_graph, _provider_call, attention_flops

# (batch, query heads, kv heads, tokens)
SHAPES = [(16, 16, 16, 1024), (8, 16, 16, 2048), (4, 16, 16, 4096), (2, 16, 16, 8192), (1, 16, 16, 16384),
          (2, 48, 48, 1024), (2, 32, 8, 8192), (1, 32, 8, 8192), (1, 32, 8, 2048)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_ms(provider, q, k, v, dout):
    """(forward ms, backward ms) of SDPA's `provider` backend ("cudnn"/"flash"), causal,
    through the attention benchmark's own calls."""
    fn, ctx = _provider_call(provider, q, k, v, True)
    with ctx:
        fwd_ms = bench(fn)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out, reason = _forward_with_graph(provider, qg, kg, vg, True)
    if out is None:
        raise RuntimeError(reason)
    return fwd_ms, bench(lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True))


def main():
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "timing": "do_bench median",
              "rows": []}
    for batch, hq, hk, n in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(batch, n, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, n, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        scale = 128 ** -0.5
        row = {"shape": [batch, hq, hk, n], "ms": {}}
        flash_fwd.HEAVY_FIRST = False
        out, lse = flash_attn_forward(q, k, v, scale, causal=True)  # tunes the class once
        flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True)
        for rnd in range(2):
            for heavy_first in ((False, True) if rnd == 0 else (True, False)):
                flash_fwd.HEAVY_FIRST = heavy_first
                name = "heavy_first" if heavy_first else "in_order"
                f_ms = bench(lambda: flash_attn_forward(q, k, v, scale, causal=True))
                b_ms = bench(lambda: flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True))
                row["ms"].setdefault(f"fwd {name}", []).append(f_ms)
                row["ms"].setdefault(f"bwd {name}", []).append(b_ms)
        flash_fwd.HEAVY_FIRST = True
        ref_out = out.float()
        got = flash_attn_forward(q, k, v, scale, causal=True)[0].float()
        row["heavy_first_max_abs_diff_vs_in_order"] = (got - ref_out).abs().max().item()
        for label in ("cudnn", "flash"):
            try:
                fwd_ms, bwd_ms = sdpa_ms(label, q, k, v, dout)
                row["ms"][f"fwd {label}"], row["ms"][f"bwd {label}"] = [fwd_ms], [bwd_ms]
            except RuntimeError as exc:
                row[f"{label}_error"] = str(exc).splitlines()[0]
        fl = attention_flops(batch, hq, n, n, 128, causal=True)
        row["tflops"] = {key: (fl * (BWD_FLOPS_FACTOR if key.startswith("bwd") else 1.0)) / (min(v) * 1e-3) / 1e12
                         for key, v in row["ms"].items()}
        t = row["tflops"]
        print(f"{(batch, hq, hk, n)} TFLOPS fwd in-order {t['fwd in_order']:.1f} heavy-first {t['fwd heavy_first']:.1f}"
              f" cudnn {t.get('fwd cudnn', float('nan')):.1f} flash {t.get('fwd flash', float('nan')):.1f} | bwd"
              f" in-order {t['bwd in_order']:.1f} heavy-first {t['bwd heavy_first']:.1f}"
              f" cudnn {t.get('bwd cudnn', float('nan')):.1f} flash {t.get('bwd flash', float('nan')):.1f}",
              flush=True)
        result["rows"].append(row)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Quick GPU timing of the Gluon backward's per-tile and persistent launches on the short
backward rows (do_bench median, TFLOPS at 2.5x the causal forward's FLOPs), next to SDPA
FlashAttention-2's backward. Usage: python scripts/quick_bwd_persistent.py"""
import torch
import triton

from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.gluon_bwd import flash_attn_backward_gluon_ws
from modelaccel.bench.attention import attention_flops, sdpa_backward_call

from torch.nn.attention import SDPBackend

for batch, heads, n in ((16, 16, 1024), (8, 16, 2048), (2, 48, 1024)):
    q, k, v = (torch.randn(batch, n, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    out, lse = flash_attn_forward(q, k, v, 128 ** -0.5, True)
    flops = 2.5 * attention_flops(batch, heads, n, n, 128, True)
    row = {"flash": sdpa_backward_call(SDPBackend.FLASH_ATTENTION, q, k, v, dout, True)}
    for name, config in (("s2q64", (2, 64)), ("s2q64p", (2, 64, True)), ("s2q32p", (2, 32, True))):
        row[name] = (lambda config=config: flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, 128 ** -0.5, True,
                                                                        *config))
    print((batch, heads, heads, n), {name: round(flops / triton.testing.do_bench(fn, warmup=10, rep=40) * 1e-9, 1)
                                     for name, fn in row.items()}, flush=True)

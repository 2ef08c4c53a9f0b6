"""Host time of modelaccel's Python paths with every Triton launch stubbed out, on a CPU.

What is left is the cost of our checks, allocation, autograd plumbing and op dispatch:
the part of a call's host time that is ours rather than Triton's launcher (which
benchmarks/launch_overhead.py measures on the GPU). The kernels are the interpreter's
(TRITON_INTERPRET=1) with their `run` replaced by a no-op; the outputs are garbage.
Usage: python benchmarks/host_overhead_cpu.py   (microseconds per call, best of 3 rounds)
"""

import os
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import modelaccel  # noqa: E402
from modelaccel.attention import decode, flash_bwd, flash_fwd, kv_append  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return min(rounds)


def main():
    for module in (flash_fwd, flash_bwd, decode, kv_append):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "run"):
                getattr(module, name).run = lambda *args, **kwargs: None
    q, k, v = (torch.randn(2, 64, 4, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    scale = 64 ** -0.5
    out = modelaccel.flash_attn_func(q, k, v, causal=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    o, lse = flash_fwd.flash_attn_forward(qd, kd, vd, scale, causal=True)
    calls = {
        "forward launcher": lambda: flash_fwd.flash_attn_forward(qd, kd, vd, scale, causal=True),
        "flash_attn_func, no grad": lambda: modelaccel.flash_attn_func(qd, kd, vd, causal=True),
        "flash_attn_func, with grad": lambda: modelaccel.flash_attn_func(q, k, v, causal=True),
        "backward launcher": lambda: flash_bwd.flash_attn_backward(dout, qd, kd, vd, o, lse, scale, causal=True),
        "backward through autograd": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
    }
    # Decoding: one token of 2 sequences over a 256-token cache, 8 query heads over 2 KV heads.
    qd1 = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 256, 2, 64, dtype=torch.float16) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 64, dtype=torch.float16) for _ in range(2))
    lens = torch.tensor([100, 37], dtype=torch.int32)
    cos, sin = torch.randn(256, 16), torch.randn(256, 16)
    calls.update({
        "decode launcher": lambda: decode.decode_attention(qd1, k_cache, v_cache, lens, scale),
        "with_kvcache": lambda: modelaccel.flash_attn_with_kvcache(qd1, k_cache, v_cache, cache_seqlens=lens),
        "with_kvcache, append": lambda: modelaccel.flash_attn_with_kvcache(qd1, k_cache, v_cache, k_new, v_new,
                                                                           cache_seqlens=lens),
        "with_kvcache, append+rotary": lambda: modelaccel.flash_attn_with_kvcache(
            qd1, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens),
    })
    for name, fn in calls.items():
        print(f"{name:28s} {per_call_us(fn):7.1f} us")


if __name__ == "__main__":
    main()

"""Host time of the backward pass: the (2,48,48,1024) causal bf16 d128 row measured 89
TFLOPS through autograd in the benchmark but 196 TFLOPS through flash_attn_backward alone.

Per call, wall clock without syncing (host time), for the launcher alone and for
torch.autograd.grad through flash_attn_func; then the host profile of the autograd path.
Usage: python benchmarks/profile_bwd_host.py
"""

import cProfile
import pstats
import time

import torch
import triton

import modelaccel
from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.flash_fwd import flash_attn_forward


def host_us(fn, n=100):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    batch, heads, seqlen = 2, 48, 1024
    q, k, v = (torch.randn(batch, seqlen, heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    out, lse = flash_attn_forward(q.detach(), k.detach(), v.detach(), 128 ** -0.5, causal=True)

    def launcher():
        return flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, 128 ** -0.5, causal=True)

    out_graph = modelaccel.flash_attn_func(q, k, v, causal=True)

    def autograd():
        return torch.autograd.grad(out_graph, (q, k, v), dout, retain_graph=True)

    for name, fn in (("launcher", launcher), ("autograd", autograd)):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name}: do_bench {ms * 1e3:.1f} us, host {host_us(fn):.1f} us/call", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(100):
        autograd()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

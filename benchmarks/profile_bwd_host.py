"""Host time of the backward pass on the GPU machine, for a short row where it shows.

(2, 48, 48, 1024) bf16 causal: the attention backward's row that is host-bound through
autograd. For each dK/dV launch (the tuned Triton one and the Gluon one), times
flash_attn_backward called directly and torch.autograd.grad through flash_attn_func:
do_bench's median (GPU time, or host time where the host is slower) and the host's own
time per call (wall time of 200 calls issued behind a long GPU kernel, so that the queue
never drains). Then cProfile's top functions for the autograd call with the Gluon launch.
Usage: python benchmarks/profile_bwd_host.py
"""

import cProfile
import pstats
import time

import torch
import triton

import modelaccel
from modelaccel.attention import flash_bwd
from modelaccel.attention.flash_fwd import flash_attn_forward


def host_us(fn, n=200):
    """Our host time per call: the GPU is kept busy first, so the calls only queue."""
    fn()
    torch.cuda.synchronize()
    big = torch.randn(8192, 8192, device="cuda")
    for _ in range(20):
        big @ big  # ~40 ms of GPU work ahead of the timed calls
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    b, h, n, d = 2, 48, 1024, 128
    q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = d ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out_g = modelaccel.flash_attn_func(qg, kg, vg, causal=True)
    choose = flash_bwd._dkdv_tuner.choose
    for label, choice in (("triton", (64, 128, 8, 3, True, True)), ("gluon", ("gluon_ws", 2, 64))):
        flash_bwd._dkdv_tuner.choose = lambda key, cands, fn, c=choice: c
        direct = lambda: flash_bwd.flash_attn_backward(dout, q, k, v, out, lse, scale, True)
        through_autograd = lambda: torch.autograd.grad(out_g, (qg, kg, vg), dout, retain_graph=True)
        for name, fn in (("direct", direct), ("autograd", through_autograd)):
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"{label:7s} {name:9s} do_bench {ms * 1e3:7.1f} us   host {host_us(fn):7.1f} us", flush=True)
        if label == "gluon":
            prof = cProfile.Profile()
            prof.runcall(lambda: [through_autograd() for _ in range(200)])
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    flash_bwd._dkdv_tuner.choose = choose


if __name__ == "__main__":
    main()

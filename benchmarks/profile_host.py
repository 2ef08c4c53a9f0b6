"""Where the host time of short attention calls goes, on the GPU machine.

- `varlen`: the two ~1600-token batches of the varlen benchmark took ~230 us a call with 16
  and with 48 heads alike. For each batch: do_bench median, GPU time alone (CUDA graph
  replay), host time per call, the host profile (cProfile) and the kernels torch.profiler
  sees.
- `bwd`: the (2,48,48,1024) causal bf16 d128 backward row measured 89 TFLOPS through
  autograd in the benchmark but 196 TFLOPS through flash_attn_backward alone. do_bench and
  host time per call of the launcher and of torch.autograd.grad, for the Triton and the
  Gluon dK/dV launch, then the host profile of the autograd path.
- `layer`: per attention call as the models use it: a Llama-3-8B prefill layer (batch 1,
  512 tokens, 32/8 heads, d128, q/k/v as Transformers' transposed views) and the training
  check's layer (batch 8, 1024 tokens, 8 heads, d64, forward + backward through autograd),
  modelaccel next to SDPA: do_bench, GPU time alone, host time per call; then modelaccel's
  host profile.
- `pieces`: host time per call of each piece of the training layer's step (launchers,
  autograd Function, tuner lookup, a bare Triton launch, an empty autograd Function), no
  profiler attached, to find where the step's host time goes.
- `breakdown`: the training layer's step timed piece by piece from inside (wall-clock
  counters wrapped around our launchers, each kernel launch (launch_kernel) and the autograd
  Function's methods; no profiler), with the thread each piece ran on.
- `alloc`: torch.empty's host time on this host, by size, with the GPU idle and with it busy
  (a queue of matmuls ahead), and the allocator's settings and retry counts: the `bwd`
  profile had torch.empty at ~110 us a call on the GPU machine (d32a1d8 log).
Host time is the wall clock of a loop of calls without syncing, divided by the count.
Usage: python benchmarks/profile_host.py varlen|bwd|layer|pieces|breakdown|alloc
"""

import cProfile
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

import modelaccel
from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import varlen_seqlens


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def print_host_profile(fn, n, top):
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profile).sort_stats("tottime").print_stats(top // 2)


def profile_varlen():
    for batch, hq, hk, max_len in ((2, 16, 4, 1024), (2, 48, 12, 1024), (8, 16, 2, 2048)):
        seqlens = varlen_seqlens(batch, max_len)
        total = sum(seqlens)
        q = torch.randn(total, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(total, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)

        def call():
            return modelaccel.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

        bench_ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        print(f"== {(batch, hq, hk, max_len)} seqlens {seqlens}: do_bench {bench_ms * 1e3:.1f} us, "
              f"GPU alone {_gpu_ms(call) * 1e3:.1f} us, host {host_us(call):.1f} us/call", flush=True)
        print_host_profile(call, 200, 18)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                call()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def profile_bwd():
    """Both dK/dV launches the tuner may pick for this row (the tuned Triton one and the
    Gluon one), each through the launcher and through autograd; then the autograd path's
    host profile with the Gluon launch."""
    from modelaccel.attention import flash_bwd

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

    choose = flash_bwd._dkdv_tuner.choose
    try:
        for label, choice in (("triton", (64, 128, 8, 3, True, True)), ("gluon", ("gluon_ws", 2, 64))):
            flash_bwd._dkdv_tuner.choose = lambda key, candidates, launch, choice=choice: choice
            for name, fn in (("launcher", launcher), ("autograd", autograd)):
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                print(f"{label} {name}: do_bench {ms * 1e3:.1f} us, host {host_us(fn, 100):.1f} us/call", flush=True)
        print_host_profile(autograd, 100, 30)
    finally:
        flash_bwd._dkdv_tuner.choose = choose


def profile_layer():
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # Prefill: Transformers hands [b, h, s, d] tensors; the attention function transposes them.
    qh = torch.randn(1, 32, 512, 128, device="cuda", dtype=torch.bfloat16)
    kh, vh = (torch.randn(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))
    prefill = {"modelaccel": lambda: modelaccel.flash_attn_func(q, k, v, causal=True),
               "sdpa": lambda: sdpa(qh, kh, vh, is_causal=True, enable_gqa=True)}
    # Training check layer: forward + backward.
    qt, kt, vt = (torch.randn(8, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dout = torch.randn_like(qt)

    def train_ma():
        out = modelaccel.flash_attn_func(qt, kt, vt, causal=True)
        return torch.autograd.grad(out, (qt, kt, vt), dout)

    def train_sdpa():
        out = sdpa(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), is_causal=True)
        return torch.autograd.grad(out, (qt, kt, vt), dout.transpose(1, 2))

    calls = {"prefill": prefill, "train fwd+bwd": {"modelaccel": train_ma, "sdpa": train_sdpa}}
    for what, providers in calls.items():
        for name, fn in providers.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"{what} {name}: do_bench {ms * 1e3:.1f} us, GPU alone {_gpu_ms(fn) * 1e3:.1f} us, "
                  f"host {host_us(fn):.1f} us/call", flush=True)
    for what, providers in calls.items():
        print(f"== host profile: {what} modelaccel", flush=True)
        print_host_profile(providers["modelaccel"], 200, 40)


@triton.jit
def _empty_kernel(x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                  BLOCK: tl.constexpr):
    # As many integer arguments as the attention kernels take (strides, sizes): launch cost only.
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + a0)


class _EmptyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, dout):
        return dout, dout, dout


def profile_pieces():
    from modelaccel.attention import flash_fwd
    from modelaccel.attention.launch import LaunchTuner

    qt, kt, vt = (torch.randn(8, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dout = torch.randn_like(qt)
    qd, kd, vd = qt.detach(), kt.detach(), vt.detach()
    out, lse = flash_attn_forward(qd, kd, vd, 64 ** -0.5, causal=True)
    graph_out = modelaccel.flash_attn_func(qt, kt, vt, causal=True)
    empty_out = _EmptyFunction.apply(qt, kt, vt)
    x = torch.empty(128, device="cuda")
    ints = list(range(1, 21))
    tuner = next(t for t in LaunchTuner.instances if t.choices)
    key, config = next(iter(tuner.choices.items()))
    pieces = {
        "bare triton launch, 21 args": lambda: _empty_kernel[(1,)](x, *ints, BLOCK=128),
        "forward launcher": lambda: flash_attn_forward(qd, kd, vd, 64 ** -0.5, causal=True),
        "backward launcher": lambda: flash_attn_backward(dout, qd, kd, vd, out, lse, 64 ** -0.5, causal=True),
        "flash_attn_func with grad (forward)": lambda: modelaccel.flash_attn_func(qt, kt, vt, causal=True),
        "autograd.grad through flash_attn_func": lambda: torch.autograd.grad(graph_out, (qt, kt, vt), dout,
                                                                             retain_graph=True),
        "empty Function apply": lambda: _EmptyFunction.apply(qt, kt, vt),
        "autograd.grad through empty Function": lambda: torch.autograd.grad(empty_out, (qt, kt, vt), dout,
                                                                            retain_graph=True),
        "tuner.choose (stored key)": lambda: tuner.choose(tuple(key.split("|")), [config], None),
        "torch.cuda.is_available": torch.cuda.is_available,
        "torch.empty 1 MiB": lambda: torch.empty(2**19, device="cuda", dtype=torch.bfloat16),
        "tma_usable(q, k, v)": lambda: flash_fwd.tma_usable(qd, kd, vd),
    }
    for name, fn in pieces.items():
        print(f"{name:40s} host {host_us(fn, 500):8.1f} us/call", flush=True)


def profile_breakdown():
    import collections
    import threading

    from modelaccel.attention import flash_bwd, flash_fwd, interface

    totals = collections.defaultdict(float)
    counts = collections.Counter()
    threads = collections.defaultdict(set)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t0
                counts[name] += 1
                threads[name].add(threading.get_ident() == main_thread)
        return wrapper

    main_thread = threading.get_ident()
    for module in (flash_fwd, flash_bwd):
        launch_kernel = module.launch_kernel

        def timed_launch(kernel, grid, args, kwargs, launch_kernel=launch_kernel):
            return timed(f"launch {kernel.fn.__name__}", launch_kernel)(kernel, grid, args, kwargs)

        module.launch_kernel = timed_launch
    flash_fwd_timed = timed("flash_attn_forward", flash_fwd.flash_attn_forward)
    flash_bwd_timed = timed("flash_attn_backward", flash_bwd.flash_attn_backward)
    interface.flash_attn_forward = flash_fwd_timed
    interface.flash_attn_backward = flash_bwd_timed
    fn_cls = interface.FlashAttnFunc
    fn_cls.forward = staticmethod(timed("FlashAttnFunc.forward", fn_cls.forward))
    fn_cls.backward = staticmethod(timed("FlashAttnFunc.backward", fn_cls.backward))

    qt, kt, vt = (torch.randn(8, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dout = torch.randn_like(qt)
    attn = timed("flash_attn_func", modelaccel.flash_attn_func)
    grad = timed("autograd.grad", torch.autograd.grad)

    def step():
        t0 = time.perf_counter()
        out = attn(qt, kt, vt, causal=True)
        result = grad(out, (qt, kt, vt), dout)
        totals["step"] += time.perf_counter() - t0
        counts["step"] += 1
        threads["step"].add(True)
        return result

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    totals.clear()
    counts.clear()
    n = 300
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    for name in sorted(totals, key=totals.get, reverse=True):
        where = "main" if threads[name] == {True} else "other" if threads[name] == {False} else "both"
        print(f"{name:45s} {totals[name] / n * 1e6:8.1f} us/step ({counts[name] / n:.0f} calls, {where} thread)")


def profile_alloc():
    import os
    print("env:", {k: v for k, v in os.environ.items() if k.startswith(("PYTORCH", "CUDA", "TORCH"))})
    print("allocator backend:", torch.cuda.get_allocator_backend())
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for mib in (1, 4, 24, 48, 192):
        numel = mib * 2**20 // 4
        for busy in (False, True):
            torch.cuda.synchronize()
            if busy:
                for _ in range(40):  # ~40 ms of GPU work queued ahead of the allocations
                    a @ a
            t0 = time.perf_counter()
            for _ in range(200):
                x = torch.empty(numel, device="cuda")
                del x
            us = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            print(f"torch.empty {mib:4d} MiB, GPU {'busy' if busy else 'idle'}: {us:.1f} us a call", flush=True)
    stats = torch.cuda.memory_stats()
    print({k: stats[k] for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")
           if k in stats})


if __name__ == "__main__":
    {"breakdown": profile_breakdown, "varlen": profile_varlen, "bwd": profile_bwd, "layer": profile_layer, "pieces": profile_pieces,
     "alloc": profile_alloc}[sys.argv[1]]()

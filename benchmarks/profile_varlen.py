"""Where the time of a small varlen forward goes: the two ~1600-token batches of the varlen
benchmark took ~230 us a call with 16 and with 48 heads alike (results/*varlen*).

For each batch: do_bench median of the call, GPU time alone (CUDA graph replay), host
time per call (wall clock of 200 calls without syncing), the host profile of those calls
(cProfile, top entries by cumulative time) and the kernels torch.profiler sees.
Usage: python benchmarks/profile_varlen.py
"""

import cProfile
import pstats
import time

import torch
import triton

import modelaccel
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import varlen_seqlens


def main():
    for batch, hq, hk, max_len in ((2, 16, 4, 1024), (2, 48, 12, 1024), (8, 16, 2, 2048)):
        seqlens = varlen_seqlens(batch, max_len)
        total = sum(seqlens)
        q = torch.randn(total, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(total, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)

        def call():
            return modelaccel.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

        call()
        torch.cuda.synchronize()
        bench_ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        gpu_ms = _gpu_ms(call)
        t0 = time.perf_counter()
        for _ in range(200):
            call()
        host_us = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"== {(batch, hq, hk, max_len)} seqlens {seqlens}: do_bench {bench_ms * 1e3:.1f} us, "
              f"GPU alone {gpu_ms * 1e3:.1f} us, host {host_us:.1f} us/call", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            call()
        profile.disable()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(18)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                call()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()

"""Host time per call of the attention entry points, against SDPA, on one GPU.

Small attention problems finish on the GPU in tens of microseconds, so the Python and
launch work per call decides their speed. This times back-to-back calls on a tiny problem
(the GPU never the bottleneck) and reports microseconds per call.
Usage: python benchmarks/launch_overhead.py [OUT_JSON]
"""

import cProfile
import io
import json
import pstats
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import modelaccel
from modelaccel.attention.flash_fwd import flash_attn_forward


def host_us_per_call(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main(out_path):
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        return run

    cases = {
        "flash_attn_func": lambda: modelaccel.flash_attn_func(q, k, v),
        "flash_attn_forward tma autotuned": lambda: flash_attn_forward(q, k, v, 0.125),
        "flash_attn_forward pointers autotuned": lambda: flash_attn_forward(q, k, v, 0.125, use_tma=False),
        "flash_attn_forward tma fixed blocks": lambda: flash_attn_forward(q, k, v, 0.125, block_m=64, block_n=64),
        "flash_attn_forward pointers fixed blocks": lambda: flash_attn_forward(q, k, v, 0.125, use_tma=False,
                                                                              block_m=64, block_n=64),
        "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    results = {name: round(host_us_per_call(fn), 1) for name, fn in cases.items()}
    for name, us in results.items():
        print(f"{name:45s} {us:8.1f} us/call")
    # Where flash_attn_func's host time goes, by function (cProfile's own cost inflates it).
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(500):
        modelaccel.flash_attn_func(q, k, v)
    profiler.disable()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(15)
    print(report.getvalue()[-3500:])
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "us_per_call": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "launch_overhead.json")

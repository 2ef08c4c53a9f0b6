"""Where the backward's GPU time goes, kernel by kernel, next to SDPA's backends.

For each d128 causal bf16 row of the backward benchmark: the tuned flash_attn_backward,
SDPA FlashAttention-2's and cuDNN's backward (torch.autograd.grad of their outputs), each
run 10 times under torch.profiler; prints every CUDA kernel's time per call and its share,
and writes them as JSON. Shows what the fixed costs around the main kernel (delta, the
float32 dQ accumulator's zeroing and conversion) take at each size.
Usage: python benchmarks/profile_bwd.py OUT.json
"""

import json
import sys

import torch
from torch.nn.attention import SDPBackend

from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.launch import launch_choices
from modelaccel.bench.attention import causal_backward_inputs, collect_metadata, sdpa_backward_call

ROWS = [(16, 16, 16, 1024), (8, 16, 16, 2048), (4, 16, 16, 4096), (1, 16, 16, 16384), (2, 48, 48, 1024),
        (2, 32, 8, 8192)]
CALLS = 10


def kernel_times(fn):
    """[(kernel name, us per call)] of fn's CUDA kernels, longest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(((e.key, e.self_device_time_total / CALLS) for e in events), key=lambda t: -t[1])


def main():
    result = {**collect_metadata(), "rows": []}
    for batch, hq, hk, n in ROWS:
        q, k, v, dout, out, lse, scale = causal_backward_inputs(batch, hq, hk, n)
        providers = {"modelaccel": lambda: flash_attn_backward(dout, q, k, v, out, lse, scale, True)}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            providers[name] = sdpa_backward_call(backend, q, k, v, dout, True)
        row = {"shape": [batch, hq, hk, n], "kernels": {}}
        for name, fn in providers.items():
            times = kernel_times(fn)
            total = sum(t for _, t in times)
            row["kernels"][name] = times
            print(f"== {batch, hq, hk, n} {name}: {total:.1f} us of kernels per call", flush=True)
            for kernel, t in times[:8]:
                print(f"  {t:9.1f} us {100 * t / total:5.1f}%  {kernel[:100]}")
        result["rows"].append(row)
    result["launch_choices"] = {name: {str(k): v for k, v in c.items()} for name, c in launch_choices().items()}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

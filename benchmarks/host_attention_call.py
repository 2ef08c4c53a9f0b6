"""Host time of one Transformers attention call, ours against SDPA's, on the GPU machine.

The batch-1 512-token TTFT row is host-bound (prefill_gaps.py: host time = GPU time, 9 of
its 24 ms idle), so what our attention function costs the host, against
sdpa_attention_forward's, decides it. Here both are called as a Llama-3-8B layer calls them
(prefill: q [1, 32, 512, 128], k/v [1, 8, 512, 128] seen through transposes, no mask,
causal; a decoding step: one query over 513 cached keys), under
inference_mode, while the GPU is held busy by torch.cuda._sleep: the wall clock of N calls
/ N is host time alone. (A whole layer cannot be timed so: Transformers' forward waits on
the GPU once, which the first run here measured as 51 ms a forward.)
Usage: python benchmarks/host_attention_call.py OUT.json   (us per call: median of 7 runs)
"""

import json
import statistics
import sys
import time

import torch

from modelaccel.bench.transformers_bench import build_model, collect_metadata, llama_config, set_attention

PROVIDERS = ("modelaccel", "sdpa")
CALLS = 200  # one kernel each: far fewer than the launches the GPU queues before blocking
RUNS = 7


def host_us(fn, calls=CALLS, runs=RUNS):
    """Median over `runs` of the wall-clock us per call of `calls` calls issued while the
    GPU sleeps, so none waits on the GPU (their kernels queue behind the sleep)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles: longer than the calls take to issue
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples), samples


def main():
    from transformers import AttentionInterface

    import modelaccel.integrations.transformers  # noqa: F401 (registers "modelaccel")

    out_path = sys.argv[1]
    model = build_model(llama_config(1)).eval().requires_grad_(False)
    attn = model.model.layers[0].self_attn
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    # prefill: the projections' [b, s, h, d] seen through a transpose; decoding step: one
    # query over a dynamic cache's 513 keys (torch.cat's contiguous [b, h, s, d]); every
    # layer of a step sees that same length, so all but the first replay
    calls = {"prefill 1 x 512": (torch.randn(1, 512, 32, 128, **bf16).transpose(1, 2),
                                 *(torch.randn(1, 512, 8, 128, **bf16).transpose(1, 2) for _ in range(2))),
             "decode 1 x 513": (torch.randn(1, 1, 32, 128, **bf16).transpose(1, 2),
                                *(torch.randn(1, 8, 513, 128, **bf16) for _ in range(2)))}
    results = dict(collect_metadata(), calls=CALLS, runs=RUNS, rows={})
    for name, (q, k, v) in calls.items():
        for provider in PROVIDERS:
            set_attention(model, provider)
            fn = AttentionInterface()[provider]
            with torch.inference_mode():
                call, samples = host_us(lambda: fn(attn, q, k, v, None, scaling=attn.scaling))
            results["rows"].setdefault(name, {})[provider] = {"attention_call_us": call, "runs_us": samples}
            print(f"{name:16s} {provider:10s} attention call {call:6.1f} us  "
                  f"(runs: {' '.join(f'{s:.1f}' for s in samples)})", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

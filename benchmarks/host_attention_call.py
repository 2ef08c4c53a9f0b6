"""Host time of one Transformers attention call, ours against SDPA's, on the GPU machine.

The batch-1 512-token TTFT row is host-bound (prefill_gaps.py: host time = GPU time, 9 of
its 24 ms idle), so what our attention function costs the host, against
sdpa_attention_forward's, decides it. Here both are called as a Llama-3-8B layer calls them
(q [1, 32, 512, 128], k/v [1, 8, 512, 128] seen through transposes, no mask, causal), under
inference_mode, while the GPU is held busy by torch.cuda._sleep: the wall clock of N calls
/ N is host time alone. The same for a 1-layer model's whole forward (embedding, one
layer, norm, lm_head on one position), so the attention's share of a layer shows.
Usage: python benchmarks/host_attention_call.py OUT.json   (us per call: median of 7 runs)
"""

import json
import statistics
import sys
import time

import torch

from modelaccel.bench.transformers_bench import build_model, collect_metadata, llama_config, make_ids, set_attention

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
    seqlen = 512
    q = torch.randn(1, seqlen, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, seqlen, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    ids = make_ids(1, seqlen, model.config.vocab_size)
    results = dict(collect_metadata(), calls={"attention": CALLS, "forward": 20}, runs=RUNS, rows={})
    for provider in PROVIDERS:
        set_attention(model, provider)
        fn = AttentionInterface()[provider]
        with torch.inference_mode():
            call, _ = host_us(lambda: fn(attn, q, k, v, None, scaling=attn.scaling))
            # ~40 kernels a forward: 20 of them stay within the GPU's queue of pending launches
            forward, _ = host_us(lambda: model(input_ids=ids, logits_to_keep=1), calls=20)
        results["rows"][provider] = {"attention_call_us": call, "one_layer_forward_us": forward}
        print(f"{provider:10s} attention call {call:6.1f} us   1-layer model forward {forward:7.1f} us", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

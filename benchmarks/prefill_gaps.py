"""Where the Transformers rows' last half percent goes: GPU idle time, host time and syncs.

The 4-layer profile (profile_transformers.py) put our attention kernel ahead of cuDNN's and
every other kernel level, yet the batch-8 2048 TTFT row and the training step come out
0.3-0.4% behind SDPA. This runs those rows on the full Llama-3-8B-shaped model and, per
provider, measures in interleaved rounds
  - gpu: CUDA-event ms of the call (what the benchmark reports),
  - host: ms until the call returns to Python, not waited for (a row is host-bound where
    this comes near gpu),
and, from one profiled call each, the GPU's idle time between kernels (the span of the
kernels less their union) with the largest gaps and the kernel that ended each, and the
number of synchronizing CUDA calls (torch.cuda.set_sync_debug_mode).
Usage: python benchmarks/prefill_gaps.py OUT.json [ROW ...]   ROW: ttft:BATCHxSEQLEN or train:SEQLEN
"""

import json
import statistics
import sys
import time
import warnings

import torch

from modelaccel.bench.transformers_bench import (build_model, collect_metadata, llama_config, make_ids, prefill_logits,
                                                 set_attention, training_loss)

PROVIDERS = ("modelaccel", "sdpa")
ROUNDS = 7


def parse_row(spec):
    """ROW (ttft:BATCHxSEQLEN or train:[BATCHx]SEQLEN) -> (kind, batch, seqlen)."""
    kind, shape = spec.split(":")
    batch, seqlen = shape.split("x") if "x" in shape else (1, shape)
    return kind, int(batch), int(seqlen)


def row_call(model, kind, batch, seqlen):
    ids = make_ids(batch, seqlen, model.config.vocab_size)
    if kind == "ttft":
        return lambda: prefill_logits(model, ids)

    def call():
        loss = training_loss(model, ids)
        loss.backward()
        return loss.detach()
    return call


def timed(call):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    call()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def idle_gaps(call, top=6):
    """GPU idle ms between the first and last kernel of one call, and the largest gaps."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, reach, last_name = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > reach:
            gaps.append((start - reach, last_name, name))
        if end > reach:
            reach, last_name = end, name
    busy_span = (reach - kernels[0][0]) / 1e3
    idle = sum(g[0] for g in gaps) / 1e3
    largest = [{"us": round(g[0], 1), "after": g[1][:90], "before": g[2][:90]} for g in sorted(gaps, reverse=True)[:top]]
    return {"span_ms": busy_span, "idle_ms": idle, "gaps_over_5us": sum(g[0] > 5 for g in gaps), "largest": largest}


def sync_count(call):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # "called a synchronizing CUDA operation"; the mode's own prototype notice is no sync
    found = [str(w.message).splitlines()[0][:120] for w in caught if "called a synchronizing" in str(w.message)]
    return len(found), sorted(set(found))[:5]


def main():
    out_path = sys.argv[1]
    rows = sys.argv[2:] or ["ttft:8x2048", "ttft:1x512", "train:4096"]
    model = build_model(llama_config()).eval()
    results = dict(collect_metadata(), rounds=ROUNDS, rows=[])
    for spec in rows:
        kind, batch, seqlen = parse_row(spec)
        if kind == "train":
            model.train()
            model.requires_grad_(True)
        call = row_call(model, kind, batch, seqlen)
        row = {"row": spec, "gpu_ms": {}, "host_ms": {}, "idle": {}, "syncs": {}}
        for provider in PROVIDERS:
            set_attention(model, provider)
            for _ in range(2):
                call()
        samples = {p: [] for p in PROVIDERS}
        for _ in range(ROUNDS):
            for provider in PROVIDERS:
                set_attention(model, provider)
                samples[provider].append(timed(call))
        for provider in PROVIDERS:
            set_attention(model, provider)
            row["gpu_ms"][provider] = statistics.median(s[0] for s in samples[provider])
            row["host_ms"][provider] = statistics.median(s[1] for s in samples[provider])
            row["idle"][provider] = idle_gaps(call)
            row["syncs"][provider] = sync_count(call)
        ratio = row["gpu_ms"]["modelaccel"] / row["gpu_ms"]["sdpa"]
        print(f"== {spec}: gpu ms ma {row['gpu_ms']['modelaccel']:.2f} sdpa {row['gpu_ms']['sdpa']:.2f} "
              f"(ma/sdpa {ratio:.4f}); host ms ma {row['host_ms']['modelaccel']:.2f} sdpa {row['host_ms']['sdpa']:.2f}",
              flush=True)
        for provider in PROVIDERS:
            idle = row["idle"][provider]
            print(f"  {provider}: span {idle['span_ms']:.2f} ms, idle {idle['idle_ms']:.3f} ms in "
                  f"{idle['gaps_over_5us']} gaps > 5 us; syncs {row['syncs'][provider][0]} {row['syncs'][provider][1]}")
            for gap in idle["largest"]:
                print(f"     {gap['us']:8.1f} us  after {gap['after']}  before {gap['before']}")
        results["rows"].append(row)
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.eval()
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

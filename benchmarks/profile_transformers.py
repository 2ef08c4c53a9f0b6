"""Where a Llama-3-8B-shaped prefill spends its GPU time, per attention implementation.

The Transformers benchmark measured modelaccel's time-to-first-token at 8192 tokens ~4%
above SDPA's, more than the attention kernels alone explain. This prefills a 4-layer model
of the same shape with each implementation under torch.profiler and prints the CUDA kernels
by total time, the total, and the wall time of the same call.
Usage: python benchmarks/profile_transformers.py [[train][BATCHx]SEQLEN ...]   (default 8192 512)
A shape prefixed with "train" profiles the Transformers benchmark's training step instead
(forward with labels + backward into parameter grads), as train1x4096.
After both providers' tables, the kernels whose total time differs between them by more
than 20 us, so a gap in the TTFT rows can be traced to the kernels that make it.
"""

import sys
import time

import torch

from modelaccel.bench.transformers_bench import (build_model, llama_config, make_ids, prefill_logits, set_attention,
                                                 training_loss)

LAYERS = 4


def parse_shape(arg):
    train = arg.startswith("train")
    arg = arg.removeprefix("train")
    batch, seqlen = arg.split("x") if "x" in arg else (1, arg)
    return train, int(batch), int(seqlen)


def main():
    shapes = [parse_shape(a) for a in sys.argv[1:]]
    model = build_model(llama_config(num_layers=LAYERS)).eval()
    for train, batch, seqlen in shapes or [(False, 1, 8192), (False, 1, 512)]:
        ids = make_ids(batch, seqlen, model.config.vocab_size)
        model.train(train)
        model.requires_grad_(train)
        totals = {}
        for provider in ("modelaccel", "sdpa"):
            set_attention(model, provider)

            def prefill():
                if train:
                    return training_loss(model, ids).backward()
                return prefill_logits(model, ids)

            for _ in range(3):
                prefill()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                prefill()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) / 5 * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                prefill()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            total_us = sum(e.self_device_time_total for e in events)
            totals[provider] = {e.key: (e.self_device_time_total, e.count) for e in events}
            print(f"== {'train ' if train else ''}batch {batch}, seqlen {seqlen}, {provider}: wall {wall_ms:.2f} ms/call, CUDA kernels {total_us / 1e3:.2f} ms",
                  flush=True)
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
                print(f"  {e.self_device_time_total / 1e3:8.3f} ms {e.count:4d}x  {e.key[:110]}")
        print(f"-- {'train ' if train else ''}batch {batch}, seqlen {seqlen}: kernels differing by > 20 us (modelaccel - sdpa)")
        ma, sd = totals["modelaccel"], totals["sdpa"]
        for key in sorted(set(ma) | set(sd), key=lambda k: -abs(ma.get(k, (0, 0))[0] - sd.get(k, (0, 0))[0])):
            diff = ma.get(key, (0, 0))[0] - sd.get(key, (0, 0))[0]
            if abs(diff) > 20:
                print(f"  {diff / 1e3:+8.3f} ms  ma {ma.get(key, (0, 0))[1]:4d}x sdpa {sd.get(key, (0, 0))[1]:4d}x  "
                      f"{key[:100]}")


if __name__ == "__main__":
    main()

"""Where a tile of the Gluon forward spends its time: the kernel's trace (TRACE, cycle
counter readings at fixed points of each partition, gluon_fwd._stamp) summarized per tile
length, for the Llama-3-8B prefill rows that Transformers' TTFT rows run.

Consumer events per tile: 0 start, 1 Q ready, 2 first scores done, 3 first P ready,
4 every scores product done (before the last P V), 5 last P V done, 6 stored; producer:
0 start, 1 first K asked, 2 Q asked, 3 last V asked. Phases (ns, the SM clock measured
against globaltimer): q_wait 0->1, first_s 1->2, first_softmax 2->3, blocks 3->4 (the
steady loop, n - 1 blocks), last_pv 4->5, epilogue 5->6, gap 6->next 0. Each launch is
also timed untraced, next to SDPA cuDNN on the same inputs (GPU time, benchmarks' timer).
Usage: python benchmarks/gluon_fwd_timeline.py OUT.json
"""

import json
import statistics
import sys

import torch

from modelaccel.attention import gluon_fwd
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import _provider_call, attention_flops, collect_metadata, tflops

# (batch, query heads, kv heads, tokens), in Transformers' layout (q, k [b, h, s, d] transposed)
ROWS = [(8, 32, 8, 512), (8, 32, 8, 2048), (1, 32, 8, 2048)]
# (name, flash_attn_forward_gluon_ws's block_n, stages, pingpong, persistent, launch_group, kv_first)
LAUNCHES = [("per-tile", (128, 2, True)), ("persistent groups of 8", (128, 2, True, True, 8)),
            ("persistent snake, kv first", (128, 2, True, True, 0, True))]
CONSUMER_PHASES = [("q_wait", 0, 1), ("first_s", 1, 2), ("first_softmax", 2, 3), ("blocks", 3, 4),
                   ("last_pv", 4, 5), ("epilogue", 5, 6)]
POISON = -1


def traced_launch(q, k, v, config):
    """One traced call: the trace as a [programs, 3, TRACE_TILES, TRACE_EVENTS] int64 CPU tensor."""
    batch, seqlen, nheads, _ = q.shape
    n_tiles = batch * nheads * -(-seqlen // (2 * gluon_fwd.WS_ROWS))
    persistent = len(config) > 3 and config[3]
    programs = min(n_tiles, gluon_fwd._sm_count(q.device.index)) if persistent else n_tiles
    trace = torch.full((gluon_fwd.trace_size(programs),), POISON, dtype=torch.int64, device=q.device)
    gluon_fwd.flash_attn_forward_gluon_ws(q, k, v, q.shape[-1] ** -0.5, True, *config, trace=trace)
    torch.cuda.synchronize()
    return trace.view(programs, 3, gluon_fwd.TRACE_TILES, gluon_fwd.TRACE_EVENTS).cpu()


def cycles_per_ns(trace):
    """The SM clock: cycles over globaltimer ns between a program's first and last traced tile
    ends (wg 0), median over programs with two or more tiles (None for one-tile programs)."""
    rates = []
    for prog in trace:
        ends = [(int(t[6]), int(t[9])) for t in prog[0] if int(t[6]) != POISON]
        if len(ends) > 1 and ends[-1][1] > ends[0][1]:
            rates.append((ends[-1][0] - ends[0][0]) / (ends[-1][1] - ends[0][1]))
    return statistics.median(rates) if rates else None


def summarize(trace, clock):
    """Mean phase times (ns) per tile length and partition, the producer's waits, and how far
    apart the programs end."""
    by_length = {}
    producer = {"ring_wait": [], "q_ask_after_start": [], "q_latency_wg0": []}
    ends = []
    for prog in trace:
        for wg in (0, 1):
            tiles = [t for t in prog[wg] if int(t[0]) != POISON]
            for local, t in enumerate(tiles):
                phases = by_length.setdefault(int(t[8]), {}).setdefault(f"wg{wg}", {})
                for name, a, b in CONSUMER_PHASES:
                    phases.setdefault(name, []).append((int(t[b]) - int(t[a])) / clock)
                if local + 1 < len(tiles):
                    phases.setdefault("gap", []).append((int(tiles[local + 1][0]) - int(t[6])) / clock)
                phases.setdefault("tile", []).append((int(t[6]) - int(t[0])) / clock)
            if tiles:
                ends.append(int(tiles[-1][9]))
        for local, t in enumerate(prog[2]):
            if int(t[0]) == POISON:
                continue
            producer["ring_wait"].append((int(t[1]) - int(t[0])) / clock)
            producer["q_ask_after_start"].append((int(t[2]) - int(t[0])) / clock)
            consumer = prog[0][local]
            if int(consumer[1]) != POISON:
                producer["q_latency_wg0"].append((int(consumer[1]) - int(t[2])) / clock)
    mean = {n: {wg: {k: statistics.fmean(v) for k, v in phases.items()} for wg, phases in parts.items()}
            for n, parts in sorted(by_length.items())}
    counts = {n: len(parts["wg0"]["tile"]) for n, parts in sorted(by_length.items())}
    ends.sort()
    return {"tiles_by_length": counts, "mean_ns_by_length": mean,
            "producer_mean_ns": {k: statistics.fmean(v) for k, v in producer.items() if v},
            "program_end_spread_ns": {"median_to_last": ends[-1] - ends[len(ends) // 2], "first_to_last": ends[-1] - ends[0]}}


def main():
    result = {**collect_metadata(), "rows": []}
    for batch, hq, hk, n in ROWS:
        q = torch.randn(batch, hq, n, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(batch, hk, n, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        flops = attention_flops(batch, hq, n, n, 128, True)
        row = {"shape": [batch, hq, hk, n], "launches": {}}
        with torch.inference_mode():
            fn, ctx = _provider_call("cudnn", q, k, v, True)
            with ctx:
                row["cudnn_tflops"] = tflops(flops, _gpu_ms(fn))
            traces = {name: traced_launch(q, k, v, config) for name, config in LAUNCHES}
            # Per-tile programs run one tile each: their clock is the persistent launches'.
            clocks = [c for c in map(cycles_per_ns, traces.values()) if c]
            for name, config in LAUNCHES:
                def call(trace=None, config=config):
                    return gluon_fwd.flash_attn_forward_gluon_ws(q, k, v, 128 ** -0.5, True, *config, trace=trace)
                plain = tflops(flops, _gpu_ms(call))
                scratch = torch.empty(traces[name].numel(), dtype=torch.int64, device="cuda")
                traced = tflops(flops, _gpu_ms(lambda: call(scratch)))
                clock = cycles_per_ns(traces[name]) or statistics.median(clocks)
                entry = {"config": list(config), "tflops": plain, "traced_tflops": traced, "cycles_per_ns": clock,
                         **summarize(traces[name], clock)}
                row["launches"][name] = entry
                print(f"{(batch, hq, hk, n)} {name}: {plain:.1f} TFLOPS ({traced:.1f} traced), "
                      f"cuDNN {row['cudnn_tflops']:.1f}; clock {clock:.3f} cycles/ns; tiles {entry['tiles_by_length']}",
                      flush=True)
                for length, parts in entry["mean_ns_by_length"].items():
                    for wg, phases in parts.items():
                        print(f"   n={length} {wg}: " + " ".join(f"{k} {v:7.0f}" for k, v in phases.items()), flush=True)
                print("   producer: " + " ".join(f"{k} {v:.0f}" for k, v in entry["producer_mean_ns"].items())
                      + f"; ends {entry['program_end_spread_ns']}", flush=True)
        result["rows"].append(row)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

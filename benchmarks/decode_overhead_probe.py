"""Where a small-batch decoding step's time goes beyond reading K and V.

At (1, 32768) the tuned step took ~40.6 us under graph replay against ~35.2 us for a
kernel that only reads the same 128 MiB (decode_floor.py), and at (1, 4096) 14.2 against
9.4 us: about 5 us more at either size. This times, in rounds (each variant once per
round, the median over rounds), with the decode benchmark's graph timer:
  - empty: a one-program kernel (the replay's fixed cost);
  - read: decode_floor's streaming read, three launches;
  - per launch configuration, the split kernel with and without its first key tile
    loaded before cache_seqlens (decode._EARLY_FIRST_TILE), each with its combine kernel
    ("full") and without it ("split only": the output is not merged, timing only);
  - the fused launch (the last split merges) with a zeroed counter per call and with
    counters kept between calls (decode._KEEP_COUNTERS: no memset in the graph).
Usage: python benchmarks/decode_overhead_probe.py OUT.json [BATCH:CACHE_LEN ...] [--rounds=N]
"""

import json
import statistics
import sys

import torch
import triton

from modelaccel.attention import decode
from modelaccel.bench.decode_attention import kv_bytes, make_inputs, tbps, time_graph
from decode_floor import _read_sum_kernel, _store_one_kernel

SHAPES = [(1, 4096), (1, 32768), (8, 4096), (1, 131072)]
CONFIGS = [(64, 4, 3, 2, 4), (128, 4, 3, 1, 4), (64, 4, 3, 4, 1)]
FUSED = (64, 4, 3, 2, 4, True)
READS = [(264, 4096, 8, 3), (132, 4096, 4, 4), (528, 2048, 4, 3)]


def _variants(q, k_cache, v_cache, seqlens, out):
    n = k_cache.numel()
    variants = {}
    for programs, block, warps, stages in READS:
        if programs * block <= n:
            variants[f"read p{programs} b{block} w{warps} s{stages}"] = (
                lambda p=programs, bl=block, w=warps, s=stages: _read_sum_kernel[(p,)](
                    k_cache, v_cache, out, n, BLOCK=bl, STAGES=s, num_warps=w), {})
    for config in CONFIGS:
        for early in (False, True):
            for split_only in (False, True):
                name = f"{'x'.join(map(str, config))} {'early' if early else 'loop'} " \
                       f"{'split-only' if split_only else 'full'}"
                variants[name] = (lambda c=config: decode.decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5,
                                                                           config=c)[0],
                                  {"_EARLY_FIRST_TILE": early, "split_only": split_only})
    for keep in (False, True):
        variants[f"fused {'x'.join(map(str, FUSED[:5]))} early {'kept counters' if keep else 'zeroed counters'}"] = (
            lambda: decode.decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, config=FUSED)[0],
            {"_EARLY_FIRST_TILE": True, "_KEEP_COUNTERS": keep})
    return variants


def _timed(fn, settings):
    saved = {name: getattr(decode, name) for name in ("_EARLY_FIRST_TILE", "_KEEP_COUNTERS", "launch_kernel")}
    launch = saved["launch_kernel"]
    try:
        for name, value in settings.items():
            if name != "split_only":
                setattr(decode, name, value)
        if settings.get("split_only"):
            decode.launch_kernel = lambda kernel, grid, args, kwargs: (
                None if kernel is decode._decode_combine_kernel else launch(kernel, grid, args, kwargs))
        return time_graph(fn)
    finally:
        for name, value in saved.items():
            setattr(decode, name, value)


def _output(q, k_cache, v_cache, seqlens, config, settings):
    saved = {name: getattr(decode, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(decode, name, value)
        return decode.decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, config=config)[0]
    finally:
        for name, value in saved.items():
            setattr(decode, name, value)


def main():
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    rounds = next((int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--rounds=")), 3)
    shapes = [tuple(int(x) for x in a.split(":")) for a in args] or SHAPES
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "timer": "time_graph (one call per graph, L2 emptied by a read before each replay), median over rounds",
              "rounds": rounds, "rows": []}
    out = torch.empty(4096, device="cuda", dtype=torch.float32)
    result["empty_us"] = 1e3 * time_graph(lambda: _store_one_kernel[(1,)](out))
    print(f"empty replay {result['empty_us']:.1f} us", flush=True)
    for batch, cache_len in shapes:
        q, k_cache, v_cache, seqlens = make_inputs(batch, cache_len)[:4]
        nbytes = kv_bytes(batch, cache_len)
        variants = _variants(q, k_cache, v_cache, seqlens, out)
        # The variants that merge must agree with the plain launch (the split-only ones do not merge).
        base = _output(q, k_cache, v_cache, seqlens, CONFIGS[0], {"_EARLY_FIRST_TILE": False})
        row_checks = {}
        for label, config, settings in (("early", CONFIGS[0], {"_EARLY_FIRST_TILE": True}),
                                        ("fused kept counters, call 1", FUSED, {"_KEEP_COUNTERS": True}),
                                        ("fused kept counters, call 2", FUSED, {"_KEEP_COUNTERS": True})):
            diff = (_output(q, k_cache, v_cache, seqlens, config, settings).float() - base.float()).abs().max().item()
            row_checks[label] = diff
            print(f"({batch},{cache_len}) max |{label} - loop| = {diff:.3g}", flush=True)
        times = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (fn, settings) in variants.items():
                times[name].append(1e3 * _timed(fn, settings))
        row = {"batch": batch, "cache_len": cache_len, "bytes": nbytes, "max_abs_diff_vs_loop": row_checks, "us": {}}
        for name, values in times.items():
            us = statistics.median(values)
            row["us"][name] = {"median": us, "all": values, "tbps": tbps(nbytes, us * 1e-3)}
            print(f"({batch},{cache_len}) {name:48s} {us:7.2f} us  {tbps(nbytes, us * 1e-3):.2f} TB/s  "
                  f"[{' '.join(f'{v:.2f}' for v in values)}]", flush=True)
        result["rows"].append(row)
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

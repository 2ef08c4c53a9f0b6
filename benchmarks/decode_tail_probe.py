"""Where the last microseconds of a small-batch decoding step go, timed two ways.

The decode benchmark times a CUDA graph holding one call; a model's decoding step is one
graph holding every layer's call, so the replay's own start (an empty kernel's replay costs
~2.9 us) is paid once per step, not per layer. This times, in interleaved rounds, each launch
both ways (`time_graph` and `time_graph_layers`, each layer over its own copy of the cache):
  - empty: one program storing one number;
  - read: a kernel that only streams K and V (decode_floor.py's), at its two best launches;
  - cudnn: SDPA's CUDNN_ATTENTION backend, as in the benchmark;
  - the split launches with the combine kernel at 1, 2, 4 and 8 warps (decode.combine_warps
    replaced by a constant);
  - the fused launches (the last program of a kv head merges) with _MERGE_VALUES_MAX 2048,
    8192 and 16384 floats (all splits of a 1-per-SM launch in one load at 8192).
Every modelaccel output is compared with the first launch's.
Usage: python benchmarks/decode_tail_probe.py OUT.json [BATCH:CACHE_LEN ...]
"""

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from decode_floor import _read_sum_kernel, _store_one_kernel  # noqa: E402

from modelaccel.attention import decode  # noqa: E402
from modelaccel.bench.decode_attention import (_sdpa_call, graph_layers, kv_bytes, make_inputs,  # noqa: E402
                                               measure_read_bandwidth, tbps, time_graph, time_graph_layers)

SHAPES = [(1, 4096), (1, 32768), (8, 4096), (1, 131072)]
ROUNDS = 2
UNFUSED = [(64, 4, 3, 2, 4), (128, 4, 3, 1, 4)]
FUSED = [(64, 4, 3, 2, 4, True), (128, 4, 3, 1, 4, True)]


def variants(batch, cache_len):
    """(name, settings, make_fn): make_fn(layer) -> zero-argument call over that layer's inputs."""
    q0, k0, v0, seqlens = make_inputs(batch, cache_len)
    copies = {}

    def inputs(layer):
        if layer not in copies:
            copies[layer] = (q0, k0, v0) if layer == 0 else (q0.clone(), k0.clone(), v0.clone())
        return copies[layer]

    out = torch.empty(4096, device="cuda", dtype=torch.float32)
    yield "empty", {}, lambda i: (lambda: _store_one_kernel[(1,)](out))
    n = k0.numel()
    for programs, block, warps, stages in ((264, 4096, 8, 3), (528, 2048, 4, 3)):
        def read(i, programs=programs, block=block, warps=warps, stages=stages):
            _, k, v = inputs(i)
            return lambda: _read_sum_kernel[(programs,)](k, v, out, n, BLOCK=block, STAGES=stages, num_warps=warps)
        yield f"read p{programs} b{block} w{warps} s{stages}", {}, read

    from torch.nn.attention import SDPBackend

    transposed = {}

    def cudnn(i):
        if i not in transposed:
            q, k, v = inputs(i)
            transposed[i] = (q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        call, context = _sdpa_call(SDPBackend.CUDNN_ATTENTION, *transposed[i])

        def pinned():
            with context():
                return call()
        return pinned
    yield "cudnn", {}, cudnn

    def ours(config):
        def make(i):
            q, k, v = inputs(i)
            return lambda: decode.decode_attention(q, k, v, seqlens, 128 ** -0.5, config=config)[0]
        return make
    for config in UNFUSED:
        for warps in (1, 2, 4, 8):
            yield ("x".join(map(str, config)) + f" combine w{warps}",
                   {"combine_warps": lambda block_s, block_d, warps=warps: warps}, ours(config))
    for config in FUSED:
        for values in (2048, 8192, 16384):
            yield "fused " + "x".join(map(str, config[:5])) + f" merge {values}", {"_MERGE_VALUES_MAX": values}, \
                ours(config)


def main():
    shapes = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]] or SHAPES
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("MODELACCEL_COMMIT", "unknown"),
              "read_bw": measure_read_bandwidth(), "rows": []}
    print(f"read bandwidth {result['read_bw']['tbps']:.2f} TB/s", flush=True)
    defaults = {"combine_warps": decode.combine_warps, "_MERGE_VALUES_MAX": decode._MERGE_VALUES_MAX}
    for batch, cache_len in shapes:
        nbytes = kv_bytes(batch, cache_len)
        layers = graph_layers(nbytes)
        entries = list(variants(batch, cache_len))
        times = {name: {"single": [], "layers": []} for name, _, _ in entries}
        reference = None
        for name, settings, make in entries:
            for key, value in {**defaults, **settings}.items():
                setattr(decode, key, value)
            if not name.startswith(("empty", "read", "cudnn")):
                got = make(0)().float()
                if reference is None:
                    reference = got
                diff = (got - reference).abs().max().item()
                print(f"({batch},{cache_len}) {name}: max |out - first launch's| = {diff:.3g}", flush=True)
                times[name]["max_diff"] = diff
        for _ in range(ROUNDS):
            for name, settings, make in entries:
                for key, value in {**defaults, **settings}.items():
                    setattr(decode, key, value)
                times[name]["single"].append(time_graph(make(0)))
                times[name]["layers"].append(time_graph_layers(make, layers))
        for key, value in defaults.items():
            setattr(decode, key, value)
        row = {"batch": batch, "cache_len": cache_len, "kv_bytes": nbytes, "layers": layers, "times_ms": times}
        result["rows"].append(row)
        for name, _, _ in entries:
            single, per_layer = min(times[name]["single"]), min(times[name]["layers"])
            print(f"({batch},{cache_len}) {name:36s} single {single * 1e3:7.2f} us {tbps(nbytes, single):5.2f} TB/s"
                  f" | {layers} layers {per_layer * 1e3:7.2f} us {tbps(nbytes, per_layer):5.2f} TB/s"
                  f" ({tbps(nbytes, per_layer) / result['read_bw']['tbps']:.1%} of read bw)",
                  flush=True)
        del entries
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Sweep the split-KV decode launch (key tile, warps, stages, number of splits, separate
combine kernel or fused merge) under CUDA graph replay, to see where decoding at small
batch loses bandwidth.

bf16, 32 query heads over 8 KV heads, head dim 128, one query token, contiguous cache,
or paged with BATCH:CACHE_LEN:PAGE_SIZE. Prints TB/s (K+V bytes / time) per launch and
the best per shape; writes JSON. TILES=64x4x3,128x8x3 narrows the tiles (BLOCK_N x warps
x stages, the stages as the launcher takes them: a paged launch adds two).
Usage: python benchmarks/tune_decode.py OUT.json [BATCH:CACHE_LEN[:PAGE_SIZE] ...]  (default: SHAPES)
"""

import itertools
import json
import os
import sys

import torch

from modelaccel.attention.decode import decode_attention
from modelaccel.bench.decode_attention import (build_paged_cache, kv_bytes, make_inputs, measure_read_bandwidth, tbps,
                                               time_graph)

SHAPES = [(1, 4096), (1, 32768), (8, 4096), (1, 131072)]
TILES = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)]
if os.environ.get("TILES"):
    TILES = [tuple(int(x) for x in t.split("x")) for t in os.environ["TILES"].split(",")]


def main():
    results = {"read_bw_tbps": measure_read_bandwidth(), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "rows": []}
    print(f"read bandwidth {results['read_bw_tbps']['tbps']:.2f} TB/s", flush=True)
    shapes = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]] or SHAPES
    for batch, cache_len, *page in shapes:
        q, k_cache, v_cache, seqlens = make_inputs(batch, cache_len)[:4]
        table = None
        if page:
            k_cache, v_cache, table = build_paged_cache(k_cache, v_cache, page[0])
        nbytes = kv_bytes(batch, cache_len)
        best = None
        for (bn, warps, stages), splits, fused in itertools.product(TILES, (1, 2, 4, 8, 16, 33, 64, 128),
                                                                   (False, True)):
            if splits * bn > cache_len:
                continue
            config = (bn, warps, stages, 2, 1, fused)

            def call():
                return decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, num_splits=splits,
                                        block_table=table, config=config)[0]
            try:
                ms = time_graph(call)
            except Exception as exc:  # noqa: BLE001 - out of shared memory and the like
                print(batch, cache_len, config, splits, "skip:", str(exc).splitlines()[0][:80], flush=True)
                continue
            row = {"batch": batch, "cache_len": cache_len, "page_size": page[0] if page else None, "block_n": bn,
                   "warps": warps, "stages": stages, "splits": splits, "fused": fused, "ms": ms, "tbps": tbps(nbytes, ms)}
            results["rows"].append(row)
            if best is None or ms < best["ms"]:
                best = row
        print("best", best, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

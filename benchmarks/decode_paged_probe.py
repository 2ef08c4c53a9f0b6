"""Where does a paged decoding step lose time against the contiguous one?

Issue 4 wants the paged cache within 1.10x of the contiguous one; at (1, 4096) it is 1.11x
for pages of 16 and of 256 (f5c66d5). This times, under the decode benchmark's graph
replay timer, the same launches on:
  - the contiguous cache;
  - paged caches whose pages lie in order (block table = arange): the paged kernel's own
    cost, with the memory layout of the contiguous cache;
  - paged caches with pages placed by a random permutation (the benchmark's);
each paged one with the block table read up front (SPLIT_PAGES) and inside the loop. The
contiguous launches are timed with the launch tuner's timer too (launch._gpu_ms), to see
whether it ranks them as the benchmark's does. Rounds alternate the order, so drift is
shared. Usage:
  python benchmarks/decode_paged_probe.py OUT.json [BATCH:CACHE_LEN ...]  (default 1:4096)
"""

import json
import sys

import torch
import triton

from modelaccel.attention import decode, launch
from modelaccel.bench.decode_attention import build_paged_cache, kv_bytes, make_inputs, tbps, time_graph, to_paged

LAUNCHES = [((128, 4, 3, 1, 1), 16), ((64, 4, 3, 1, 1), 16), ((32, 4, 3, 1, 1), 33), ((64, 4, 3, 1, 1), 33)]
ROUNDS = 3


def main():
    shapes = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]] or [(1, 4096)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "timer": "time_graph (one call per graph, L2 emptied by a read before each replay)", "rows": []}
    for batch, cache_len in shapes:
        q, k_cache, v_cache, seqlens = make_inputs(batch, cache_len)
        caches = {"contiguous": (k_cache, v_cache, None)}
        for page in (16, 256):
            table = torch.arange(batch * cache_len // page, device="cuda", dtype=torch.int32).view(batch, -1)
            caches[f"paged{page}_in_order"] = (to_paged(k_cache, table, page), to_paged(v_cache, table, page), table)
            caches[f"paged{page}_random"] = build_paged_cache(k_cache, v_cache, page)
        nbytes = kv_bytes(batch, cache_len)
        timings = {}
        for rnd in range(ROUNDS):
            order = list(caches.items())
            for name, (kc, vc, table) in (order if rnd % 2 == 0 else order[::-1]):
                for table_up_front in ((True, False) if table is not None else (True,)):
                    for config, splits in LAUNCHES:
                        saved = decode._SPLIT_PAGES_MAX
                        decode._SPLIT_PAGES_MAX = saved if table_up_front else 0

                        def call():
                            return decode.decode_attention(q, kc, vc, seqlens, 128 ** -0.5, num_splits=splits,
                                                           block_table=table, config=config)[0]
                        try:
                            ms = time_graph(call)
                        finally:
                            decode._SPLIT_PAGES_MAX = saved
                        key = (name, table_up_front, config[:3], splits)
                        timings.setdefault(key, []).append(ms)
                        if table is None:
                            timings.setdefault((name + "_tuner_timer", True, config[:3], splits), []).append(
                                launch._gpu_ms(call))
        for (name, up_front, tile, splits), ms in timings.items():
            best = min(ms)
            row = {"batch": batch, "cache_len": cache_len, "cache": name, "table_up_front": up_front,
                   "tile": tile, "splits": splits, "ms": ms, "best_us": best * 1e3, "tbps": tbps(nbytes, best)}
            result["rows"].append(row)
            print(f"{batch}x{cache_len} {name:18s} up_front={up_front!s:5s} tile={tile} splits={splits:3d} "
                  f"{best * 1e3:6.1f} us  ({', '.join(f'{m * 1e3:.1f}' for m in ms)})", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

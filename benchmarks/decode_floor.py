"""How fast can one CUDA-graph replay read a decoding step's K and V at all?

Issue 4 asks for >= 2x cuDNN at (batch, cache_len) = (1, 4096) under graph replay: 16 MiB
of K+V. This times, with the decode benchmark's own timer (graph replay, L2 emptied by a
read before every call), kernels that do nothing but the reading:
  - empty: one program that stores one number (the fixed cost of a replay);
  - read: a Triton kernel that streams K and V once (sum of every element, one float per
    program), over a sweep of program counts and tiles; the fastest is the floor any
    attention kernel over the same bytes meets;
  - torch_sum: k.sum() + v.sum().
Usage: python benchmarks/decode_floor.py OUT.json [BATCH:CACHE_LEN ...]  (default 1:4096 1:32768)
"""

import json
import sys

import torch
import triton
import triton.language as tl

from modelaccel.bench.decode_attention import kv_bytes, make_inputs, tbps, time_graph


@triton.jit
def _store_one_kernel(out_ptr):
    tl.store(out_ptr, 1.0)


@triton.jit
def _read_sum_kernel(k_ptr, v_ptr, out_ptr, n_elements, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    # Each program reads a contiguous stretch of both tensors; the sum keeps the loads live.
    pid = tl.program_id(0)
    per_program = tl.cdiv(n_elements, tl.num_programs(0) * BLOCK) * BLOCK
    start = pid * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(start, start + per_program, BLOCK, num_stages=STAGES):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < n_elements
        acc += tl.load(k_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def main():
    shapes = [tuple(int(x) for x in arg.split(":")) for arg in sys.argv[2:]] or [(1, 4096), (1, 32768)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "timer": "time_graph (one call per graph, L2 emptied by a read before each replay)", "rows": []}
    out = torch.empty(4096, device="cuda", dtype=torch.float32)
    result["empty_ms"] = time_graph(lambda: _store_one_kernel[(1,)](out))
    print(f"empty kernel replay: {result['empty_ms'] * 1e3:.1f} us", flush=True)
    for batch, cache_len in shapes:
        _, k_cache, v_cache = make_inputs(batch, cache_len)[:3]
        n = k_cache.numel()
        nbytes = kv_bytes(batch, cache_len)
        row = {"batch": batch, "cache_len": cache_len, "bytes": nbytes, "reads": []}
        for programs in (132, 264, 528, 1056, 2112):
            for block, warps, stages in ((2048, 4, 3), (4096, 8, 3), (8192, 8, 2), (4096, 4, 4)):
                if programs * block > n:
                    continue
                ms = time_graph(lambda: _read_sum_kernel[(programs,)](k_cache, v_cache, out, n, BLOCK=block,
                                                                     STAGES=stages, num_warps=warps))
                row["reads"].append({"programs": programs, "block": block, "warps": warps, "stages": stages,
                                     "ms": ms, "tbps": tbps(nbytes, ms)})
        row["torch_sum_ms"] = time_graph(lambda: k_cache.sum() + v_cache.sum())
        best = min(row["reads"], key=lambda r: r["ms"])
        row["best_read"] = best
        print(f"({batch},{cache_len}) {nbytes / 2**20:.0f} MiB: best read {best['ms'] * 1e3:.1f} us "
              f"({best['tbps']:.2f} TB/s, {best['programs']} programs, block {best['block']}); torch sum "
              f"{row['torch_sum_ms'] * 1e3:.1f} us", flush=True)
        result["rows"].append(row)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

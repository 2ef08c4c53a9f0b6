"""The Gluon forward and backward launched in grid order or in groups of batch-heads.

Both Gluon kernels started every batch-head's longest block before any second block
(gluon_fwd._tile_position with LAUNCH_GROUP 0): with many batch-heads the programs
resident together read the K/V (forward) or Q/dO and the dQ accumulator (backward) of
every head, more than L2 holds. Groups of G batch-heads keep them on a few heads, as
flash_fwd._grid_position does for the Triton kernels (+4-5% geomean there,
results/tuning/launch_order_h200_1b7d08a.json). This times each G on the backward
benchmark's rows and the Llama-3-8B prefill/training shapes in Transformers' layout
([b, h, s, d] seen through a transpose), one launch configuration per kernel, two rounds
with the orders interleaved; every G is checked against G 0 (max abs difference).
Usage: python benchmarks/gluon_launch_order.py OUT.json [G ...]   (default G: 0 4 8 16 32)
"""

import json
import sys

import torch
import triton

from modelaccel.attention.gluon_bwd import flash_attn_backward_gluon_ws
from modelaccel.attention.gluon_fwd import flash_attn_forward_gluon_ws
from modelaccel.bench.attention import BWD_FLOPS_FACTOR, BWD_SHAPES, attention_flops, collect_metadata

# (batch, query heads, kv heads, tokens, Transformers' layout)
ROWS = [(*shape[:4], False) for shape in BWD_SHAPES] + [
    (1, 32, 8, 4096, True), (1, 32, 8, 8192, True), (8, 32, 8, 2048, True), (8, 32, 8, 8192, True)]
FWD_CONFIG = (128, 2, True)  # (BLOCK_N, STAGES, PINGPONG): the tuner's most frequent choice
BWD_CONFIG = (2, 64)  # (STAGES, BLOCK_Q)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    groups = [int(g) for g in sys.argv[2:]] or [0, 4, 8, 16, 32]
    result = {**collect_metadata(), "timing": "do_bench median, faster of two rounds", "groups": groups,
              "fwd_config": FWD_CONFIG, "bwd_config": BWD_CONFIG, "rows": []}
    scale = 128 ** -0.5
    for batch, hq, hk, n, hf_layout in ROWS:
        gen = torch.Generator().manual_seed(n + batch)
        q = torch.randn(batch, n, hq, 128, generator=gen).to("cuda", torch.bfloat16)
        k, v = (torch.randn(batch, n, hk, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
        if hf_layout:
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        dout = torch.randn(q.shape, generator=gen).to("cuda", torch.bfloat16)

        def fwd(group):
            return flash_attn_forward_gluon_ws(q, k, v, scale, True, *FWD_CONFIG, launch_group=group)

        out, lse = fwd(0)

        def bwd(group):
            return flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, True, *BWD_CONFIG,
                                                launch_group=group)

        ref_fwd, ref_bwd = out.clone(), bwd(0)
        row = {"shape": [batch, hq, hk, n], "hf_layout": hf_layout, "ms": {}, "max_abs_diff": {}}
        for group in groups:
            got = (fwd(group)[0],) + bwd(group)
            row["max_abs_diff"][f"G{group}"] = max((a.float() - b.float()).abs().max().item()
                                                   for a, b in zip(got, (ref_fwd,) + ref_bwd))
        for rnd in range(2):
            for group in (groups if rnd == 0 else groups[::-1]):
                row["ms"].setdefault(f"fwd G{group}", []).append(bench(lambda: fwd(group)))
                row["ms"].setdefault(f"bwd G{group}", []).append(bench(lambda: bwd(group)))
        flops = attention_flops(batch, hq, n, n, 128, causal=True)
        row["tflops"] = {key: flops * (BWD_FLOPS_FACTOR if key.startswith("bwd") else 1.0) / (min(ms) * 1e-3) / 1e12
                         for key, ms in row["ms"].items()}
        t = row["tflops"]
        print((batch, hq, hk, n, "hf" if hf_layout else "bshd"), "TFLOPS fwd",
              " ".join(f"G{g} {t[f'fwd G{g}']:.1f}" for g in groups),
              "| bwd", " ".join(f"G{g} {t[f'bwd G{g}']:.1f}" for g in groups),
              "| max diff", max(row["max_abs_diff"].values()), flush=True)
        result["rows"].append(row)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

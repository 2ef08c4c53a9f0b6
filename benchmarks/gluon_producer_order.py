"""The Gluon forward's producer asking for a tile's first K/V before its Q (kv_first,
the kernel's Q_AFTER_FIRST_KV) against Q first, in interleaved rounds.

Q of a program's next tile waits until both warpgroups have finished the current tile's
scores; with Q first, the next tile's first K and V wait behind it, so their latency lands
at the start of every tile of a persistent program. Each launch is timed both ways on the
same inputs (GPU time: CUDA graph replay, L2 emptied before each), outputs compared
bitwise, SDPA cuDNN timed alongside. bf16 d128 causal; the Llama-3-8B rows in
Transformers' layout (q and k [b, h, s, d] seen through a transpose).
Usage: python benchmarks/gluon_producer_order.py OUT.json [--rounds N]
"""

import json
import sys

import torch

from modelaccel.attention import gluon_fwd
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import _provider_call, attention_flops, collect_metadata, tflops

# (batch, query heads, kv heads, tokens, Transformers' layout)
ROWS = [(8, 32, 8, 512, True), (8, 32, 8, 2048, True), (1, 32, 8, 2048, True), (1, 32, 8, 4096, True),
        (16, 16, 16, 1024, False), (8, 16, 16, 2048, False), (1, 16, 16, 16384, False)]
# (name, flash_attn_forward_gluon_ws's block_n, stages, pingpong, persistent, launch_group)
LAUNCHES = [("per-tile", (128, 2, True)), ("persistent snake", (128, 2, True, True)),
            ("persistent groups of 8", (128, 2, True, True, 8)), ("persistent groups of 8, 3 stages", (128, 3, True, True, 8))]


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    result = {**collect_metadata(), "rounds": rounds, "rows": []}
    for batch, hq, hk, n, hf_layout in ROWS:
        q = torch.randn(batch, n, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, n, hk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if hf_layout:
            q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
        flops = attention_flops(batch, hq, n, n, 128, True)
        row = {"shape": [batch, hq, hk, n], "hf_layout": hf_layout, "tflops": {}, "identical": {}}
        with torch.inference_mode():
            calls = {}
            for name, config in LAUNCHES:
                outs = []
                for order in (False, True):
                    def call(config=config, order=order):
                        return gluon_fwd.flash_attn_forward_gluon_ws(q, k, v, 128 ** -0.5, True, *config,
                                                                     kv_first=order)[0]
                    calls[f"{name}, {'kv first' if order else 'q first'}"] = call
                    outs.append(call().clone())
                row["identical"][name] = bool(torch.equal(*outs))
            fn, ctx = _provider_call("cudnn", q, k, v, True)
            with ctx:
                ref = fn().transpose(1, 2).float()
            err = (outs[1].float() - ref).abs().max().item()
            row["max_abs_err_vs_cudnn"] = err
            for _ in range(rounds):
                for name, call in calls.items():
                    row["tflops"].setdefault(name, []).append(tflops(flops, _gpu_ms(call)))
                fn, ctx = _provider_call("cudnn", q, k, v, True)
                with ctx:
                    row["tflops"].setdefault("cudnn", []).append(tflops(flops, _gpu_ms(fn)))
        result["rows"].append(row)
        print(f"{(batch, hq, hk, n)} identical {row['identical']} max err vs cuDNN {err:.3g}", flush=True)
        for name, values in row["tflops"].items():
            print(f"  {name:44s} best {max(values):6.1f}  {' '.join(f'{x:6.1f}' for x in values)}", flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

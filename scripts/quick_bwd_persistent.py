"""Quick GPU timing of the Gluon backward's per-tile and persistent launches on the short
backward rows, next to SDPA's FlashAttention-2 and cuDNN backwards: TFLOPS at 2.5x the
causal forward's FLOPs, from do_bench (median, direct launches: host time included) and
from CUDA graph replay (launch._gpu_ms: GPU time alone; ours only: SDPA's autograd
backward does not capture). Each launch's gradients are
checked against the deterministic Triton backward's first.
Usage: python scripts/quick_bwd_persistent.py [OUT.json]"""
import json
import sys

import triton
from torch.nn.attention import SDPBackend

from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.gluon_bwd import flash_attn_backward_gluon_ws
from modelaccel.attention.launch import _gpu_ms
from modelaccel.bench.attention import (attention_flops, causal_backward_inputs, collect_metadata, compare_grads,
                                       sdpa_backward_call)

# name: (stages, block_q, persistent, launch group, K/V buffers, dealt on the host, causal idle steps skipped)
CONFIGS = {"s2q64": (2, 64), "s2q32pG8S": (2, 32, True, 8, 1, True), "s2q64pG8S": (2, 64, True, 8, 1, True),
           "s2q32I": (2, 32, False, 8, 1, False, True), "s2q32pG8SI": (2, 32, True, 8, 1, True, True),
           "s2q64pG8SI": (2, 64, True, 8, 1, True, True)}
ROWS = ((16, 16, 16, 1024), (8, 16, 16, 2048), (2, 48, 48, 1024), (4, 16, 16, 4096), (2, 32, 8, 8192))

result = {**collect_metadata(), "rows": []}
for batch, hq, hk, n in ROWS:
    q, k, v, dout, out, lse, scale = causal_backward_inputs(batch, hq, hk, n)
    ref = flash_attn_backward(dout, q, k, v, out, lse, scale, True, atomic_dq=False)
    flops = 2.5 * attention_flops(batch, hq, n, n, 128, True)
    calls = {"flash": sdpa_backward_call(SDPBackend.FLASH_ATTENTION, q, k, v, dout, True),
             "cudnn": sdpa_backward_call(SDPBackend.CUDNN_ATTENTION, q, k, v, dout, True)}
    errors = {}
    for name, config in CONFIGS.items():
        def call(config=config):
            return flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, True, *config)
        check = compare_grads(call(), ref)
        if not check["ok"]:
            errors[name] = check["rel_err"]
            continue
        calls[name] = call
    row = {"shape": [batch, hq, hk, n], "errors": errors,
           "eager": {name: flops / triton.testing.do_bench(fn, warmup=10, rep=50) * 1e-9 for name, fn in calls.items()},
           "gpu": {name: flops / _gpu_ms(fn) * 1e-9 for name, fn in calls.items() if name in CONFIGS}}
    result["rows"].append(row)
    print((batch, hq, hk, n), "eager", {k: round(t, 1) for k, t in row["eager"].items()}, flush=True)
    print((batch, hq, hk, n), "gpu  ", {k: round(t, 1) for k, t in row["gpu"].items()}, errors or "", flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)

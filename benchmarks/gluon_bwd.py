"""The Gluon backward against modelaccel's tuned backward and SDPA's, same inputs.

bf16, head dim 128, causal: the backward benchmark's rows. For each (ring depth, query rows
per step) of attention/gluon_bwd.GLUON_BWD_CONFIGS[128] and each persistent launch of
GLUON_BWD_PERSISTENT_CONFIGS[128]: dq, dk, dv checked against the deterministic Triton
backward's first (bench.attention.compare_grads: relative error below 2e-2 each; a mismatch is reported and not timed),
then timed with do_bench (median) from the same forward outputs; `modelaccel` is
flash_attn_backward (tuned), `flash` and `cudnn` SDPA's backward through
torch.autograd.grad. TFLOPS count 2.5x the forward's FLOPs.
With --rounds=N the Gluon launches are timed N times in turn (round-robin, fresh
do_bench each) and each row's TFLOPS is the median round, every round kept under "rounds":
for launches whose speed changes between timings. --rows=BxHQxHKxN,... narrows the rows.
Usage: python benchmarks/gluon_bwd.py OUT.json [NAME,...] [--rounds=N] [--rows=...]
(NAMEs: gluon_bwd.config_name's, e.g. `gluon_s2q64,gluon_s2q32p`; default: every configuration)
"""

import json
import sys

import triton

from modelaccel.attention.flash_bwd import flash_attn_backward
from modelaccel.attention.gluon_bwd import (GLUON_BWD_CONFIGS, GLUON_BWD_PERSISTENT_CONFIGS, config_name,
                                            flash_attn_backward_gluon_ws)
from modelaccel.bench.attention import (BWD_SHAPES, attention_flops, causal_backward_inputs, collect_metadata,
                                       compare_grads, sdpa_backward_call, tflops)

ROWS = [shape[:4] for shape in BWD_SHAPES]  # the backward benchmark's rows (all square)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    from torch.nn.attention import SDPBackend

    options = dict(arg[2:].split("=", 1) for arg in sys.argv[2:] if arg.startswith("--"))
    names = [arg for arg in sys.argv[2:] if not arg.startswith("--")]
    configs = {config_name(c): c for c in GLUON_BWD_CONFIGS[128] + GLUON_BWD_PERSISTENT_CONFIGS[128]}
    if names:
        configs = {name: configs[name] for name in names[0].split(",")}
    rounds = int(options.get("rounds", 1))
    rows = ROWS
    if "rows" in options:
        rows = [tuple(int(x) for x in row.split("x")) for row in options["rows"].split(",")]
    result = {**collect_metadata(), "rounds": rounds, "rows": []}
    for batch, hq, hk, n in rows:
        q, k, v, dout, out, lse, scale = causal_backward_inputs(batch, hq, hk, n)
        flops = 2.5 * attention_flops(batch, hq, n, n, 128, True)
        row = {"shape": [batch, hq, hk, n], "tflops": {}, "errors": {}, "rounds": {}}
        # The deterministic Triton backward as the reference: the tuned one may be a Gluon launch.
        ref = flash_attn_backward(dout, q, k, v, out, lse, scale, True, atomic_dq=False)
        row["tflops"]["modelaccel"] = tflops(flops, bench(lambda: flash_attn_backward(dout, q, k, v, out, lse,
                                                                                      scale, True)))
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            row["tflops"][name] = tflops(flops, bench(sdpa_backward_call(backend, q, k, v, dout, True)))
        calls = {}
        for name, config in configs.items():
            def call(config=config):
                return flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, True, *config)
            try:
                grads = call()
            except Exception as exc:  # noqa: BLE001 - out of shared memory, compile errors: report and go on
                row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            check = compare_grads(grads, ref)
            if not check["ok"]:
                row["errors"][name] = f"mismatch against the Triton backward: rel errors {check['rel_err']}"
                continue
            calls[name] = call
        for _ in range(rounds):
            for name, call in calls.items():
                row["rounds"].setdefault(name, []).append(tflops(flops, bench(call)))
        for name, timed in row["rounds"].items():
            row["tflops"][name] = sorted(timed)[len(timed) // 2]
        result["rows"].append(row)
        print(batch, hq, hk, n, {p: round(t, 1) for p, t in row["tflops"].items()}, row["errors"] or "", flush=True)
        if rounds > 1:
            print("  rounds:", {p: [round(t, 1) for t in ts] for p, ts in row["rounds"].items()}, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

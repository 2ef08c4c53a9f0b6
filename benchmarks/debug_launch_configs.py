"""Find which forward or backward launch configuration faults or disagrees, each in its
own process.

A kernel that faults (misaligned address) poisons the CUDA context, so every configuration
runs in a fresh subprocess with CUDA_LAUNCH_BLOCKING=1. Each prints the relative errors of
out (forward) or dq/dk/dv (backward) against a float32 reference.
Usage: python benchmarks/debug_launch_configs.py [fwd|dq|dkdv ...]   (default: all three)
"""

import os
import subprocess
import sys

CASES = [  # (batch, hq, hk, sq, sk, d, causal)
    (1, 32, 8, 2048, 2048, 128, True),
    (2, 8, 4, 700, 900, 160, True),
    (2, 8, 4, 700, 900, 256, True),
    (2, 8, 8, 700, 900, 160, False),
]
CASES = [c for c in CASES if os.environ.get("DEBUG_HEADDIM", str(c[5])) == str(c[5])]

CHILD = r"""
import sys, torch
from modelaccel.attention.flash_bwd import flash_attn_backward, _DQ_CONFIGS, _DKDV_CONFIGS
from modelaccel.attention.flash_fwd import flash_attn_forward, _GPU_CONFIGS
from modelaccel.attention.reference import attention_ref
b, hq, hk, sq, sk, d, causal, which, idx = eval(sys.argv[1])
key = min(c for c in _DQ_CONFIGS if c >= d)
safe = (32, 32, 4, 2)
fwd_cfg = _GPU_CONFIGS[key][idx] if which == "fwd" else (64, 64, 4, 2)
dq_cfg = _DQ_CONFIGS[key][idx] if which == "dq" else safe
kv_cfg = _DKDV_CONFIGS[key][idx] if which == "dkdv" else safe
torch.manual_seed(0)
q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16)
dout = torch.randn_like(q)
bm, bn, warps, stages = fwd_cfg
out, lse = flash_attn_forward(q, k, v, d ** -0.5, causal, use_tma=False, block_m=bm, block_n=bn,
                              num_warps=warps, num_stages=stages)
dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, d ** -0.5, causal, blocks=(dq_cfg, kv_cfg))
torch.cuda.synchronize()
q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
ro, _ = attention_ref(q32, k32, v32, d ** -0.5, causal, compute_dtype=torch.float32)
ro.backward(dout.float())
errs = [((g.float() - r).norm() / r.norm()).item()
        for g, r in zip((out, dq, dk, dv), (ro.detach(), q32.grad, k32.grad, v32.grad))]
cfg = {"fwd": fwd_cfg, "dq": dq_cfg, "dkdv": kv_cfg}[which]
print(f"{which} {cfg}: out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}")
"""


def main():
    kinds = sys.argv[1:] or ["fwd", "dq", "dkdv"]
    from modelaccel.attention.flash_bwd import _DKDV_CONFIGS, _DQ_CONFIGS
    from modelaccel.attention.flash_fwd import _GPU_CONFIGS
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
    for case in CASES:
        key = min(c for c in _DQ_CONFIGS if c >= case[5])
        for which, configs in (("fwd", _GPU_CONFIGS[key]), ("dq", _DQ_CONFIGS[key]), ("dkdv", _DKDV_CONFIGS[key])):
            if which not in kinds:
                continue
            for idx in range(len(configs)):
                arg = repr((*case, which, idx))
                res = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=120,
                                     env=env)
                line = res.stdout.strip().splitlines()[-1:] or [f"FAULT: {res.stderr.strip().splitlines()[-1:]}"]
                print(case, line[0], flush=True)


if __name__ == "__main__":
    main()

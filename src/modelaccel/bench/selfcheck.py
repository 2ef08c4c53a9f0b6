"""CPU self-check of the Triton attention kernel through the Triton interpreter.

Run as `python -m modelaccel.bench.selfcheck` in a process whose environment already has
TRITON_INTERPRET=1 (Triton reads it when kernels are defined, i.e. when modelaccel is
imported, so setting it later has no effect). `modelaccel bench attention` does this on
machines without a GPU.

Each case compares `modelaccel.flash_attn_func` on small fp16/bf16 CPU tensors with
`attention_ref` computed in float64, and also counts interpreted Triton kernel launches:
a case that produced the right numbers without launching a kernel ran the PyTorch
fallback, not the kernel, and fails.
"""

import os
import sys

import torch

# (dtype, batch, nheads_q, nheads_k, seqlen_q, seqlen_k, headdim, causal). Kept tiny since
# the interpreter runs every program instance in numpy: at most 2 x 2 heads x 64 tokens.
CASES = (
    ("fp16", 1, 2, 2, 64, 64, 64, False),
    ("fp16", 2, 2, 1, 53, 37, 40, False),  # GQA, odd lengths, head dim not a power of two
    ("fp16", 1, 2, 1, 37, 53, 40, True),
    ("fp16", 1, 2, 2, 53, 37, 64, True),  # seqlen_q > seqlen_k: the first 16 rows see no key
    ("bf16", 2, 2, 2, 64, 64, 64, True),
    ("bf16", 2, 2, 1, 53, 37, 40, False),
)

# Pass if |out - ref| <= ATOL + RTOL * |ref| everywhere. A correct kernel rounds P to the
# input dtype before the PV matmul and rounds the output once, errors of about an ulp of the
# output; the interpreter's float-to-bf16 cast truncates rather than rounds, which can cost
# a full ulp on outputs of magnitude 2-8 (rows that see one key output v itself). Two ulps
# relative (2^-9 fp16, 2^-6 bf16) plus as much absolute covers both; masking or rescaling
# bugs give errors of O(0.1) on outputs of O(1) or less.
ATOL = {"fp16": 2e-3, "bf16": 1.6e-2}
RTOL = {"fp16": 2e-3, "bf16": 1.6e-2}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _count_interpreted_launches():
    """Patch Triton's interpreter to count kernel launches; returns a zero-arg counter read.

    There is no public hook for "did a Triton kernel run", and the interpreter's
    InterpretedFunction.run is the one place every launch (autotuned or not) goes through.
    """
    from triton.runtime.interpreter import InterpretedFunction

    launches = [0]
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            launches[0] += 1
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    return lambda: launches[0]


def check_case(flash_attn_func, attention_ref, dtype, batch, nheads_q, nheads_k, seqlen_q, seqlen_k, headdim,
               causal):
    """Max abs error of flash_attn_func against the float64 reference on random CPU inputs.

    q [batch, seqlen_q, nheads_q, headdim], k/v [batch, seqlen_k, nheads_k, headdim] in
    `dtype` ("fp16"/"bf16"), drawn from a fixed seed. Returns (max abs error, whether every
    element is within ATOL + RTOL * |ref|); (nan, False) if the output has the wrong shape.
    """
    gen = torch.Generator().manual_seed(seqlen_q * 1000 + seqlen_k)
    q = torch.randn(batch, seqlen_q, nheads_q, headdim, generator=gen).to(DTYPES[dtype])
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to(DTYPES[dtype])
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to(DTYPES[dtype])
    out = flash_attn_func(q, k, v, causal=causal)
    ref, _ = attention_ref(q, k, v, causal=causal, compute_dtype=torch.float64)
    if out.shape != ref.shape:
        return float("nan"), False
    err = (out.double() - ref).abs()
    # NaN in out makes err NaN, and NaN <= bound is False: fails.
    return err.max().item(), bool((err <= ATOL[dtype] + RTOL[dtype] * ref.abs()).all())


def main():
    """Run every case, print one line each, return 0 if all pass and the kernel ran, else 1."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("selfcheck: TRITON_INTERPRET=1 must be set before the process starts; "
              "without it flash_attn_func takes the PyTorch path on CPU and nothing is checked.")
        return 1
    launches = _count_interpreted_launches()

    from modelaccel import flash_attn_func
    from modelaccel.attention.reference import attention_ref

    print("modelaccel self-check: Triton kernel in the Triton interpreter (CPU) vs float64 reference")
    failures = 0
    for case in CASES:
        dtype, batch, hq, hk, sq, sk, d, causal = case
        before = launches()
        err, within = check_case(flash_attn_func, attention_ref, *case)
        ran_kernel = launches() > before
        ok = ran_kernel and within
        failures += not ok
        note = "" if ran_kernel else " (no Triton kernel launched: the PyTorch fallback ran)"
        print(f"{'PASS' if ok else 'FAIL'} {dtype} batch={batch} heads={hq}/{hk} seqlen_q={sq} seqlen_k={sk} "
              f"headdim={d} causal={causal}: max abs err {err:.2e} (tol {ATOL[dtype]:g} + {RTOL[dtype]:g}*|ref|){note}")
    print(f"{len(CASES) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

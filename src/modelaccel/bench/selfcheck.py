"""CPU self-check of the Triton attention kernel through the Triton interpreter.

Run as `python -m modelaccel.bench.selfcheck` in a process whose environment already has
TRITON_INTERPRET=1 (Triton reads it when kernels are defined, i.e. when modelaccel is
imported, so setting it later has no effect). `modelaccel bench attention` does this on
machines without a GPU.

Each case compares `modelaccel.flash_attn_func` on small fp16/bf16 CPU tensors with
`attention_ref` computed in float64, and also counts interpreted Triton kernel launches:
a case that produced the right numbers without launching a kernel ran the PyTorch
fallback, not the kernel, and fails. bf16 cases are skipped, with a line saying so, where
the interpreter cannot multiply bf16 matrices (see `interpreter_bf16_dot_works`).
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

# A correct kernel rounds P to the input dtype before the PV matmul and rounds the output
# once: about 5e-4 (fp16) and 4e-3 (bf16) max-abs error on these inputs. The bounds leave
# headroom for other op orders; masking or rescaling bugs give errors of O(0.1).
ATOL = {"fp16": 5e-3, "bf16": 2.5e-2}
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


def interpreter_bf16_dot_works():
    """Whether the Triton interpreter computes tl.dot on bfloat16 operands correctly.

    It does not in the Triton releases this was written against: it keeps bfloat16 as raw
    uint16 and multiplies the bit patterns (triton-lang/triton#11584, not supported yet
    per the maintainers). bf16 cases are skipped while that holds, since they would fail
    whatever the kernel does; on a GPU the benchmark checks bf16 against SDPA.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(A, B, C, N: tl.constexpr):
        idx = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
        tl.store(C + idx, tl.dot(tl.load(A + idx), tl.load(B + idx)))

    # Small integers are exact in bf16 and in the fp32 product.
    a = torch.arange(256, dtype=torch.float32).remainder(5).sub(2).reshape(16, 16)
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a.bfloat16(), a.t().contiguous().bfloat16(), c, N=16)
    return torch.equal(c, a @ a.t())


def check_case(flash_attn_func, attention_ref, dtype, batch, nheads_q, nheads_k, seqlen_q, seqlen_k, headdim,
               causal):
    """Max abs error of flash_attn_func against the float64 reference on random CPU inputs.

    q [batch, seqlen_q, nheads_q, headdim], k/v [batch, seqlen_k, nheads_k, headdim] in
    `dtype` ("fp16"/"bf16"), drawn from a fixed seed. Returns a float (nan if the output
    had the wrong shape or non-finite values).
    """
    gen = torch.Generator().manual_seed(seqlen_q * 1000 + seqlen_k)
    q = torch.randn(batch, seqlen_q, nheads_q, headdim, generator=gen).to(DTYPES[dtype])
    k = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to(DTYPES[dtype])
    v = torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to(DTYPES[dtype])
    out = flash_attn_func(q, k, v, causal=causal)
    ref, _ = attention_ref(q, k, v, causal=causal, compute_dtype=torch.float64)
    if out.shape != ref.shape:
        return float("nan")
    return (out.double() - ref).abs().max().item()


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
    bf16_ok = interpreter_bf16_dot_works()
    failures = skipped = 0
    for case in CASES:
        dtype, batch, hq, hk, sq, sk, d, causal = case
        if dtype == "bf16" and not bf16_ok:
            skipped += 1
            print(f"SKIP {dtype} batch={batch} heads={hq}/{hk} seqlen_q={sq} seqlen_k={sk} headdim={d} "
                  f"causal={causal}: this Triton's interpreter computes bf16 tl.dot wrongly (triton#11584)")
            continue
        before = launches()
        err = check_case(flash_attn_func, attention_ref, *case)
        ran_kernel = launches() > before
        ok = ran_kernel and err <= ATOL[dtype]  # nan compares False: fails
        failures += not ok
        note = "" if ran_kernel else " (no Triton kernel launched: the PyTorch fallback ran)"
        print(f"{'PASS' if ok else 'FAIL'} {dtype} batch={batch} heads={hq}/{hk} seqlen_q={sq} seqlen_k={sk} "
              f"headdim={d} causal={causal}: max abs err {err:.2e} (tol {ATOL[dtype]:g}){note}")
    print(f"{len(CASES) - failures - skipped} passed, {failures} failed, {skipped} skipped")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention benchmarks: modelaccel against PyTorch SDPA's flash and cuDNN backends.

Three modes, each a list of tables (`Table.mode`):

- "fwd": the forward pass. Every row builds fresh random inputs, checks modelaccel's output
  against SDPA's flash backend, then times each provider on the same tensors with
  `triton.testing.do_bench` (median of the timed runs).
- "bwd": the backward pass alone. Each provider runs its forward once on inputs that require
  grad; `torch.autograd.grad(out, (q, k, v), dout)` is what is timed. modelaccel's dq, dk,
  dv are checked against SDPA flash's first.
- "varlen": the forward pass over a batch of sequences of different lengths. modelaccel
  runs `flash_attn_varlen_func` on the packed tokens; the SDPA peers run the same batch
  padded to its longest sequence (causal) or as nested jagged tensors (non-causal), and
  `torch.nn.attention.varlen.varlen_attn` ("flash_varlen") runs the packed tokens.

Throughput is in TFLOPS counting only the score and output matmuls over the keys each
query can see (the backward counts 2.5x the forward: five matmuls to the forward's two).
A row is one (BATCH, HQ, HK, N_CTX_Q, N_CTX_K) shape, or (BATCH, HQ, HK, MAX_LEN) for
varlen; a table is a list of rows sharing mode, dtype, head dim and causality.
`run_benchmark` returns plain dicts and lists so the results serialise to JSON as they are
(see `modelaccel.bench.report`).
"""

import contextlib
import datetime
import math
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROVIDERS = ("modelaccel", "flash", "cudnn")
# Varlen tables have one more peer: torch.nn.attention.varlen.varlen_attn, the FA2 varlen
# kernel on the packed batch (no padding), where this torch has it.
VARLEN_PROVIDERS = PROVIDERS + ("flash_varlen",)
ALL_PROVIDERS = VARLEN_PROVIDERS
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Where rows run. Always CUDA for real numbers; the tests point it at the CPU (with a stub
# timer) to exercise the checking and bookkeeping without a GPU.
DEVICE = "cuda"

# do_bench settings: warmup and rep are in milliseconds of GPU time, not iterations.
WARMUP_MS = 25
REP_MS = 100

# (BATCH, HQ, HK, N_CTX_Q, N_CTX_K): square, long, and ragged/odd lengths, including
# N_CTX_Q > N_CTX_K and a 7-key row that is all tail block.
NONCAUSAL_SHAPES = (
    (16, 16, 16, 1024, 1024),
    (8, 16, 16, 2048, 2048),
    (4, 16, 16, 4096, 4096),
    (2, 16, 16, 8192, 8192),
    (1, 16, 16, 16384, 16384),
    (2, 48, 48, 1024, 1024),
    (2, 48, 48, 2048, 1024),
    (2, 48, 48, 4096, 8192),
    (2, 48, 48, 8192, 4096),
    (2, 48, 48, 16384, 8192),
    (8, 16, 16, 1989, 15344),
    (4, 16, 16, 4097, 163),
    (2, 16, 16, 8122, 2159),
    (1, 16, 16, 16281, 7),
    (2, 48, 48, 1021, 1020),
    (2, 48, 48, 2001, 2048),
    (2, 48, 48, 3996, 9639),
    (2, 48, 48, 8181, 1021),
)
GQA_SHAPES = ((4, 32, 8, 4096, 4096), (1, 64, 8, 16384, 16384))
# Causal rows are square only: SDPA's is_causal aligns the mask top-left while flash-attn
# (and modelaccel) align it bottom-right; the two agree only when N_CTX_Q == N_CTX_K.
CAUSAL_SHAPES = tuple(s for s in NONCAUSAL_SHAPES if s[3] == s[4]) + GQA_SHAPES

QUICK_NONCAUSAL_SHAPES = ((4, 16, 16, 1024, 1024), (2, 48, 48, 1021, 1020), (4, 16, 16, 4097, 163))
QUICK_CAUSAL_SHAPES = ((4, 16, 16, 1024, 1024), (4, 32, 8, 2048, 2048))

# Backward rows: the forward's square shapes plus GQA 32/8 at 8K (all causal, so square).
BWD_SHAPES = tuple(s for s in NONCAUSAL_SHAPES if s[3] == s[4]) + ((2, 32, 8, 8192, 8192),)
QUICK_BWD_SHAPES = ((4, 16, 16, 1024, 1024), (2, 32, 8, 2048, 2048))
# The backward does 5 matmuls (S = QK^T recomputed, dV, dP, dQ, dK) to the forward's 2.
BWD_FLOPS_FACTOR = 2.5

# Varlen rows: (BATCH, HQ, HK, MAX_LEN). Lengths are drawn by `varlen_seqlens`.
VARLEN_SHAPES = ((2, 16, 4, 1024), (8, 16, 2, 2048), (4, 16, 8, 4096), (2, 48, 12, 1024), (4, 64, 8, 4096))
QUICK_VARLEN_SHAPES = ((2, 16, 4, 1024), (4, 16, 8, 2048))
VARLEN_SEED = 0

# Backward check: relative (Frobenius) error of each of dq, dk, dv against SDPA flash's.
# Both accumulate in fp32 and round once to bf16 (2^-8 relative per element), so a correct
# kernel lands near 3e-3; a wrong mask or a missing rescale gives errors of O(0.1).
BWD_CHECK_RTOL = 2e-2

# Largest acceptable difference between modelaccel and SDPA flash. Both round P to the
# input dtype before the PV matmul and round the output once, so a correct kernel lands
# around 1e-3 (fp16) / 1e-2 (bf16) in max-abs and well under these in relative terms;
# masking or rescaling bugs show up as O(0.1) errors. The relative test matters for long
# rows, whose outputs are small enough that an absolute bound alone would be loose.
CHECK_ATOL = {"fp16": 1e-2, "bf16": 5e-2}
CHECK_RTOL = {"fp16": 5e-3, "bf16": 2.5e-2}


@dataclass(frozen=True)
class Table:
    """One benchmark table: `shapes` are (BATCH, HQ, HK, N_CTX_Q, N_CTX_K) tuples, or
    (BATCH, HQ, HK, MAX_LEN) for mode "varlen"; mode is "fwd", "bwd" or "varlen"."""

    dtype: str
    headdim: int
    causal: bool
    shapes: tuple
    mode: str = "fwd"

    @property
    def title(self):
        title = f"{self.dtype}, headdim {self.headdim}, {'causal' if self.causal else 'non-causal'}"
        if self.mode == "bwd":
            title = "backward, " + title
        elif self.mode == "varlen":
            peers = ("flash/cudnn: SDPA padded to the longest sequence" if self.causal
                     else "flash/cudnn: SDPA on nested jagged tensors")
            peers += "; flash_varlen: torch varlen_attn, packed"
            title = f"varlen, {title} (peers: {peers})"
        return title


SUITES = {
    "default": (
        Table("fp16", 128, False, NONCAUSAL_SHAPES),
        Table("bf16", 128, True, CAUSAL_SHAPES),
        Table("fp16", 64, False, NONCAUSAL_SHAPES),
    ),
    "quick": (
        Table("fp16", 128, False, QUICK_NONCAUSAL_SHAPES),
        Table("bf16", 128, True, QUICK_CAUSAL_SHAPES),
        Table("fp16", 64, False, QUICK_NONCAUSAL_SHAPES[:2]),
    ),
}
_SUITE_SHAPES = {
    "default": (NONCAUSAL_SHAPES, CAUSAL_SHAPES),
    "quick": (QUICK_NONCAUSAL_SHAPES, QUICK_CAUSAL_SHAPES),
}


def make_tables(suite="default", dtype=None, causal=False, headdim=None, mode="fwd"):
    """Tables to run for a suite, optionally narrowed to one dtype/causal/headdim setting.

    mode "fwd": with no override the suite's own tables are returned. With any of `dtype`
    ("fp16" or "bf16", default fp16), `causal` or `headdim` (default 128) given, a single
    table with that setting over the suite's shapes (its square + GQA shapes when causal).
    mode "bwd": one causal table (default bf16, headdim 128) over the backward shapes.
    mode "varlen": a causal and a non-causal table (default bf16, headdim 128) over the
    varlen shapes; `causal=True` keeps only the causal one.
    """
    if mode == "bwd":
        shapes = BWD_SHAPES if suite == "default" else QUICK_BWD_SHAPES
        return [Table(dtype or "bf16", headdim or 128, True, shapes, mode="bwd")]
    if mode == "varlen":
        shapes = VARLEN_SHAPES if suite == "default" else QUICK_VARLEN_SHAPES
        tables = [Table(dtype or "bf16", headdim or 128, True, shapes, mode="varlen")]
        if not causal:
            tables.append(Table(dtype or "bf16", headdim or 128, False, shapes, mode="varlen"))
        return tables
    if mode != "fwd":
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'varlen', got {mode!r}")
    if dtype is None and not causal and headdim is None:
        return list(SUITES[suite])
    noncausal_shapes, causal_shapes = _SUITE_SHAPES[suite]
    return [Table(dtype or "fp16", headdim or 128, causal, causal_shapes if causal else noncausal_shapes)]


def causal_visible_pairs(seqlen_q, seqlen_k):
    """Exact number of (query, key) pairs left unmasked by bottom-right aligned causal masking.

    Query row i sits at key position i + seqlen_k - seqlen_q and sees keys 0..that position,
    so rows near the top see nothing when seqlen_q > seqlen_k and the last row sees all keys.
    The visible counts of the rows that see anything are consecutive integers ending at
    seqlen_k, summed here in closed form.
    """
    first = max(seqlen_k - seqlen_q, 0) + 1  # visible keys of the first row that sees any
    if first > seqlen_k:
        return 0
    return (first + seqlen_k) * (seqlen_k - first + 1) // 2


def attention_flops(batch, nheads_q, seqlen_q, seqlen_k, headdim, causal):
    """Forward FLOPs of QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add per visible pair.

    Causal square shapes count half the pairs, the convention of the flash-attn and Triton
    tutorial tables, so numbers compare with theirs (the exact count is N(N+1)/2, 1/N more).
    Causal non-square shapes count the exact bottom-right visible pairs.
    """
    full = 4 * batch * nheads_q * seqlen_q * seqlen_k * headdim
    if not causal:
        return full
    if seqlen_q == seqlen_k:
        return full // 2
    return 4 * batch * nheads_q * headdim * causal_visible_pairs(seqlen_q, seqlen_k)


def tflops(flops, ms):
    """Throughput in TFLOP/s of `flops` done in `ms` milliseconds; None if `ms` is None."""
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def _to_sdpa_layout(q, k, v):
    # SDPA wants [batch, heads, seqlen, headdim]; a transposed view of the same storage
    # keeps the inputs identical across providers (no copy, same strides flash-attn sees).
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _sdpa_call(backend, q, k, v, causal):
    """A zero-argument SDPA call on [b, s, h, d] inputs and the context that pins `backend`."""
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = _to_sdpa_layout(q, k, v)
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    # is_causal is top-left aligned in SDPA; only square causal shapes are benchmarked,
    # where it equals flash-attn's bottom-right alignment.
    return (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **gqa)), sdpa_kernel(backend)


def causal_backward_inputs(batch, nheads_q, nheads_k, seqlen, headdim=128):
    """Fresh random bf16 q [batch, seqlen, nheads_q, headdim], k, v [batch, seqlen, nheads_k,
    headdim] and dout (like q) on the GPU, with modelaccel's causal forward out and lse, for
    the backward sweeps in benchmarks/. Returns (q, k, v, dout, out, lse, softmax_scale)."""
    from modelaccel.attention.flash_fwd import flash_attn_forward

    q = torch.randn(batch, seqlen, nheads_q, headdim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    scale = headdim ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, True)
    return q, k, v, dout, out, lse, scale


def sdpa_backward_call(backend, q, k, v, dout, causal):
    """A zero-argument call of SDPA's backward under `backend` (an SDPBackend), for timing.

    SDPA's forward runs once, here, on detached copies of q [b, s, h, d] and k, v
    [b, s, hk, d]; the call returns torch.autograd.grad of that output for dout (shaped like
    q) with respect to the copies, keeping the graph so it can run again and again."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn, ctx = _sdpa_call(backend, qg, kg, vg, causal)
    with ctx:
        out = fn()
    dout_sdpa = dout.transpose(1, 2)
    return lambda: torch.autograd.grad(out, (qg, kg, vg), dout_sdpa, retain_graph=True)


def _provider_call(provider, q, k, v, causal):
    from torch.nn.attention import SDPBackend

    if provider == "modelaccel":
        from modelaccel import flash_attn_func

        return (lambda: flash_attn_func(q, k, v, causal=causal)), contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    return _sdpa_call(backend, q, k, v, causal)


def _run_capturing(fn, ctx, record_warnings=True):
    """Run fn() inside ctx; return (result, None) or (None, reason) if a kernel refused the call.

    SDPA explains why a backend cannot take a shape only in warnings, ahead of a generic
    "No available kernel" error, so the warnings are folded into the reason. Timing loops
    pass record_warnings=False: there the call already succeeded once, and recording every
    warning ("always") would add host time to each timed call of anything that warns.
    """
    catcher = warnings.catch_warnings(record=True) if record_warnings else contextlib.nullcontext([])
    with catcher as caught, ctx:
        if record_warnings:
            warnings.simplefilter("always")
        try:
            return fn(), None
        except (RuntimeError, ValueError, NotImplementedError, TypeError, ImportError) as e:  # OOM: RuntimeError
            reasons = [str(e).strip().splitlines()[0]] + [str(w.message).strip().splitlines()[0] for w in caught]
            return None, "; ".join(reasons)


def _run_peer(fn, ctx, record_warnings=True):
    """_run_capturing for SDPA peers on paths newer than the forward's (nested tensors, torch's
    varlen_attn): any exception they raise is recorded as the reason, with its type, so a
    peer's failure costs its number, never the benchmark run."""
    try:
        return _run_capturing(fn, ctx, record_warnings)
    except Exception as e:  # noqa: BLE001 - deliberately broad, see above
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _reference_output(q, k, v, causal):
    """SDPA output in [b, s, h, d] to check modelaccel against, and the backend that made it.

    K/V heads are repeated for GQA so the check does not depend on a backend's enable_gqa
    support; flash is preferred, cuDNN is the fallback for shapes flash refuses.
    """
    from torch.nn.attention import SDPBackend

    group = q.shape[2] // k.shape[2]
    k_full, v_full = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    reasons = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        out, reason = _run_capturing(*_sdpa_call(backend, q, k_full, v_full, causal))
        if out is not None:
            return out.transpose(1, 2), name
        reasons.append(f"{name}: {reason}")
    return None, "; ".join(reasons)


def compare_outputs(out, ref, dtype):
    """Max-abs and relative (Frobenius) error of `out` against `ref` and whether they pass.

    out, ref: tensors of the same shape in any float dtype; dtype: "fp16" or "bf16",
    selecting the tolerances `CHECK_ATOL` / `CHECK_RTOL`.
    """
    diff = out.float() - ref.float()
    max_abs = diff.abs().max().item()
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-30)).item()
    ok = math.isfinite(max_abs) and math.isfinite(rel) and max_abs <= CHECK_ATOL[dtype] and rel <= CHECK_RTOL[dtype]
    return {"max_abs_err": max_abs, "rel_err": rel, "ok": ok}


def _log_check(check, what, shape, table, log):
    """Warn about a modelaccel check that did not pass (a mismatch is then not timed)."""
    if check["status"] == "mismatch":
        log(f"WARNING: modelaccel {what} differs from SDPA {check['reference']} for {shape} "
            f"({table.title}): max abs err {check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e}; "
            "not timing it")
    elif check["status"] != "ok":
        log(f"WARNING: {shape} ({table.title}): modelaccel {check['status']}: {check['detail']}")


def _check_modelaccel(q, k, v, causal, dtype):
    """Run modelaccel once and compare it with SDPA; returns the row's "check" dict."""
    out, reason = _run_capturing(*_provider_call("modelaccel", q, k, v, causal))
    if out is None:
        return {"status": "error", "reference": None, "max_abs_err": None, "rel_err": None, "detail": reason}
    ref, ref_name = _reference_output(q, k, v, causal)
    if ref is None:
        return {"status": "unchecked", "reference": None, "max_abs_err": None, "rel_err": None, "detail": ref_name}
    cmp = compare_outputs(out, ref, dtype)
    return {"status": "ok" if cmp["ok"] else "mismatch", "reference": ref_name,
            "max_abs_err": cmp["max_abs_err"], "rel_err": cmp["rel_err"], "detail": None}


def run_row(table, shape, providers, log=print):
    """Check and time one shape on the current CUDA device.

    Inputs are fresh `torch.randn` tensors, q [BATCH, N_CTX_Q, HQ, headdim] and k, v
    [BATCH, N_CTX_K, HK, headdim] in the table's dtype. modelaccel is timed only if its
    output matched SDPA (a mismatch is recorded and warned about, never timed).
    Returns a JSON-ready dict: shape, flops, check, ms/tflops per provider (None where a
    provider failed or was skipped) and the reason for each None.
    """
    from triton.testing import do_bench

    batch, hq, hk, sq, sk = shape
    if table.causal and sq != sk:
        raise ValueError(f"causal rows must be square (SDPA's causal mask is top-left aligned): {shape}")
    dtype = DTYPES[table.dtype]
    torch.manual_seed(0)
    q = torch.randn(batch, sq, hq, table.headdim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, sk, hk, table.headdim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, sk, hk, table.headdim, device=DEVICE, dtype=dtype)

    flops = attention_flops(batch, hq, sq, sk, table.headdim, table.causal)
    row = {"batch": batch, "nheads_q": hq, "nheads_k": hk, "seqlen_q": sq, "seqlen_k": sk, "flops": flops,
           "check": None, "ms": {}, "tflops": {}, "errors": {}}
    if "modelaccel" in providers:
        row["check"] = _check_modelaccel(q, k, v, table.causal, table.dtype)
        _log_check(row["check"], "output", shape, table, log)

    for provider in providers:
        ms, reason = None, None
        if provider == "modelaccel" and row["check"]["status"] in ("mismatch", "error"):
            check = row["check"]
            reason = (f"not timed: output differs from SDPA {check['reference']} (max abs err "
                      f"{check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e})" if check["status"] == "mismatch"
                      else f"not timed: {check['detail']}")
        else:
            fn, ctx = _provider_call(provider, q, k, v, table.causal)
            ms, reason = _run_capturing(lambda: do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"), ctx,
                                        record_warnings=False)
        row["ms"][provider] = ms
        row["tflops"][provider] = tflops(flops, ms)
        if reason is not None:
            row["errors"][provider] = reason

    del q, k, v
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------
# Backward pass


def compare_grads(grads, ref_grads, rtol=BWD_CHECK_RTOL):
    """Relative (Frobenius) errors of (dq, dk, dv) against reference gradients.

    grads, ref_grads: 3-tuples of tensors of matching shapes. Returns {"rel_err": {"dq":
    ..., "dk": ..., "dv": ...}, "ok": every error finite and below rtol}.
    """
    errs = {}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        r = r.float()
        errs[name] = ((g.float() - r).norm() / r.norm().clamp_min(1e-30)).item()
    ok = all(math.isfinite(e) and e < rtol for e in errs.values())
    return {"rel_err": errs, "ok": ok}


def _forward_with_graph(provider, q, k, v, causal):
    """Run provider's forward on leaf tensors that require grad; output in [b, s, h, d].

    The SDPA backend is pinned only for the forward: the backward kernel is whichever one
    matches the forward that recorded the graph.
    """
    fn, ctx = _provider_call(provider, q, k, v, causal)
    out, reason = _run_capturing(fn, ctx)
    if out is not None and provider != "modelaccel":
        out = out.transpose(1, 2)  # SDPA's [b, h, s, d] -> [b, s, h, d], a view
    return out, reason


def _reference_grads(q, k, v, dout, causal):
    """dq, dk, dv from SDPA (flash, else cuDNN) with K/V heads repeated for GQA; the repeat
    is differentiable, so dk/dv come back summed over each group as GQA's are."""
    from torch.nn.attention import SDPBackend

    group = q.shape[2] // k.shape[2]
    reasons = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        k_full, v_full = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        out, reason = _run_capturing(*_sdpa_call(backend, q, k_full, v_full, causal))
        if out is None:
            reasons.append(f"{name}: {reason}")
            continue
        grads = torch.autograd.grad(out.transpose(1, 2), (q, k, v), dout)
        return grads, name
    return None, "; ".join(reasons)


def _check_modelaccel_bwd(q, k, v, dout, causal):
    """Compare modelaccel's dq, dk, dv with SDPA's; returns the row's "check" dict.

    "max_abs_err" holds the largest of the three relative errors (what the report prints);
    "rel_err" holds all three.
    """
    out, reason = _forward_with_graph("modelaccel", q, k, v, causal)
    grads = None
    if out is not None:
        try:
            grads = torch.autograd.grad(out, (q, k, v), dout)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            reason = str(e).strip().splitlines()[0]
    if grads is None:
        return {"status": "error", "reference": None, "max_abs_err": None, "rel_err": None, "detail": reason}
    ref, ref_name = _reference_grads(q, k, v, dout, causal)
    if ref is None:
        return {"status": "unchecked", "reference": None, "max_abs_err": None, "rel_err": None, "detail": ref_name}
    cmp = compare_grads(grads, ref)
    return {"status": "ok" if cmp["ok"] else "mismatch", "reference": ref_name,
            "max_abs_err": max(cmp["rel_err"].values()), "rel_err": cmp["rel_err"], "detail": None}


def run_bwd_row(table, shape, providers, log=print):
    """Check and time the backward pass of one shape on the current CUDA device.

    q [BATCH, N_CTX_Q, HQ, headdim] and k, v [BATCH, N_CTX_K, HK, headdim] are fresh
    `torch.randn` leaves that require grad, dout a fresh `torch.randn` like the output. Each
    provider runs its forward once; `torch.autograd.grad(out, (q, k, v), dout,
    retain_graph=True)` is timed. modelaccel is timed only if its gradients matched SDPA's.
    Returns a row dict like `run_row`'s, flops being the backward's (2.5x the forward's).
    """
    from triton.testing import do_bench

    batch, hq, hk, sq, sk = shape
    if table.causal and sq != sk:
        raise ValueError(f"causal rows must be square (SDPA's causal mask is top-left aligned): {shape}")
    dtype = DTYPES[table.dtype]
    torch.manual_seed(0)
    q = torch.randn(batch, sq, hq, table.headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, sk, hk, table.headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, sk, hk, table.headdim, device=DEVICE, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, sq, hq, table.headdim, device=DEVICE, dtype=dtype)

    flops = int(BWD_FLOPS_FACTOR * attention_flops(batch, hq, sq, sk, table.headdim, table.causal))
    row = {"batch": batch, "nheads_q": hq, "nheads_k": hk, "seqlen_q": sq, "seqlen_k": sk, "flops": flops,
           "check": None, "ms": {}, "tflops": {}, "errors": {}}
    if "modelaccel" in providers:
        row["check"] = check = _check_modelaccel_bwd(q, k, v, dout, table.causal)
        if check["status"] == "mismatch":
            log(f"WARNING: modelaccel gradients differ from SDPA {check['reference']} for {shape} "
                f"({table.title}): relative errors {check['rel_err']}; not timing it")
        elif check["status"] != "ok":
            log(f"WARNING: {shape} ({table.title}): modelaccel {check['status']}: {check['detail']}")

    for provider in providers:
        ms, reason = None, None
        check = row["check"]
        if provider == "modelaccel" and check["status"] in ("mismatch", "error"):
            reason = (f"not timed: gradients differ from SDPA {check['reference']} (relative errors "
                      f"{check['rel_err']})" if check["status"] == "mismatch" else f"not timed: {check['detail']}")
        else:
            out, reason = _forward_with_graph(provider, q, k, v, table.causal)
            if out is not None:
                ms, reason = _run_capturing(
                    lambda: do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                     warmup=WARMUP_MS, rep=REP_MS, return_mode="median"),
                    contextlib.nullcontext(), record_warnings=False)
            del out
        row["ms"][provider] = ms
        row["tflops"][provider] = tflops(flops, ms)
        if reason is not None:
            row["errors"][provider] = reason

    del q, k, v, dout
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------
# Variable-length batches


def varlen_seqlens(batch, max_len, seed=VARLEN_SEED):
    """Sequence lengths of one varlen row: uniform in [max_len // 4, max_len], one at max_len.

    Drawn from a CPU generator seeded with `seed`, so every run and every machine gets the
    same batch. Returns a list of `batch` python ints.
    """
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(max_len // 4, 1), max_len + 1, (batch,), generator=gen)
    lens[torch.randint(0, batch, (1,), generator=gen)] = max_len
    return lens.tolist()


def varlen_flops(seqlens, nheads_q, headdim, causal):
    """Useful FLOPs of a varlen batch: each sequence's own attention, nothing for padding."""
    return sum(attention_flops(1, nheads_q, n, n, headdim, causal) for n in seqlens)


def _varlen_reference(q, k, v, seqlens, causal):
    """Packed [total, hq, d] output of SDPA flash run on each sequence alone (no padding, no
    mask needed), K/V heads repeated for GQA; (None, reason) if SDPA refused."""
    from torch.nn.attention import SDPBackend

    k_full, v_full = _repeat_kv_heads(q, k, v)
    outs, start = [], 0
    for n in seqlens:
        sl = slice(start, start + n)
        qi, ki, vi = q[sl][None], k_full[sl][None], v_full[sl][None]
        out, reason = _run_capturing(*_sdpa_call(SDPBackend.FLASH_ATTENTION, qi, ki, vi, causal))
        if out is None:
            return None, f"flash: {reason}"
        outs.append(out.transpose(1, 2)[0])
        start += n
    return torch.cat(outs), "flash per sequence"


def _padded_sdpa_call(backend, q_pad, k_pad, v_pad):
    # Causal only. No padding mask is passed, because an explicit attn_mask would rule out
    # the flash and cuDNN backends. It is not needed: sequences are right-padded, so every
    # pad key sits after the last real query of its sequence, and the causal mask (top-left
    # aligned, equal to bottom-right on the padded square) already hides it from every real
    # query. The pad rows compute garbage that is never read. The peers still do the padded
    # square's work, which is the cost of not having a varlen kernel.
    return _sdpa_call(backend, q_pad, k_pad, v_pad, causal=True)


def _repeat_kv_heads(q, k, v):
    """k, v with each KV head repeated over its query-head group (packed [tokens, heads, d]):
    for peers that refuse GQA. Same FLOPs; the peer reads group-times more K/V bytes."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _nested_sdpa_call(backend, q, k, v, offsets):
    """SDPA on nested jagged tensors [b, heads, j, d]: a true varlen call, no padding; SDPA
    does not take is_causal on nested tensors, so this is for non-causal rows. Nested SDPA
    refuses GQA (torch 2.11: "broadcastable num heads"), so K/V heads are repeated first,
    outside the timing."""
    from torch.nn.attention import sdpa_kernel

    k, v = _repeat_kv_heads(q, k, v)
    qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
    return (lambda: F.scaled_dot_product_attention(qn, kn, vn)), sdpa_kernel(backend)


def _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal):
    """torch.nn.attention.varlen.varlen_attn on the packed tokens: PyTorch's own FA2 varlen
    path. Its causal switch moved between releases (is_causal, later window_size=(-1, 0)),
    so the keyword is picked from the signature."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn  # ImportError on torch < 2.9

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if causal:
        kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # torch 2.11's varlen_attn has no GQA switch
            k, v = _repeat_kv_heads(q, k, v)
    return (lambda: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)), \
        contextlib.nullcontext()


def _varlen_provider_call(provider, q, k, v, cu_seqlens, max_seqlen, padded, causal):
    from torch.nn.attention import SDPBackend

    if provider == "flash_varlen":
        return _torch_varlen_call(q, k, v, cu_seqlens, max_seqlen, causal)
    if provider == "modelaccel":
        import modelaccel

        return ((lambda: modelaccel.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                          causal=causal)), contextlib.nullcontext())
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    if causal:
        return _padded_sdpa_call(backend, *padded)
    return _nested_sdpa_call(backend, q, k, v, cu_seqlens.long())


def run_varlen_row(table, shape, providers, log=print):
    """Check and time one varlen batch (BATCH, HQ, HK, MAX_LEN) on the current CUDA device.

    Lengths come from `varlen_seqlens`; q [total, HQ, headdim] and k, v [total, HK, headdim]
    are fresh `torch.randn` packed tensors. modelaccel's output is checked against SDPA flash
    run on each sequence alone; for causal tables the padded SDPA flash output's real rows
    are checked the same way ("peer_check"), which confirms that leaving out the padding
    mask is exact. Returns a row dict with batch, nheads_q, nheads_k, max_seqlen, seqlens,
    total_tokens, flops (useful FLOPs of the real tokens), check, peer_check, ms, tflops,
    tokens_per_s and errors per provider.
    """
    from triton.testing import do_bench

    from modelaccel.attention.padding import pad_input

    batch, hq, hk, max_len = shape
    dtype = DTYPES[table.dtype]
    seqlens = varlen_seqlens(batch, max_len)
    total = sum(seqlens)
    torch.manual_seed(0)
    q = torch.randn(total, hq, table.headdim, device=DEVICE, dtype=dtype)
    k = torch.randn(total, hk, table.headdim, device=DEVICE, dtype=dtype)
    v = torch.randn(total, hk, table.headdim, device=DEVICE, dtype=dtype)
    lens = torch.tensor(seqlens, device=DEVICE, dtype=torch.int32)
    cu_seqlens = torch.zeros(batch + 1, device=DEVICE, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lens, 0)
    # Right padding: token t of sequence b sits at flat position b * max_len + t.
    pos = torch.arange(max_len, device=DEVICE)
    indices = (torch.arange(batch, device=DEVICE)[:, None] * max_len + pos[None, :])[pos[None, :] < lens[:, None]]
    padded = tuple(pad_input(t, indices, batch, max_len) for t in (q, k, v)) if table.causal else None

    flops = varlen_flops(seqlens, hq, table.headdim, table.causal)
    row = {"batch": batch, "nheads_q": hq, "nheads_k": hk, "max_seqlen": max_len, "seqlens": seqlens,
           "total_tokens": total, "flops": flops, "check": None, "peer_check": None,
           "ms": {}, "tflops": {}, "tokens_per_s": {}, "errors": {}}
    ref, ref_name = _varlen_reference(q, k, v, seqlens, table.causal)
    if "modelaccel" in providers:
        out, reason = _run_capturing(*_varlen_provider_call("modelaccel", q, k, v, cu_seqlens, max_len, padded,
                                                            table.causal))
        if out is None:
            check = {"status": "error", "reference": None, "max_abs_err": None, "rel_err": None, "detail": reason}
        elif ref is None:
            check = {"status": "unchecked", "reference": None, "max_abs_err": None, "rel_err": None,
                     "detail": ref_name}
        else:
            cmp = compare_outputs(out, ref, table.dtype)
            check = {"status": "ok" if cmp["ok"] else "mismatch", "reference": ref_name,
                     "max_abs_err": cmp["max_abs_err"], "rel_err": cmp["rel_err"], "detail": None}
        row["check"] = check
        _log_check(check, "varlen output", shape, table, log)
    if table.causal and ref is not None and "flash" in providers:
        out, reason = _run_capturing(*_varlen_provider_call("flash", q, k, v, cu_seqlens, max_len, padded, True))
        if out is not None:
            real_rows = out.transpose(1, 2).reshape(batch * max_len, hq, table.headdim)[indices]
            row["peer_check"] = compare_outputs(real_rows, ref, table.dtype)
            if not row["peer_check"]["ok"]:
                log(f"WARNING: padded SDPA flash differs from per-sequence SDPA flash on real tokens for {shape}: "
                    f"{row['peer_check']}")

    for provider in providers:
        ms, reason = None, None
        check = row["check"]
        if provider == "modelaccel" and check["status"] in ("mismatch", "error"):
            reason = (f"not timed: output differs from SDPA {check['reference']} (max abs err "
                      f"{check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e})" if check["status"] == "mismatch"
                      else f"not timed: {check['detail']}")
        else:
            try:
                fn, ctx = _varlen_provider_call(provider, q, k, v, cu_seqlens, max_len, padded, table.causal)
            except Exception as e:  # noqa: BLE001 - e.g. no varlen_attn in an older torch; see _run_peer
                if provider == "modelaccel":
                    raise
                fn, ctx = None, f"{type(e).__name__}: {e}"
            if fn is None:
                reason = ctx
            else:
                run = _run_capturing if provider == "modelaccel" else _run_peer
                ms, reason = run(lambda: do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"), ctx,
                                 record_warnings=False)
        row["ms"][provider] = ms
        row["tflops"][provider] = tflops(flops, ms)
        row["tokens_per_s"][provider] = None if ms is None else total / (ms * 1e-3)
        if reason is not None:
            row["errors"][provider] = reason

    del q, k, v, padded
    torch.cuda.empty_cache()
    return row


ROW_RUNNERS = {"fwd": run_row, "bwd": run_bwd_row, "varlen": run_varlen_row}


def geomean_ratios(rows, provider, baseline):
    """Geometric mean of tflops[provider] / tflops[baseline] over rows that have both.

    rows: row dicts as `run_row` returns. Returns (geomean or None, number of rows used).
    """
    logs = [math.log(r["tflops"][provider] / r["tflops"][baseline]) for r in rows
            if r["tflops"].get(provider) and r["tflops"].get(baseline)]
    return (math.exp(sum(logs) / len(logs)) if logs else None), len(logs)


def _git_commit():
    """(commit, dirty) of the checkout modelaccel is imported from.

    MODELACCEL_COMMIT, when set, names the commit instead (a copy of the tree shipped to a
    remote GPU box may carry a stale .git); dirty is then unknown (None). (None, None) if neither is available.
    """
    if os.environ.get("MODELACCEL_COMMIT"):  # the caller knows better than a copied .git
        return os.environ["MODELACCEL_COMMIT"], None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MODELACCEL_COMMIT"), None
    return commit, bool(status.strip())


def collect_metadata():
    """Software and device facts recorded with every result (CUDA device 0)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    commit, dirty = _git_commit()
    return {
        "device_name": props.name,
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "modelaccel_commit": commit,
        "modelaccel_dirty": dirty,
        "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"},
    }


def run_benchmark(tables, providers=PROVIDERS, log=print):
    """Run every table on CUDA device 0 and return {"metadata": ..., "tables": [...]}.

    Each table entry holds its setting, its rows (see `run_row`) and the geometric means of
    modelaccel's throughput over each SDPA provider's. Progress goes to `log`, one line per
    row, so a long run shows where it is.
    """
    from modelaccel.bench.report import format_header, format_row

    modes = {table.mode for table in tables}
    if len(modes) != 1:
        raise ValueError(f"one run_benchmark call runs tables of one mode, got {sorted(modes)}")
    (mode,) = modes
    result = {"metadata": collect_metadata(), "mode": mode, "providers": list(providers), "tables": []}
    for table in tables:
        log(f"== {table.title}")
        log(format_header(providers, varlen=mode == "varlen"))
        rows = []
        for shape in table.shapes:
            row = ROW_RUNNERS[mode](table, shape, providers, log=log)
            log(format_row(row, providers))
            rows.append(row)
        geomean = {}
        if "modelaccel" in providers:
            for baseline in providers:
                if baseline != "modelaccel":
                    value, n = geomean_ratios(rows, "modelaccel", baseline)
                    geomean[f"vs_{baseline}"] = {"geomean": value, "rows": n}
        result["tables"].append({"title": table.title, "mode": table.mode, "dtype": table.dtype,
                                 "headdim": table.headdim, "causal": table.causal, "rows": rows,
                                 "geomean": geomean})
    from modelaccel.attention.launch import launch_choices

    # Which launch (tiles, warps, stages, TMA, and for the backward the dQ strategy) each
    # problem class got, so a row's number can be read against it.
    result["launch_choices"] = launch_choices()
    return result

"""Forward attention benchmark: modelaccel against PyTorch SDPA's flash and cuDNN backends.

Every row builds fresh random inputs, checks modelaccel's output against SDPA's flash
backend, then times each provider on the same tensors with `triton.testing.do_bench`
(median of the timed runs). Throughput is reported in TFLOPS counting only the score and
output matmuls over the keys each query can see.

A row is one (BATCH, HQ, HK, N_CTX_Q, N_CTX_K) shape; a table is a list of rows sharing
dtype, head dim and causality. `run_benchmark` returns plain dicts and lists so the
results serialise to JSON as they are (see `modelaccel.bench.report`).
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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

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

# Largest acceptable difference between modelaccel and SDPA flash. Both round P to the
# input dtype before the PV matmul and round the output once, so a correct kernel lands
# around 1e-3 (fp16) / 1e-2 (bf16) in max-abs and well under these in relative terms;
# masking or rescaling bugs show up as O(0.1) errors. The relative test matters for long
# rows, whose outputs are small enough that an absolute bound alone would be loose.
CHECK_ATOL = {"fp16": 1e-2, "bf16": 5e-2}
CHECK_RTOL = {"fp16": 5e-3, "bf16": 2.5e-2}


@dataclass(frozen=True)
class Table:
    """One benchmark table: `shapes` are (BATCH, HQ, HK, N_CTX_Q, N_CTX_K) tuples."""

    dtype: str
    headdim: int
    causal: bool
    shapes: tuple

    @property
    def title(self):
        return f"{self.dtype}, headdim {self.headdim}, {'causal' if self.causal else 'non-causal'}"


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


def make_tables(suite="default", dtype=None, causal=False, headdim=None):
    """Tables to run for a suite, optionally narrowed to one dtype/causal/headdim setting.

    With no override the suite's own tables are returned. With any of `dtype` ("fp16" or
    "bf16", default fp16), `causal` or `headdim` (default 128) given, a single table with
    that setting over the suite's shapes (its square + GQA shapes when causal).
    """
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


def _provider_call(provider, q, k, v, causal):
    from torch.nn.attention import SDPBackend

    if provider == "modelaccel":
        from modelaccel import flash_attn_func

        return (lambda: flash_attn_func(q, k, v, causal=causal)), contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[provider]
    return _sdpa_call(backend, q, k, v, causal)


def _run_capturing(fn, ctx):
    """Run fn() inside ctx; return (result, None) or (None, reason) if a kernel refused the call.

    SDPA explains why a backend cannot take a shape only in warnings, ahead of a generic
    "No available kernel" error, so the warnings are folded into the reason.
    """
    with warnings.catch_warnings(record=True) as caught, ctx:
        warnings.simplefilter("always")
        try:
            return fn(), None
        except (RuntimeError, ValueError, NotImplementedError) as e:  # OOM is a RuntimeError
            reasons = [str(e).strip().splitlines()[0]] + [str(w.message).strip().splitlines()[0] for w in caught]
            return None, "; ".join(reasons)


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
    q = torch.randn(batch, sq, hq, table.headdim, device="cuda", dtype=dtype)
    k = torch.randn(batch, sk, hk, table.headdim, device="cuda", dtype=dtype)
    v = torch.randn(batch, sk, hk, table.headdim, device="cuda", dtype=dtype)

    flops = attention_flops(batch, hq, sq, sk, table.headdim, table.causal)
    row = {"batch": batch, "nheads_q": hq, "nheads_k": hk, "seqlen_q": sq, "seqlen_k": sk, "flops": flops,
           "check": None, "ms": {}, "tflops": {}, "errors": {}}
    if "modelaccel" in providers:
        row["check"] = _check_modelaccel(q, k, v, table.causal, table.dtype)
        check = row["check"]
        if check["status"] == "mismatch":
            log(f"WARNING: modelaccel output differs from SDPA {check['reference']} for {shape} "
                f"({table.title}): max abs err {check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e}; "
                "not timing it")
        elif check["status"] != "ok":
            log(f"WARNING: {shape} ({table.title}): modelaccel {check['status']}: {check['detail']}")

    for provider in providers:
        ms, reason = None, None
        if provider == "modelaccel" and row["check"]["status"] in ("mismatch", "error"):
            check = row["check"]
            reason = (f"not timed: output differs from SDPA {check['reference']} (max abs err "
                      f"{check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e})" if check["status"] == "mismatch"
                      else f"not timed: {check['detail']}")
        else:
            fn, ctx = _provider_call(provider, q, k, v, table.causal)
            ms, reason = _run_capturing(lambda: do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"), ctx)
        row["ms"][provider] = ms
        row["tflops"][provider] = tflops(flops, ms)
        if reason is not None:
            row["errors"][provider] = reason

    del q, k, v
    torch.cuda.empty_cache()
    return row


def geomean_ratios(rows, provider, baseline):
    """Geometric mean of tflops[provider] / tflops[baseline] over rows that have both.

    rows: row dicts as `run_row` returns. Returns (geomean or None, number of rows used).
    """
    logs = [math.log(r["tflops"][provider] / r["tflops"][baseline]) for r in rows
            if r["tflops"].get(provider) and r["tflops"].get(baseline)]
    return (math.exp(sum(logs) / len(logs)) if logs else None), len(logs)


def _git_commit():
    """(commit, dirty) of the checkout modelaccel is imported from.

    A copy of the tree without .git (as shipped to a remote GPU box) can name its commit in
    MODELACCEL_COMMIT; dirty is then unknown (None). (None, None) if neither is available.
    """
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

    result = {"metadata": collect_metadata(), "providers": list(providers), "tables": []}
    for table in tables:
        log(f"== {table.title}")
        log(format_header(providers))
        rows = []
        for shape in table.shapes:
            row = run_row(table, shape, providers, log=log)
            log(format_row(row, providers))
            rows.append(row)
        geomean = {}
        if "modelaccel" in providers:
            for baseline in providers:
                if baseline != "modelaccel":
                    value, n = geomean_ratios(rows, "modelaccel", baseline)
                    geomean[f"vs_{baseline}"] = {"geomean": value, "rows": n}
        result["tables"].append({"title": table.title, "dtype": table.dtype, "headdim": table.headdim,
                                 "causal": table.causal, "rows": rows, "geomean": geomean})
    return result

"""Decoding attention benchmark: `modelaccel.flash_attn_with_kvcache` against SDPA.

One query token per sequence (seqlen_q = 1) attends to a full KV cache: bf16, 32 query heads
over 8 KV heads, head dim 128. Decoding is bound by reading K and V, so the figure is

    K+V bytes / time,  K+V bytes = batch x cache_len x HK x D x 2 bytes x 2 (K and V)

against the GPU's read bandwidth measured in the same run (a large `x.sum()`). Reads of q,
the output and the block table are left out: they are under 0.1% of K+V here.

Each row is one (batch, cache_len) shape. modelaccel runs on a contiguous cache
[batch, cache_len, HK, D] and on paged caches (`PAGE_SIZES`) holding the same logical
content in pages placed by a random permutation (`make_block_table`). The peers, SDPA's
FLASH_ATTENTION and CUDNN_ATTENTION backends with enable_gqa, run on the same K/V laid out
as [batch, HK, cache_len, D]. Every provider is timed three ways: plain launches (the call
itself, so host time shows where it exceeds GPU time), replay of a CUDA graph holding the
one call, and replay of a CUDA graph holding `graph_layers` calls, each over its own copy of
the cache, as a model's decoding step is one graph of every layer's call (time per call;
only GPU time). The targets are read on the layered graph ("layers"): a one-call graph also
pays the replay's own start, which a step pays once for all its layers. modelaccel's
outputs are checked against a float32 reference before anything is timed; a variant that
mismatches is not timed.

`run_benchmark` returns plain dicts and lists that serialise to JSON as they are;
`write_results` writes JSON, markdown and a PNG. Run as a module (`python -m
modelaccel.bench.decode_attention`, in a process started with TRITON_INTERPRET=1) it is
the CPU self-check of the decode kernel in the Triton interpreter.
"""

import contextlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from ..attention.launch import read_flush_ms
from ..testing import to_paged  # noqa: F401 - part of this module's paging helpers
from . import report

# The shape family: Llama-3-8B-like GQA (32 query heads over 8 KV heads), head dim 128.
NHEADS_Q = 32
NHEADS_K = 8
HEADDIM = 128
DTYPE = "bf16"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (batch, cache_len): one long sequence up to 128K, then growing batches of shorter ones.
SHAPES = ((1, 4096), (1, 32768), (1, 131072), (8, 4096), (32, 8192), (64, 2048), (128, 1024))
# Quick: the row of the cuDNN target (16 MiB of K+V, launch-bound) and one of the
# bandwidth target (128 MiB).
QUICK_SHAPES = ((1, 4096), (8, 4096))
SUITES = {"default": SHAPES, "quick": QUICK_SHAPES}
PAGE_SIZES = (16, 256)

PEERS = ("flash", "cudnn")
TIMINGS = ("plain", "graph", "layers")
# The timing the targets are read on (see the module docstring).
TARGET_TIMING = "layers"

# Where rows run: CUDA for real numbers; the tests point it at the CPU with stub timers.
DEVICE = "cuda"

# Timing (milliseconds of GPU time, not iterations). bench_ms reads a 256 MB buffer before
# every timed call, so K/V come from HBM, not from the 50 MB L2 (which would otherwise hold
# all 16 MiB of the (1, 4096) row).
WARMUP_MS = 25
REP_MS = 100
# Calls on a side stream before capture: the launch tuner and Triton's compilation must
# happen there, never inside the capture.
GRAPH_WARMUP_CALLS = 3
# The layered graph (time_graph_layers): a model's decoding step is one graph of every
# layer's call, each over its own cache, so the replay's own start (~2.9 us for an empty
# kernel on the H200, results/tuning/decode_overhead_probe_h200_438b96a.log) is paid once a
# step, not once a call. Enough layers that their caches together are ~10x the L2, so no
# layer finds its K/V there: at least LAYER_GRAPH_BYTES of K+V, MIN_LAYERS to MAX_LAYERS.
LAYER_GRAPH_BYTES = 512 * 2**20
MIN_LAYERS = 4
MAX_LAYERS = 32
# Read-bandwidth probe: a sum over this many GiB of bf16, far more than L2.
READ_BW_GIB = 4
SEED = 0

# Targets from issue 4.
TARGET_READ_FRACTION = 0.80  # of measured read bandwidth, under graph replay (TARGET_TIMING) ...
TARGET_MIN_KV_BYTES = 64 * 2**20  # ... on rows with at least 64 MiB of K+V
TARGET_CUDNN_SHAPE = (1, 4096)  # modelaccel >= 2x cuDNN here, under graph replay
TARGET_CUDNN_RATIO = 2.0
TARGET_PAGED_SLOWDOWN = 1.10  # paged time <= 1.1x contiguous time, under graph replay
TARGETS = ("read_bw", "vs_cudnn", "paged")
TARGET_TITLES = {
    "read_bw": f">= {TARGET_READ_FRACTION:.0%} of measured read bandwidth (contiguous, layered graph replay, "
               f"rows with K+V >= {TARGET_MIN_KV_BYTES // 2**20} MiB)",
    "vs_cudnn": f">= {TARGET_CUDNN_RATIO:g}x cuDNN at (batch, cache_len) = {TARGET_CUDNN_SHAPE} (contiguous, "
                "layered graph replay)",
    "paged": f"paged time <= {TARGET_PAGED_SLOWDOWN:g}x contiguous, every page size (layered graph replay)",
}


def layout_names(page_sizes=PAGE_SIZES):
    """modelaccel's variants: "modelaccel" (contiguous cache) and "modelaccel_paged<N>"."""
    return ["modelaccel"] + [f"modelaccel_paged{p}" for p in page_sizes]


def variant_names(page_sizes=PAGE_SIZES):
    """Every timed variant of a row: modelaccel's layouts, then the SDPA peers."""
    return layout_names(page_sizes) + list(PEERS)


def kv_bytes(batch, cache_len, nheads_k=NHEADS_K, headdim=HEADDIM, bytes_per_elem=2):
    """Bytes of K and V one decoding step reads: batch x cache_len x nheads_k x headdim x
    bytes_per_elem (2 for bf16/fp16) x 2 tensors. A paged cache reads the same bytes: the
    benchmark's cache lengths are whole numbers of pages."""
    return batch * cache_len * nheads_k * headdim * bytes_per_elem * 2


def graph_layers(nbytes):
    """Layers of the layered graph for a step reading `nbytes` of K+V per layer."""
    return min(MAX_LAYERS, max(MIN_LAYERS, -(-LAYER_GRAPH_BYTES // nbytes)))


def tbps(nbytes, ms):
    """Throughput in TB/s (10^12 bytes per second) of `nbytes` in `ms` ms; None if ms is None."""
    return None if ms is None else nbytes / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------
# Inputs: contiguous and paged caches with the same logical content


def make_inputs(batch, cache_len, nheads_q=NHEADS_Q, nheads_k=NHEADS_K, headdim=HEADDIM, dtype=DTYPE,
                device=None, seed=SEED):
    """Random decoding inputs: q [batch, 1, nheads_q, headdim], k_cache, v_cache
    [batch, cache_len, nheads_k, headdim] in `dtype` ("bf16"/"fp16"), and cache_seqlens int32
    [batch] all equal to cache_len. The caches are randn, never zeros: a kernel that skipped
    loads or read the wrong page would still produce plausible-looking zeros otherwise."""
    device = device or DEVICE
    torch.manual_seed(seed)
    dt = DTYPES[dtype]
    q = torch.randn(batch, 1, nheads_q, headdim, device=device, dtype=dt)
    k_cache = torch.randn(batch, cache_len, nheads_k, headdim, device=device, dtype=dt)
    v_cache = torch.randn(batch, cache_len, nheads_k, headdim, device=device, dtype=dt)
    cache_seqlens = torch.full((batch,), cache_len, device=device, dtype=torch.int32)
    return q, k_cache, v_cache, cache_seqlens


def make_block_table(batch, blocks_per_seq, seed=SEED, device="cpu"):
    """Block table int32 [batch, blocks_per_seq]: a random permutation of the physical pages
    0 .. batch * blocks_per_seq - 1, so consecutive logical pages of a sequence land in
    scattered physical pages (as they do in a serving cache after some churn) and every
    logical page has its own physical page. Drawn from a seeded CPU generator: the same
    table on every run and machine."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(batch * blocks_per_seq, generator=gen)
    return perm.view(batch, blocks_per_seq).to(device=device, dtype=torch.int32)


def paged_to_contiguous(pages, block_table, cache_len):
    """Inverse of `to_paged`: gather pages [num_blocks, page_size, nheads_k, headdim] through
    block_table [batch, blocks_per_seq] back to [batch, cache_len, nheads_k, headdim]."""
    batch, blocks_per_seq = block_table.shape
    _, page_size, nheads_k, headdim = pages.shape
    gathered = pages[block_table.long().to(pages.device)]  # [batch, blocks_per_seq, page, hk, d]
    return gathered.reshape(batch, blocks_per_seq * page_size, nheads_k, headdim)[:, :cache_len]


def build_paged_cache(k_cache, v_cache, page_size, seed=SEED):
    """(k_pages, v_pages, block_table) holding the same logical K/V as the contiguous caches
    [batch, cache_len, nheads_k, headdim]; one block table for K and V, on the caches' device."""
    batch, cache_len = k_cache.shape[:2]
    block_table = make_block_table(batch, -(-cache_len // page_size), seed=seed + page_size, device=k_cache.device)
    return to_paged(k_cache, block_table, page_size), to_paged(v_cache, block_table, page_size), block_table


def decode_reference(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None):
    """float32 attention of q [batch, seqlen_q, nheads_q, headdim] over the first
    cache_seqlens[b] keys of k_cache/v_cache [batch, cache_len, nheads_k, headdim] (no mask
    within them: for seqlen_q = 1 that equals flash-attn's bottom-right causal mask).
    Query head h reads KV head h // (nheads_q // nheads_k), flash-attn's GQA mapping.
    Returns float32 [batch, seqlen_q, nheads_q, headdim]; a sequence of length 0 gives zeros.

    One sequence at a time, so the float32 copy of K/V stays one sequence's worth (512 MiB
    for the 128K row) instead of the whole batch's.
    """
    batch, seqlen_q, nheads_q, headdim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads_q // nheads_k
    scale = headdim ** -0.5 if softmax_scale is None else softmax_scale
    if cache_seqlens is None:
        lens = [k_cache.shape[1]] * batch
    elif isinstance(cache_seqlens, int):
        lens = [cache_seqlens] * batch
    else:
        lens = [int(n) for n in cache_seqlens.tolist()]
    out = torch.zeros(batch, seqlen_q, nheads_q, headdim, device=q.device, dtype=torch.float32)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        qb = q[b].float().view(seqlen_q, nheads_k, group, headdim)
        kb, vb = k_cache[b, :n].float(), v_cache[b, :n].float()
        p = (torch.einsum("shgd,nhd->hgsn", qb, kb) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hgsn,nhd->shgd", p, vb).reshape(seqlen_q, nheads_q, headdim)
    return out


# ---------------------------------------------------------------------------------------
# Calls and timing


def _kvcache_api():
    """modelaccel.flash_attn_with_kvcache, looked up at call time (the tests substitute it)."""
    from modelaccel import flash_attn_with_kvcache

    return flash_attn_with_kvcache


def _modelaccel_call(q, k, v, cache_seqlens, block_table=None):
    """Zero-argument call of flash_attn_with_kvcache; output [batch, 1, nheads_q, headdim].

    causal=True as decoding callers pass it; with one query token, bottom-right alignment
    lets it see the whole cache, so it equals the non-causal peers.
    """
    fn = _kvcache_api()
    return lambda: fn(q, k, v, cache_seqlens=cache_seqlens, block_table=block_table, causal=True)


def per_layer(call, *tensors):
    """make(i) for the timers: call(*tensors) for layer 0, call(*copies) for layer i > 0
    (tensors cloned, so each layer reads its own memory)."""
    return lambda i: call(*(tensors if i == 0 else [t.clone() for t in tensors]))


def _sdpa_call(backend, q, k_t, v_t):
    """Zero-argument SDPA call and a zero-argument factory of the context pinning `backend`
    (a fresh context per use: sdpa_kernel's can be entered only once); output [b, 1, hq, d].

    k_t/v_t are [batch, nheads_k, cache_len, headdim], the layout SDPA wants. No is_causal:
    SDPA aligns it top-left, which would leave the one query only the first key.
    """
    from torch.nn.attention import sdpa_kernel

    q_t = q.transpose(1, 2)  # [b, hq, 1, d]; a view, same storage as modelaccel's q
    return ((lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, enable_gqa=True).transpose(1, 2)),
            (lambda: sdpa_kernel(backend)))


def bench_ms(fn, warmup_ms=WARMUP_MS, rep_ms=REP_MS):
    """Median ms of fn() with L2 emptied by a read before every call (launch.read_flush_ms)."""
    return read_flush_ms(fn, warmup_ms, rep_ms, keep_buffer=True)


def time_plain(fn):
    """Median ms of fn() launched directly: GPU time, or host time where that is longer."""
    return bench_ms(fn)


def time_graph(fn):
    """Median ms of one replay of a CUDA graph holding one fn() call (time_graph_layers
    with one layer)."""
    return time_graph_layers(lambda i: fn, 1)


def time_graph_layers(make_fn, layers):
    """Median ms per call of one replay of a CUDA graph holding `layers` calls, the i-th
    being make_fn(i)() (each over its own inputs, as each layer of a model reads its own
    cache), divided by `layers`.

    Every call runs GRAPH_WARMUP_CALLS times on a side stream first (compilation, launch
    tuning, cuBLAS/cuDNN workspace set-up must not be captured), then once under capture.
    """
    fns = [make_fn(i) for i in range(layers)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP_CALLS):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn() for fn in fns]  # noqa: F841 - the outputs must stay allocated while it replays
    torch.cuda.synchronize()
    ms = bench_ms(graph.replay) / layers
    del graph, outs
    return ms


# timing -> timer(make, layers), make(i) giving the zero-argument call over layer i's inputs
# (looked up at call time: the tests substitute the timers).
TIMERS = {"plain": lambda make, layers: time_plain(make(0)), "graph": lambda make, layers: time_graph(make(0)),
          "layers": lambda make, layers: time_graph_layers(make, layers)}


def _first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def _raise(exc):
    raise exc


def _attempt(fn, ctx=None):
    """(fn() inside ctx(), None), or (None, reason) on any exception; ctx: None or a
    zero-argument factory of a context manager.

    Deliberately broad: a backend refusing a shape, a graph capture that hits a host sync,
    an API that has not landed yet all cost their number, never the run. SDPA gives its
    reasons for refusing a shape only as warnings, so those are folded into the reason.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with ctx() if ctx is not None else contextlib.nullcontext():
                return fn(), None
        except Exception as e:  # noqa: BLE001 - see above
            reasons = [f"{type(e).__name__}: {_first_line(e)}"] + [_first_line(w.message) for w in caught]
            return None, "; ".join(r for r in reasons if r)


def _check(out, ref, dtype):
    """The "check" dict of one output against the float32 reference."""
    from modelaccel.bench.attention import compare_outputs

    if tuple(out.shape) != tuple(ref.shape):
        return {"status": "mismatch", "max_abs_err": None, "rel_err": None,
                "detail": f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"}
    cmp = compare_outputs(out, ref, dtype)
    return {"status": "ok" if cmp["ok"] else "mismatch", "max_abs_err": cmp["max_abs_err"],
            "rel_err": cmp["rel_err"], "detail": None}


def run_row(batch, cache_len, nheads_q=NHEADS_Q, nheads_k=NHEADS_K, headdim=HEADDIM, dtype=DTYPE,
            page_sizes=PAGE_SIZES, log=print):
    """Check and time one (batch, cache_len) decoding shape on DEVICE.

    Inputs come from `make_inputs`; paged caches from `build_paged_cache`, one page size at
    a time (freed before the next). Every variant's output is checked against
    `decode_reference` first ("checks"); a modelaccel variant that mismatches or raises is
    not timed, a peer that mismatches is timed and its check recorded. Returns a JSON-ready
    dict: shape, kv_bytes, layers (of the layered graph), checks, ms and tbps per variant per
    timing (TIMINGS; None where there is no number) and errors[variant][timing] with the
    reason for each None.
    `annotate_row` adds the bandwidth fractions, cuDNN ratios and targets.
    """
    from torch.nn.attention import SDPBackend

    q, k_cache, v_cache, cache_seqlens = make_inputs(batch, cache_len, nheads_q, nheads_k, headdim, dtype)
    nbytes = kv_bytes(batch, cache_len, nheads_k, headdim, k_cache.element_size())
    variants = variant_names(page_sizes)
    layers = graph_layers(nbytes)
    row = {"batch": batch, "cache_len": cache_len, "nheads_q": nheads_q, "nheads_k": nheads_k, "headdim": headdim,
           "dtype": dtype, "kv_bytes": nbytes, "layers": layers, "checks": {},
           "ms": {v: dict.fromkeys(TIMINGS) for v in variants},
           "tbps": {v: dict.fromkeys(TIMINGS) for v in variants}, "errors": {}}
    ref = decode_reference(q, k_cache, v_cache, cache_seqlens)

    def measure(variant, make, ctx=None):
        """make(i): the zero-argument call over layer i's inputs (per_layer); make(0) is checked."""
        out, reason = _attempt(lambda: make(0)(), ctx)
        if out is None:
            row["checks"][variant] = {"status": "error", "max_abs_err": None, "rel_err": None, "detail": reason}
        else:
            row["checks"][variant] = _check(out, ref, dtype)
        del out
        check = row["checks"][variant]
        modelaccel = variant.startswith("modelaccel")
        if check["status"] != "ok":
            err = check["detail"] or f"max abs err {check['max_abs_err']:.3e}, rel err {check['rel_err']:.3e}"
            log(f"WARNING: ({batch}, {cache_len}) {variant}: {check['status']} against the float32 reference: {err}"
                + ("; not timing it" if modelaccel else ""))
        for timing in TIMINGS:
            if check["status"] == "error" or (modelaccel and check["status"] == "mismatch"):
                reason = f"not timed: {check['status']} ({check['detail'] or 'output differs from the reference'})"
                ms = None
            else:
                ms, reason = _attempt(lambda: TIMERS[timing](make, layers), ctx)
            row["ms"][variant][timing] = ms
            row["tbps"][variant][timing] = tbps(nbytes, ms)
            if reason is not None:
                row["errors"].setdefault(variant, {})[timing] = reason

    api_fn, api_reason = _attempt(lambda: _modelaccel_call(q, k_cache, v_cache, cache_seqlens))
    if api_fn is None:
        # No API to call (not landed, import error): every modelaccel variant gets the reason.
        for variant in layout_names(page_sizes):
            measure(variant, lambda i: lambda: _raise(ImportError(f"flash_attn_with_kvcache unavailable: {api_reason}")))
    else:
        measure("modelaccel", per_layer(lambda q, k, v: _modelaccel_call(q, k, v, cache_seqlens), q, k_cache, v_cache))
        for page_size in page_sizes:
            k_pages, v_pages, block_table = build_paged_cache(k_cache, v_cache, page_size)
            # Our own bookkeeping, not the kernel's: the pages must hold the same logical cache.
            if not torch.equal(paged_to_contiguous(k_pages, block_table, cache_len), k_cache):
                raise AssertionError(f"paged cache (page {page_size}) does not match the contiguous one")
            measure(f"modelaccel_paged{page_size}",
                    per_layer(lambda q, k, v: _modelaccel_call(q, k, v, cache_seqlens, block_table=block_table),
                              q, k_pages, v_pages))
            del k_pages, v_pages, block_table

    # SDPA takes [batch, nheads_k, cache_len, headdim]. The transposed copy is made once,
    # here, outside the timing: a serving stack built on SDPA would keep its cache in this
    # layout. This favours the peers slightly (their K/V rows are contiguous per head, and
    # they are spared the copy modelaccel's flash-attn layout would have cost them).
    k_t, v_t = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    for peer, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        measure(peer, per_layer(lambda q, k, v, backend=backend: _sdpa_call(backend, q, k, v)[0], q, k_t, v_t),
                _sdpa_call(backend, q, k_t, v_t)[1])
    del q, k_cache, v_cache, k_t, v_t, ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------
# Read bandwidth, targets, the whole run


def measure_read_bandwidth(gib=READ_BW_GIB):
    """The GPU's read bandwidth as this run sees it: median time of `x.sum()` over `gib` GiB
    of bf16 (random values), bytes / time. Returns {"bytes", "ms", "tbps"}."""
    x = torch.empty(gib * 2**30 // 2, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
    ms = time_plain(lambda: x.sum())
    nbytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "ms": ms, "tbps": tbps(nbytes, ms)}


def _target(applies, value, passed, detail):
    return {"applies": applies, "value": value, "pass": passed if applies else None, "detail": detail}


def evaluate_targets(row, read_bw_tbps):
    """The issue's three targets for one row (all on TARGET_TIMING's times):

    - "read_bw": rows with kv_bytes >= TARGET_MIN_KV_BYTES; modelaccel contiguous TB/s
      >= TARGET_READ_FRACTION of read_bw_tbps. (Paged layouts are held to the contiguous
      time by "paged", which keeps them within about 73% of the bandwidth.)
    - "vs_cudnn": the TARGET_CUDNN_SHAPE row; modelaccel TB/s >= TARGET_CUDNN_RATIO x cuDNN's.
    - "paged": every row; each page size's time <= TARGET_PAGED_SLOWDOWN x contiguous
      (value: the worst ratio).

    Each is {"applies", "value", "pass" (None when it does not apply), "detail"}. A target
    that applies but lacks a number fails: no number is not a pass.
    """
    tb, ms = row["tbps"], row["ms"]
    t = TARGET_TIMING
    mine = tb["modelaccel"][t]
    targets = {}

    applies = row["kv_bytes"] >= TARGET_MIN_KV_BYTES
    frac = None if mine is None or not read_bw_tbps else mine / read_bw_tbps
    targets["read_bw"] = _target(applies, frac, frac is not None and frac >= TARGET_READ_FRACTION,
                                 f"no modelaccel {t} time" if frac is None else f"{frac:.1%} of {read_bw_tbps:.2f} TB/s")

    applies = (row["batch"], row["cache_len"]) == TARGET_CUDNN_SHAPE
    theirs = tb["cudnn"][t]
    ratio = mine / theirs if mine and theirs else None
    targets["vs_cudnn"] = _target(applies, ratio, ratio is not None and ratio >= TARGET_CUDNN_RATIO,
                                  f"no modelaccel or cuDNN {t} time" if ratio is None else f"{ratio:.2f}x cuDNN")

    paged = [v for v in ms if v.startswith("modelaccel_paged")]
    contiguous = ms["modelaccel"][t]
    slowdowns = {v: ms[v][t] / contiguous for v in paged if contiguous and ms[v][t]}
    worst = max(slowdowns.values()) if len(slowdowns) == len(paged) and paged else None
    detail = (", ".join(f"{v.removeprefix('modelaccel_')} {s:.2f}x" for v, s in slowdowns.items())
              if worst is not None else f"missing contiguous or paged {t} time")
    targets["paged"] = _target(bool(paged), worst, worst is not None and worst <= TARGET_PAGED_SLOWDOWN, detail)
    return targets


def annotate_row(row, read_bw_tbps):
    """Add to a `run_row` dict, in place: fraction_of_read_bw[variant][timing] (TB/s over
    read_bw_tbps), vs_cudnn[variant][timing] (TB/s over cuDNN's in the same timing mode) and
    targets (`evaluate_targets`). Returns the row."""
    row["fraction_of_read_bw"] = {v: {t: (x / read_bw_tbps if x is not None and read_bw_tbps else None)
                                      for t, x in by_timing.items()} for v, by_timing in row["tbps"].items()}
    row["vs_cudnn"] = {}
    for v, by_timing in row["tbps"].items():
        if v == "cudnn":
            continue
        row["vs_cudnn"][v] = {t: (x / row["tbps"]["cudnn"][t] if x and row["tbps"]["cudnn"][t] else None)
                              for t, x in by_timing.items()}
    row["targets"] = evaluate_targets(row, read_bw_tbps)
    return row


def summarize_targets(rows):
    """Per target: {"pass": n, "fail": n, "rows": n applicable, "ok": all applicable passed
    (None if none applied)}."""
    summary = {}
    for name in TARGETS:
        results = [r["targets"][name]["pass"] for r in rows if r["targets"][name]["applies"]]
        summary[name] = {"pass": sum(1 for p in results if p), "fail": sum(1 for p in results if not p),
                         "rows": len(results), "ok": all(results) if results else None}
    return summary


def collect_metadata():
    """The attention benchmark's device/software/commit facts, with this benchmark's settings."""
    from modelaccel.bench.attention import collect_metadata as attention_metadata

    meta = attention_metadata()
    meta["timing"] = {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median",
                      "l2_flush": "read of 256 MB before each call", "graph_warmup_calls": GRAPH_WARMUP_CALLS,
                      "layered_graph": {"min_bytes": LAYER_GRAPH_BYTES, "min_layers": MIN_LAYERS,
                                        "max_layers": MAX_LAYERS}}
    meta["problem"] = {"dtype": DTYPE, "nheads_q": NHEADS_Q, "nheads_k": NHEADS_K, "headdim": HEADDIM,
                       "seqlen_q": 1, "page_sizes": list(PAGE_SIZES)}
    return meta


def run_benchmark(shapes=SHAPES, page_sizes=PAGE_SIZES, read_gib=READ_BW_GIB, log=print):
    """Measure read bandwidth, run every shape, measure read bandwidth again; returns
    {"metadata", "read_bandwidth": {"before", "after", "tbps"}, "variants", "rows",
    "targets"}. Fractions use the larger of the two bandwidth measurements (the harder bar)."""
    result = {"metadata": collect_metadata(), "variants": variant_names(page_sizes)}
    before = measure_read_bandwidth(read_gib)
    log(f"read bandwidth (sum over {read_gib} GiB of bf16): {before['tbps']:.2f} TB/s")
    log(format_header(page_sizes))
    rows = []
    for batch, cache_len in shapes:
        row = run_row(batch, cache_len, page_sizes=page_sizes, log=log)
        annotate_row(row, before["tbps"])
        log(format_row(row))
        rows.append(row)
    after = measure_read_bandwidth(read_gib)
    read_bw = max(before["tbps"], after["tbps"])
    log(f"read bandwidth after the rows: {after['tbps']:.2f} TB/s; fractions use {read_bw:.2f} TB/s")
    for row in rows:
        annotate_row(row, read_bw)
    from modelaccel.attention.launch import launch_choices

    result.update({"read_bandwidth": {"before": before, "after": after, "tbps": read_bw},
                   "rows": rows, "targets": summarize_targets(rows), "launch_choices": launch_choices()})
    return result


# ---------------------------------------------------------------------------------------
# Reports: console, markdown, JSON, PNG

_SHORT = {"modelaccel": "ma", "flash": "flash", "cudnn": "cudnn"}
_W = 9  # fits the longest label, ma-p256/g
_TIMING_SUFFIX = {"plain": "", "graph": "/g", "layers": "/L"}


def _short(variant, timing):
    name = _SHORT.get(variant) or "ma-p" + variant.removeprefix("modelaccel_paged")
    return name + _TIMING_SUFFIX[timing]


def _num(value, fmt="{:.2f}"):
    return "-" if value is None else fmt.format(value)


def _target_text(target):
    if not target["applies"]:
        return "n/a"
    if target["value"] is None:
        return "FAIL(-)"
    return "PASS" if target["pass"] else "FAIL"


def _check_summary(row):
    bad = [f"{v} {c['status']}" for v, c in row["checks"].items() if c["status"] != "ok"]
    return "ok" if not bad else ", ".join(bad)


def format_header(page_sizes=PAGE_SIZES):
    """Console header matching `format_row`."""
    cols = " ".join(f"{_short(v, t):>{_W}}" for v in variant_names(page_sizes) for t in TIMINGS)
    return (f"{'BATCH':>5} {'CACHE':>6} {'KV MiB':>7} | {cols} (TB/s) | {'%bw ma/L':>8} {'vs cu/L':>7} | "
            f"{'read_bw':>7} {'vs_cudnn':>8} {'paged':>7} | check")


def format_row(row):
    """One console line: shape, TB/s per variant and timing, modelaccel's TARGET_TIMING
    fraction of read bandwidth and ratio to cuDNN (once annotated), targets, checks."""
    variants = list(row["tbps"])
    cols = " ".join(f"{_num(row['tbps'][v][t]):>{_W}}" for v in variants for t in TIMINGS)
    frac = row.get("fraction_of_read_bw", {}).get("modelaccel", {}).get(TARGET_TIMING)
    ratio = row.get("vs_cudnn", {}).get("modelaccel", {}).get(TARGET_TIMING)
    targets = row.get("targets")
    tcols = (" ".join(f"{_target_text(targets[n]):>{w}}" for n, w in zip(TARGETS, (7, 8, 7))) if targets
             else " " * 24)
    return (f"{row['batch']:>5} {row['cache_len']:>6} {row['kv_bytes'] / 2**20:>7.0f} | {cols}{' ' * 8}| "
            f"{_num(frac, '{:.1%}'):>8} {_num(ratio, '{:.2f}x'):>7} | {tcols} | {_check_summary(row)}")


def format_summary(result):
    """Console/markdown lines: the measured bandwidth and each target's verdict."""
    bw = result["read_bandwidth"]
    lines = [f"Read bandwidth: {bw['tbps']:.2f} TB/s (x.sum() over {bw['before']['bytes'] / 2**30:.0f} GiB of bf16; "
             f"{bw['before']['tbps']:.2f} before the rows, {bw['after']['tbps']:.2f} after)."]
    for name in TARGETS:
        s = result["targets"][name]
        verdict = "n/a (no row applies)" if s["ok"] is None else ("PASS" if s["ok"] else "FAIL")
        lines.append(f"Target {TARGET_TITLES[name]}: {verdict}, {s['pass']}/{s['rows']} rows")
    return lines


def format_markdown(result):
    """Markdown report: metadata, the throughput table, the bandwidth/cuDNN/targets table,
    the target verdicts, then every check that was not ok and every missing number's reason."""
    meta, variants, rows = result["metadata"], result["variants"], result["rows"]
    p = meta.get("problem", {})
    lines = [f"# Decoding attention (flash_attn_with_kvcache), {meta['device_name']}", ""]
    for key in ("device_name", "sm_count", "compute_capability", "torch", "triton", "cuda", "cudnn", "date",
                "modelaccel_commit", "modelaccel_dirty", "timing"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", f"{p.get('dtype', DTYPE)}, {p.get('nheads_q', NHEADS_Q)} query heads over "
              f"{p.get('nheads_k', NHEADS_K)} KV heads, head dim {p.get('headdim', HEADDIM)}, one query token, "
              "cache_seqlens = cache length. TB/s = K+V bytes (batch x cache_len x HK x D x 2 bytes x 2) / time. "
              "plain: the call launched directly (host time included where it is longer); graph: replay of a CUDA "
              "graph holding one call; layers: replay of a CUDA graph holding LAYERS calls, each over its own copy "
              "of the cache (a decoding step's graph of every layer), time per call. The targets are read on "
              "layers. modelaccel_pagedN: paged cache, N tokens a page, pages placed by a random "
              "permutation. flash/cudnn: SDPA backends with enable_gqa on the cache laid out [b, HK, L, D] outside "
              "the timing. '-': no number (reasons below).", ""]
    lines += format_summary(result)

    header = ["BATCH", "CACHE_LEN", "K+V MiB", "LAYERS"] + [f"{v} {t}" for v in variants for t in TIMINGS]
    lines += ["", "## Throughput (TB/s)", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in rows:
        cells = [str(row["batch"]), str(row["cache_len"]), f"{row['kv_bytes'] / 2**20:.0f}", str(row.get("layers"))]
        cells += [_num(row["tbps"][v][t]) for v in variants for t in TIMINGS]
        lines.append("| " + " | ".join(cells) + " |")

    layouts = [v for v in variants if v.startswith("modelaccel")]
    header = (["BATCH", "CACHE_LEN"] + [f"{v} {t} / read bw" for v in layouts for t in ("graph", "layers")]
              + [f"{v} vs cudnn {t}" for v in ("modelaccel", "flash") for t in TIMINGS]
              + [f"target {n}" for n in TARGETS])
    lines += ["", "## Against measured read bandwidth and cuDNN", "", "| " + " | ".join(header) + " |",
              "|" + "---:|" * len(header)]
    for row in rows:
        cells = [str(row["batch"]), str(row["cache_len"])]
        cells += [_num(row["fraction_of_read_bw"][v][t], "{:.1%}") for v in layouts for t in ("graph", "layers")]
        cells += [_num(row["vs_cudnn"][v][t], "{:.2f}x") for v in ("modelaccel", "flash") for t in TIMINGS]
        cells += [f"{_target_text(row['targets'][n])} ({row['targets'][n]['detail']})"
                  if row["targets"][n]["applies"] else "n/a" for n in TARGETS]
        lines.append("| " + " | ".join(cells) + " |")

    notes = []
    for row in rows:
        shape = f"({row['batch']}, {row['cache_len']})"
        for v, c in row["checks"].items():
            if c["status"] != "ok":
                err = c["detail"] or f"max abs err {c['max_abs_err']:.3e}, rel err {c['rel_err']:.3e}"
                notes.append(f"- {shape} {v} check {c['status']}: {err}")
        for v, by_timing in row["errors"].items():
            notes += [f"- {shape} {v} {t}: {reason}" for t, reason in by_timing.items()]
    if notes:
        lines += ["", "## Checks not ok and missing numbers", ""] + notes
    return "\n".join(lines) + "\n"


def plot_results(result, path):
    """Bars of TB/s per variant per shape, one panel per timing (TIMINGS, the targets' first), with
    the measured read bandwidth and the 80% target as lines. Returns path, or None (reason
    printed) without matplotlib: a missing plot must not cost the run its results."""
    plt = report.pyplot()
    if plt is None:
        return None

    variants, rows = result["variants"], result["rows"]
    bw = result["read_bandwidth"]["tbps"]
    timings = [TARGET_TIMING] + [t for t in TIMINGS if t != TARGET_TIMING]
    fig, axes = plt.subplots(len(timings), 1, figsize=(13, 4.5 * len(timings)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, timing in zip(axes[:, 0], timings):
        for i, v in enumerate(variants):
            heights = [row["tbps"][v][timing] or 0.0 for row in rows]
            ax.bar([x + (i - (len(variants) - 1) / 2) * width for x in range(len(rows))], heights, width, label=v)
        ax.axhline(bw, color="black", linewidth=1, label=f"read bandwidth {bw:.2f} TB/s")
        ax.axhline(TARGET_READ_FRACTION * bw, color="black", linewidth=1, linestyle="--",
                   label=f"{TARGET_READ_FRACTION:.0%} of it")
        ax.set_xticks(list(range(len(rows))))
        ax.set_xticklabels([f"{r['batch']}x{r['cache_len']}\n{r['kv_bytes'] / 2**20:.0f} MiB" for r in rows],
                           fontsize=8)
        ax.set_ylabel("K+V TB/s")
        ax.set_title({"layers": "CUDA graph of a step's layers, per call", "graph": "CUDA graph of one call",
                      "plain": "plain launches"}[timing])
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("batch x cache length, K+V bytes (missing bars: no number, see the markdown report)")
    return report.save_figure(fig, f"Decoding attention, {result['metadata']['device_name']}", path)


def write_results(result, out_dir, tag=""):
    """Write result as decode_attention_<device-slug>_<date>[_<tag>].{json,md,png} into out_dir.
    Returns {"json", "md", "png"}, "png" None if the plot was skipped."""
    return report.write_files(result, out_dir, "decode_attention", tag, format_markdown, plot_results)


# ---------------------------------------------------------------------------------------
# CPU self-check (Triton interpreter)

# (batch, cache_len, nheads_q, nheads_k, headdim, cache_seqlens, page_size or None, num_splits).
# fp16: the interpreter cannot do bf16 dots. Tiny, since every program instance runs in numpy.
SELFCHECK_CASES = (
    (2, 48, 4, 2, 64, None, None, 0),
    (2, 48, 4, 2, 64, (48, 29), None, 3),  # partial lengths, split-KV forced
    (2, 48, 4, 2, 64, (48, 29), 16, 0),  # paged, the last page of sequence 1 partly used
    (3, 64, 4, 1, 64, (64, 1, 40), 16, 2),  # MQA, paged, split-KV, a one-token sequence
)
SELFCHECK_ATOL = 2e-3
SELFCHECK_RTOL = 2e-3


def selfcheck_case(flash_attn_with_kvcache, batch, cache_len, nheads_q, nheads_k, headdim, seqlens, page_size,
                   num_splits):
    """Max abs error of one decode call against `decode_reference` on fp16 CPU inputs and
    whether every element is within SELFCHECK_ATOL + SELFCHECK_RTOL * |ref|."""
    q, k_cache, v_cache, cache_seqlens = make_inputs(batch, cache_len, nheads_q, nheads_k, headdim, "fp16",
                                                     device="cpu")
    if seqlens is not None:
        cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    ref = decode_reference(q, k_cache, v_cache, cache_seqlens)
    if page_size is None:
        k, v, block_table = k_cache, v_cache, None
    else:
        k, v, block_table = build_paged_cache(k_cache, v_cache, page_size)
    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, block_table=block_table, causal=True,
                                  num_splits=num_splits)
    if tuple(out.shape) != tuple(ref.shape):
        return float("nan"), False
    err = (out.float() - ref).abs()
    return err.max().item(), bool((err <= SELFCHECK_ATOL + SELFCHECK_RTOL * ref.abs()).all())


def selfcheck_main():
    """Run SELFCHECK_CASES through the Triton interpreter; 0 if all pass and each launched a
    Triton kernel (a right answer from a PyTorch fallback fails), else 1."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("decode self-check: TRITON_INTERPRET=1 must be set before the process starts.")
        return 1
    from modelaccel.bench.selfcheck import _count_interpreted_launches

    launches = _count_interpreted_launches()
    import modelaccel

    print("modelaccel decode self-check: flash_attn_with_kvcache in the Triton interpreter (CPU) vs float32 "
          "reference")
    failures = 0
    for case in SELFCHECK_CASES:
        batch, cache_len, hq, hk, d, seqlens, page, splits = case
        before = launches()
        try:
            err, within = selfcheck_case(modelaccel.flash_attn_with_kvcache, *case)
        except Exception as e:  # noqa: BLE001 - report the case, run the rest
            err, within = float("nan"), False
            print(f"  raised {type(e).__name__}: {_first_line(e)}")
        ran_kernel = launches() > before
        ok = within and ran_kernel
        failures += not ok
        note = "" if ran_kernel else " (no Triton kernel launched)"
        print(f"{'PASS' if ok else 'FAIL'} fp16 batch={batch} cache_len={cache_len} heads={hq}/{hk} headdim={d} "
              f"cache_seqlens={list(seqlens) if seqlens else 'full'} "
              f"{'paged ' + str(page) if page else 'contiguous'} num_splits={splits}: max abs err {err:.2e}{note}")
    print(f"{len(SELFCHECK_CASES) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(selfcheck_main())

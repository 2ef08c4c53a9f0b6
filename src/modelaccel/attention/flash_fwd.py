"""FlashAttention-2 forward pass in Triton, and its launcher.

One program computes a BLOCK_M tile of query rows for one (batch, head): it streams the
key/value tiles of that head's kv group through shared memory, keeps the running row max
and row sum of the softmax in registers (in the log2 domain, so exp2 does the work) and
rescales the output accumulator as the max grows.

Per program the key range splits into three loops: masked blocks at the start (sliding
window edge), unmasked blocks in the middle, masked blocks at the end (causal diagonal,
window edge, last partial block). Only the edge blocks pay for the mask arithmetic.

On Hopper, tiles come in through TMA tensor descriptors over the [batch, seqlen, nheads,
headdim] tensors, whose out-of-bounds zero fill also pads odd lengths and head dims that
are not a power of two. Elsewhere (older GPUs, misaligned strides) the same kernel runs
with masked pointer loads.
"""

import functools
import json
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer path only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_tile(X, b, s, h, stride_b, stride_s, stride_h, SEQLEN,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """[BLOCK_S, BLOCK_D] tile of rows s.. of head h of batch b; zeros outside the tensor."""
    if USE_TMA:
        tile = X.load([b, s, h, 0])
        return tl.reshape(tile, [BLOCK_S, BLOCK_D])
    else:
        offs_s = s + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :])
        mask = (offs_s[:, None] < SEQLEN) & (offs_d[None, :] < HEADDIM)
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """a @ b + acc with float32 accumulation.

    UPCAST works around the Triton interpreter, whose bf16 dot multiplies the raw uint16
    bit patterns (seen with triton 3.9): the operands go to float32 first, which gives the
    same products since bf16 x bf16 is exact in float32. Never set on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _attn_fwd_blocks(acc, l_i, m_i, q, K, V, b, hk, offs_m, lo, hi,
                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     SEQLEN_K, diag, window_left, window_right,
                     qk_scale, softcap_scale, alibi_slope,
                     MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
                     USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i); scores kept in log2 units."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _load_tile(K, b, start_n, hk, stride_kb, stride_ks, stride_kh, SEQLEN_K,
                       BLOCK_N, BLOCK_D, HEADDIM, USE_TMA)
        qk = _dot(q, tl.trans(k), None, UPCAST_DOT)
        offs_n = start_n + offs_n0
        if MASKED or HAS_SOFTCAP or HAS_ALIBI:
            if HAS_SOFTCAP:
                # softcap * tanh(x / softcap), tanh through exp2 so the interpreter and every
                # backend share one formula; exp2 overflow to inf still gives tanh = 1.
                x = qk * softcap_scale
                s = (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)) * qk_scale
            else:
                s = qk * qk_scale
            if HAS_ALIBI:
                dist = (offs_m[:, None] + diag - offs_n[None, :]).to(tl.float32)
                s -= alibi_slope * tl.abs(dist)
            if MASKED:
                visible = offs_n[None, :] < SEQLEN_K
                if HAS_LEFT:
                    visible &= offs_n[None, :] >= offs_m[:, None] + diag - window_left
                if HAS_RIGHT:
                    visible &= offs_n[None, :] <= offs_m[:, None] + diag + window_right
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps max -inf; subtract 0 instead so that
            # exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            # The hot loop: max of the raw scores, then scale and shift in one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(V, b, start_n, hk, stride_vb, stride_vs, stride_vh, SEQLEN_K,
                       BLOCK_N, BLOCK_D, HEADDIM, USE_TMA)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, ALIBI,
                     stride_qb, stride_qs, stride_qh,
                     stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh,
                     stride_ob, stride_os, stride_oh,
                     stride_alibi_b,
                     NHEADS, GROUP, SEQLEN_Q, SEQLEN_K,
                     window_left, window_right, qk_scale, softcap_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEADDIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NHEADS
    h = pid_bh % NHEADS
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # Query row i sits at key position i + diag (bottom-right aligned masks).
    diag = SEQLEN_K - SEQLEN_Q
    last_m = tl.minimum(start_m + BLOCK_M, SEQLEN_Q) - 1

    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + b * stride_alibi_b + h) * 1.4426950408889634

    # Key blocks any row of this tile may see: [lo, hi).
    lo = 0
    hi = SEQLEN_K
    if HAS_LEFT:
        lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(last_m + diag + window_right + 1, SEQLEN_K)
    # Key blocks every row of this tile sees whole: [full_lo, full_hi).
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.cdiv(tl.maximum(last_m + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = SEQLEN_K // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + diag + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    q = _load_tile(Q, b, start_m, h, stride_qb, stride_qs, stride_qh, SEQLEN_Q,
                   BLOCK_M, BLOCK_D, HEADDIM, USE_TMA)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, b, hk, offs_m, lo, full_lo,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        SEQLEN_K, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, b, hk, offs_m, full_lo, full_hi,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        SEQLEN_K, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, b, hk, offs_m, full_hi, hi,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        SEQLEN_K, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)

    # Rows that saw no key: out 0, lse +inf (flash-attn's convention).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + pid_bh.to(tl.int64) * SEQLEN_Q + offs_m, lse, mask=offs_m < SEQLEN_Q)
    out = (acc / l_safe[:, None]).to(q.dtype)
    if USE_TMA:
        O.store([b, start_m, h, 0], tl.reshape(out, [1, BLOCK_M, 1, BLOCK_D]))
    else:
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :])
        tl.store(ptrs, out, mask=(offs_m[:, None] < SEQLEN_Q) & (offs_d[None, :] < HEADDIM))


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tma_usable(*tensors):
    """TMA needs Hopper or newer (or the interpreter), 16-byte aligned pointers and strides."""
    if TensorDescriptor is None:
        return False
    if tensors[0].is_cuda:
        if _capability(tensors[0].device.index)[0] < 9:
            return False
    elif not _interpreting():
        return False
    for t in tensors:
        esize = t.element_size()
        if t.data_ptr() % 16 or any((s * esize) % 16 for s in t.stride()[:-1]):
            return False
    return True


# Block shapes for Hopper by padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Larger head dims need smaller key tiles to fit K and V stages in shared memory.
# Measured on an H100 (benchmarks/tune_attention_fwd.py, results in benchmarks/results/tuning):
# BLOCK_M=128 tiles want 8 warps at head dim 128 (4 warps spill), small 64x64 tiles win on
# short and causal rows; 256-row tiles and warp specialization gained nothing.
_GPU_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
}


def _size_bucket(n):
    """Sizes tune by power-of-two class, so a new prompt length does not retune."""
    return 1 << max(n - 1, 0).bit_length()


class _LaunchTuner:
    """Chooses the launch (block shape, warps, stages, TMA or pointers) per problem class.

    Each candidate is timed once per class with do_bench on the real call. TMA is a
    candidate only for problems big enough to hide its host cost: the four host-side
    descriptors add ~60-80 us to every call with triton 3.6 (benchmarks/launch_overhead.py),
    more than a small problem spends on the GPU. Choices persist in a JSON file per device
    and triton version ($MODELACCEL_CACHE_DIR, default ~/.cache/modelaccel), so tuning
    happens once.
    """

    def __init__(self):
        self.choices = None
        self.path = None

    def _load(self, device):
        name = torch.cuda.get_device_name(device).replace(" ", "-")
        folder = os.environ.get("MODELACCEL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "modelaccel"))
        self.path = os.path.join(folder, f"attention_fwd_{name}_triton-{triton.__version__}.json")
        try:
            with open(self.path) as f:
                self.choices = {k: tuple(v) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            self.choices = {}

    def _save(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.choices, f, indent=0)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home only costs re-tuning in the next process
            pass

    def choose(self, key, block_d, tma_ok, launch):
        """The best (bm, bn, warps, stages, use_tma) for `key`; `launch(config)` runs one."""
        if self.choices is None:
            self._load(torch.cuda.current_device())
        key = "|".join(map(str, key))
        if key not in self.choices:
            candidates = [(*c, t) for c in _GPU_CONFIGS[min(c for c in _GPU_CONFIGS if c >= block_d)]
                          for t in ((True, False) if tma_ok else (False,))]
            timings = {}
            for config in candidates:
                try:
                    timings[config] = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
                except triton.runtime.errors.OutOfResources:  # too much shared memory here
                    continue
            if not timings:
                raise RuntimeError(f"no attention kernel configuration fits this GPU for {key}")
            self.choices[key] = min(timings, key=timings.get)
            self._save()
        return self.choices[key]


_tuner = _LaunchTuner()
# Below this many FLOPs (~0.2 ms of GPU work at 400 TFLOPS) the host-side TMA descriptors
# cost more time per call than TMA saves on the GPU.
_TMA_MIN_FLOPS = 8e10


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def flash_attn_forward(q, k, v, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, use_tma=None, block_m=None, block_n=None,
                       num_warps=None, num_stages=None, out=None, lse=None):
    """Run the forward kernel on validated inputs.

    Args:
        q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim];
            fp16 or bf16, same device, last dim contiguous, headdim a multiple of 8 <= 256.
        alibi_slopes: float32 [nheads] or [batch, nheads], or None.
        use_tma / block_m / block_n / num_warps / num_stages: overrides for tests and
            tuning experiments. By default the GPU launch is tuned per problem class
            (`_LaunchTuner`); the interpreter uses 16x16 blocks and TMA.
        out, lse: optional preallocated outputs (tests poison them to prove every element
            is written).
    Returns:
        out [batch, seqlen_q, nheads, headdim] in q's dtype, lse [batch, nheads, seqlen_q] float32.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    if seqlen_q == 0 or batch == 0 or nheads == 0:
        return out, lse
    if seqlen_k == 0:  # nothing to attend to: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    left, right = window_size
    if causal:
        right = 0
    block_d = max(triton.next_power_of_2(headdim), 16)
    tma_ok = _tma_usable(q, k, v, out) if use_tma is not False else False
    if use_tma is None and q.is_cuda and 4 * batch * nheads * seqlen_q * seqlen_k * headdim < _TMA_MIN_FLOPS:
        tma_ok = False
    alibi_stride_b = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    interpreting = _interpreting()

    def launch(config):
        bm, bn, warps, stages, tma = config
        if tma:
            Q, K, V, O = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, block_d])
                          for t, rows in ((q, bm), (k, bn), (v, bn), (out, bm)))
        else:
            Q, K, V, O = q, k, v, out
        extra = {} if interpreting else {"num_warps": warps, "num_stages": stages}
        _attn_fwd_kernel[(triton.cdiv(seqlen_q, bm), batch * nheads)](
            Q, K, V, O, lse, alibi_slopes if alibi_slopes is not None else lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            alibi_stride_b,
            nheads, nheads // nheads_k, seqlen_q, seqlen_k,
            left, right, softmax_scale * LOG2E if softcap <= 0 else softcap * LOG2E,
            softmax_scale / softcap if softcap > 0 else 1.0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HEADDIM=headdim,
            HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, USE_TMA=tma,
            UPCAST_DOT=interpreting and q.dtype == torch.bfloat16, **extra,
        )

    if interpreting or block_m is not None:
        config = (block_m or 16, block_n or 16, num_warps or 4, num_stages or 2,
                  tma_ok if use_tma is None else use_tma)
    else:
        key = (q.dtype, headdim, left >= 0, right >= 0, softcap > 0, alibi_slopes is not None,
               tma_ok, _size_bucket(seqlen_q), _size_bucket(seqlen_k), _size_bucket(batch * nheads))
        config = _tuner.choose(key, block_d, tma_ok, launch)
    launch(config)
    return out, lse

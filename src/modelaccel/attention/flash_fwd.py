"""FlashAttention-2 forward pass in Triton, its launcher, and the score helpers the
backward pass shares.

One program computes a BLOCK_M tile of query rows for one (batch, head): it streams the
key/value tiles of that head's kv group through shared memory, keeps the running row max
and row sum of the softmax in registers (in the log2 domain, so exp2 does the work) and
rescales the output accumulator as the max grows.

Per program the key range splits into three loops: masked blocks at the start (sliding
window edge), unmasked blocks in the middle, masked blocks at the end (causal diagonal,
window edge, last partial block). Only the edge blocks pay for the mask arithmetic.

On Hopper, tiles of big problems come in through TMA tensor descriptors over the
[batch, seqlen, nheads, headdim] tensors, whose out-of-bounds zero fill also pads odd
lengths and head dims that are not a power of two. Elsewhere (small problems, older GPUs,
misaligned strides, packed variable-length batches) the same kernel runs with masked
pointer loads.

Variable-length batches: q/k/v are [total, nheads, headdim] viewed as batch 1, and
cu_seqlens give each sequence's first row; masks and dropout use positions within the
sequence. Dropout draws Philox numbers from (seed + batch * nheads + head, row * seqlen_k
+ col), so the backward pass regenerates the same mask.
"""


import torch
import triton
import triton.language as tl

from .launch import (LaunchTuner, TensorDescriptor, cdiv, empty_buffer, gluon_kernels, interpreting, launch_kernel,
                     next_power_of_2, size_bucket, tma_usable)

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(X, b, s, h, stride_b, stride_s, stride_h, LIMIT,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """[BLOCK_S, BLOCK_D] tile of rows s.. of head h of batch b; zeros from row LIMIT on
    and past the head dim."""
    if USE_TMA:
        tile = X.load([b, s, h, 0])
        return tl.reshape(tile, [BLOCK_S, BLOCK_D])
    else:
        offs_s = s + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :])
        mask = (offs_s[:, None] < LIMIT) & (offs_d[None, :] < HEADDIM)
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_tile(X, tile, b, s, h, stride_b, stride_s, stride_h, LIMIT,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Store a [BLOCK_S, BLOCK_D] tile at rows s.. of head h of batch b, rows < LIMIT only."""
    if USE_TMA:
        X.store([b, s, h, 0], tl.reshape(tile, [1, BLOCK_S, 1, BLOCK_D]))
    else:
        offs_s = s + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = (X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
                + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :])
        tl.store(ptrs, tile, mask=(offs_s[:, None] < LIMIT) & (offs_d[None, :] < HEADDIM))


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
def _tanh(x):
    # Through exp2 so the interpreter and every backend share one formula; exp2 overflow
    # to inf still gives tanh = 1.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores_log2(qk, pos_m, pos_n, seqlen_k, diag, window_left, window_right,
                 qk_scale, softcap_scale, alibi_slope,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in log2 units: softcap, then ALiBi, then -inf where the mask hides a key.

    pos_m / pos_n are query / key positions within the sequence as grids that broadcast
    to qk's shape: offs_m[:, None], offs_n[None, :] for a [M, N] tile, or offs_m[None, :],
    offs_n[:, None] for the transposed [N, M] tile the dK/dV kernel works on. Query row i
    sits at key position i + diag (bottom-right aligned masks).
    """
    if HAS_SOFTCAP:
        s = _tanh(qk * softcap_scale) * qk_scale
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s -= alibi_slope * tl.abs((pos_m + diag - pos_n).to(tl.float32))
    if MASKED:
        visible = pos_n < seqlen_k
        if HAS_LEFT:
            visible &= pos_n >= pos_m + diag - window_left
        if HAS_RIGHT:
            visible &= pos_n <= pos_m + diag + window_right
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _dropout_keep(seed, pos_m, pos_n, seqlen_k, dropout_p):
    """Boolean keep mask over the grids pos_m, pos_n (as in _scores_log2); the same
    (seed, position) gives the same bit in either orientation."""
    return tl.rand(seed, pos_m * seqlen_k + pos_n) >= dropout_p


@triton.jit
def _key_block_range(start_m, last_m, seqlen_k, diag, window_left, window_right,
                     BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For query rows [start_m, last_m]: keys any row sees, [lo, hi), and whole key blocks
    every row sees, [full_lo, full_hi), block-aligned, lo <= full_lo <= full_hi <= hi."""
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(last_m + diag + window_right + 1, seqlen_k)
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.cdiv(tl.maximum(last_m + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + diag + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence_bounds(b, CU_Q, CU_K, SEQLEN_Q, SEQLEN_K, IS_VARLEN: tl.constexpr):
    """(batch index into the tensors, first q row, seqlen_q, first k row, seqlen_k)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        # Packed tensors are one batch row: index 0, kept a tensor like b.
        return b * 0, q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start
    else:
        return b, 0, SEQLEN_Q, 0, SEQLEN_K


@triton.jit
def _grid_position(LAUNCH_GROUP: tl.constexpr, LAST_LONGEST: tl.constexpr):
    """(block, batch * head) of this program in a grid (blocks, batch * heads).

    LAUNCH_GROUP 0: grid order. G > 0: the GPU starts programs in grid order, so number
    them longest first within groups of G batch-heads: every block index of a group before
    the next index (the longest, under a causal mask: the last query blocks, LAST_LONGEST, or
    the first key blocks), groups one after the other. In grid order each batch-head's
    longest programs start together with its short ones, and the last batch-head's run on
    a few SMs while the rest idle; the groups keep the programs that run at the same time
    on the K/V (or Q/dO) of a few batch-heads, which stay in L2.
    """
    if LAUNCH_GROUP == 0:
        return tl.program_id(0), tl.program_id(1)
    nblocks = tl.num_programs(0)
    pid = tl.program_id(1) * nblocks + tl.program_id(0)
    first = pid // (LAUNCH_GROUP * nblocks) * LAUNCH_GROUP
    size = tl.minimum(tl.num_programs(1) - first, LAUNCH_GROUP)
    rest = pid - first * nblocks
    block = rest // size
    if LAST_LONGEST:
        block = nblocks - 1 - block
    return block, first + rest % size


@triton.jit
def _batch_head(pid_bh, NHEADS, CU_Q, CU_K, SEQLEN_Q, SEQLEN_K, IS_VARLEN: tl.constexpr):
    """For pid_bh over batch * NHEADS: (batch, head) and the batch's sequence bounds
    (as _sequence_bounds)."""
    b = pid_bh // NHEADS
    bt, q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CU_Q, CU_K, SEQLEN_Q, SEQLEN_K, IS_VARLEN)
    return b, pid_bh % NHEADS, bt, q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _query_block(CU_Q, CU_K, ALIBI, stride_alibi_b, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, LAUNCH_GROUP: tl.constexpr):
    """What a program of grid (query block, batch * head) works on, in the forward and dQ
    kernels: (batch, head, kv head, batch index into the tensors, first q row, seqlen_q,
    first k row, seqlen_k, start_m, offs_m, diagonal offset, ALiBi slope in log2 units, and
    the key range [lo, hi) with its unmasked part [full_lo, full_hi), see _key_block_range).
    A varlen program whose block starts past its sequence (start_m >= seqlen_q) has nothing
    to do; the caller returns. LAUNCH_GROUP orders the programs (_grid_position)."""
    pid_m, pid_bh = _grid_position(LAUNCH_GROUP, True)
    b, h, bt, q_start, seqlen_q, k_start, seqlen_k = _batch_head(pid_bh, NHEADS, CU_Q, CU_K, SEQLEN_Q, SEQLEN_K,
                                                                 IS_VARLEN)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    diag = seqlen_k - seqlen_q
    last_m = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + b * stride_alibi_b + h) * 1.4426950408889634
    lo, full_lo, full_hi, hi = _key_block_range(start_m, last_m, seqlen_k, diag, window_left, window_right,
                                                BLOCK_N, HAS_LEFT, HAS_RIGHT)
    return (b, h, hk, bt, q_start, seqlen_q, k_start, seqlen_k, start_m, offs_m, diag, alibi_slope,
            lo, full_lo, full_hi, hi)


@triton.jit
def _attn_fwd_blocks(acc, l_i, m_i, q, K, V, bt, hk, k_start, offs_m, lo, hi,
                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     seqlen_k, diag, window_left, window_right,
                     qk_scale, softcap_scale, alibi_slope, seed, dropout_p,
                     MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
                     USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i); scores kept in log2 units."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _load_tile(K, bt, k_start + start_n, hk, stride_kb, stride_ks, stride_kh, k_start + seqlen_k,
                       BLOCK_N, BLOCK_D, HEADDIM, USE_TMA)
        qk = _dot(q, tl.trans(k), None, UPCAST_DOT)
        offs_n = start_n + offs_n0
        if MASKED or HAS_SOFTCAP or HAS_ALIBI:
            s = _scores_log2(qk, offs_m[:, None], offs_n[None, :], seqlen_k, diag, window_left, window_right,
                             qk_scale, softcap_scale, alibi_slope,
                             MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI)
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
        if HAS_DROPOUT:
            # The softmax sum counts every key; only the value mix drops some.
            p = tl.where(_dropout_keep(seed, offs_m[:, None], offs_n[None, :], seqlen_k, dropout_p), p, 0.0)
        v = _load_tile(V, bt, k_start + start_n, hk, stride_vb, stride_vs, stride_vh, k_start + seqlen_k,
                       BLOCK_N, BLOCK_D, HEADDIM, USE_TMA)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, ALIBI, CU_Q, CU_K,
                     stride_qb, stride_qs, stride_qh,
                     stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh,
                     stride_ob, stride_os, stride_oh,
                     stride_lse_b, stride_lse_h, stride_alibi_b,
                     NHEADS, GROUP, SEQLEN_Q, SEQLEN_K,
                     window_left, window_right, qk_scale, softcap_scale, seed, dropout_p,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEADDIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     LAUNCH_GROUP: tl.constexpr):
    (b, h, hk, bt, q_start, seqlen_q, k_start, seqlen_k, start_m, offs_m, diag, alibi_slope,
     lo, full_lo, full_hi, hi) = _query_block(CU_Q, CU_K, ALIBI, stride_alibi_b, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K,
                                              window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                              HAS_ALIBI, IS_VARLEN, LAUNCH_GROUP)
    if IS_VARLEN:  # the grid covers the longest sequence of the batch
        if start_m >= seqlen_q:
            return
    seed_bh = seed + b * NHEADS + h

    q = _load_tile(Q, bt, q_start + start_m, h, stride_qb, stride_qs, stride_qh, q_start + seqlen_q,
                   BLOCK_M, BLOCK_D, HEADDIM, USE_TMA)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, bt, hk, k_start, offs_m, lo, full_lo,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope, seed_bh, dropout_p,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, bt, hk, k_start, offs_m, full_lo, full_hi,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope, seed_bh, dropout_p,
        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)
    acc, l_i, m_i = _attn_fwd_blocks(
        acc, l_i, m_i, q, K, V, bt, hk, k_start, offs_m, full_hi, hi,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope, seed_bh, dropout_p,
        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
        BLOCK_N, BLOCK_D, HEADDIM, USE_TMA, UPCAST_DOT)

    # Rows that saw no key: out 0, lse +inf (flash-attn's convention).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    lse_ptrs = LSE + b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
    if HAS_DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)  # kept values are scaled by 1 / (1 - p)
    out = (acc / l_safe[:, None]).to(q.dtype)
    _store_tile(O, out, bt, q_start + start_m, h, stride_ob, stride_os, stride_oh, q_start + seqlen_q,
                BLOCK_M, BLOCK_D, HEADDIM, USE_TMA)


@triton.jit
def _dropout_mask_kernel(MASK, NHEADS, SEQLEN_Q, SEQLEN_K, seed, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask [batch, nheads, seqlen_q, seqlen_k] the attention kernels draw, for tests."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, SEQLEN_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed + pid_bh, offs_m[:, None], offs_n[None, :], SEQLEN_K, dropout_p)
        ptrs = MASK + pid_bh.to(tl.int64) * SEQLEN_Q * SEQLEN_K + offs_m[:, None] * SEQLEN_K + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < SEQLEN_Q) & (offs_n[None, :] < SEQLEN_K))


# Block shapes for Hopper by padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Larger head dims need smaller key tiles to fit K and V stages in shared memory.
# Measured on an H100 (benchmarks/tune_attention_fwd.py, results in benchmarks/results/tuning):
# BLOCK_M=128 tiles want 8 warps at head dim 128 (4 warps spill), small 64x64 tiles win on
# short and causal rows; 256-row tiles and warp specialization gained nothing.
_GPU_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
    # (64, 64, 8, 2) faults with "misaligned address" on triton 3.6 / H100 at head dim 160
    # (benchmarks/debug_launch_configs.py, 2026-11-25): not a candidate.
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
# TMA is a tuning candidate only above this many FLOPs (~0.2 ms of GPU work at 400 TFLOPS):
# the four host-side descriptors add ~60-80 us to every call with triton 3.6
# (benchmarks/launch_overhead.py), more than a small problem spends on the GPU.
_TMA_MIN_FLOPS = 8e10
# Candidates are timed from CUDA graphs (GPU time alone): timed by direct launches, calls
# of ~0.1 ms or less were ranked by host time, which moved from run to run on the H200's
# host by up to 2x while the GPU time did not (benchmarks/NOTES.md), and the choice came
# out at random.
_tuner = LaunchTuner("attention_fwd", graph_timing=True)
# The warp-specialized Gluon forward (gluon_fwd.py, Hopper only) competes in tuning for the
# calls it covers from this many FLOPs (4 b h sq sk d) on: three host-side descriptors cost
# less than the four of the Triton TMA path, and on the H200 it beat the Triton kernel by
# 36% at (1, 32, 8, 2048) causal (6.9e10). With persistent launches it also beat it by 46%
# (GPU time) at Llama-3-8B's 512-token batch-8 prefill (2.7e10); the training check's
# layers (1.7e10, host-bound) stay below. MODELACCEL_GLUON_FWD=0 leaves it out.
_GLUON_MIN_FLOPS = 2e10


def _gluon_module():
    """gluon_fwd, or None where the Gluon forward is not offered (launch.gluon_kernels)."""
    return gluon_kernels("gluon_fwd")


def _gluon_candidates(q, k, v, flops, window, softcap, alibi_slopes, dropout_p, varlen):
    """The Gluon forward's launch candidates for this call, or () where it does not apply."""
    if not q.is_cuda or flops < _GLUON_MIN_FLOPS or interpreting():
        return ()
    gluon_fwd = _gluon_module()
    if gluon_fwd is None or not gluon_fwd.gluon_forward_applies(q, k, v, window, softcap, alibi_slopes, dropout_p,
                                                                varlen):
        return ()
    return gluon_fwd.GLUON_WS_CANDIDATES


_candidate_lists = {}


def config_candidates(configs, block_d, tma_ok, extra=()):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma) candidates for a padded head dim,
    then the module-level list `extra` (other kernels' launches, e.g. the Gluon forward's).

    Built once per (config table, head-dim class, TMA, extra) and reused: every launch asks.
    """
    key = (id(configs), block_d, tma_ok, id(extra))
    if key not in _candidate_lists:
        _candidate_lists[key] = [(*c, t) for c in configs[min(c for c in configs if c >= block_d)]
                                 for t in ((True, False) if tma_ok else (False,))] + list(extra)
    return _candidate_lists[key]


# Programs of causal (right-bounded) attention launch longest first in groups of this many
# batch-heads (_grid_position); 0 keeps grid order. The forward, dQ and dK/dV kernels read it.
# On the H200 (benchmarks/launch_order.py, results/tuning/launch_order_h200_1b7d08a.json)
# groups of 16 took the causal forward 5% faster than grid order (geomean of 9 shapes, up
# to 18% at (1, 32, 8, 2048)) and the backward 4% (up to 13%); groups of 4 gained 2%.
LAUNCH_GROUP = 16


def launch_group(window_right):
    """LAUNCH_GROUP for a mask with this right window bound (-1: none, so every program is
    equally long and the grid order stays)."""
    return LAUNCH_GROUP if window_right >= 0 else 0


def flash_attn_forward(q, k, v, softmax_scale, causal=False, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, dropout_p=0.0, seed=0, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q=None, max_seqlen_k=None, use_tma=None, block_m=None, block_n=None,
                       num_warps=None, num_stages=None, out=None, lse=None):
    """Run the forward kernel on validated inputs.

    Args:
        q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim];
            or, with cu_seqlens_q/k (int32 [batch + 1]), packed [total, nheads(_k), headdim].
            fp16 or bf16, same device, last dim contiguous, headdim a multiple of 8 <= 256.
        alibi_slopes: float32 [nheads] or [batch, nheads], or None.
        dropout_p, seed: dropout probability and the Philox seed that fixes its mask.
        max_seqlen_q/k: the longest sequences of a packed batch.
        use_tma / block_m / block_n / num_warps / num_stages: overrides for tests and
            tuning experiments. By default the GPU launch is tuned per problem class; the
            interpreter uses 16x16 blocks.
        out, lse: optional preallocated outputs (tests poison them to prove every element
            is written).
    Returns:
        out shaped like q in q's dtype; lse float32 [batch, nheads, seqlen_q], or
        [nheads, total_q] for a packed batch.
    """
    varlen = cu_seqlens_q is not None
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        lse_shape = (nheads, q.shape[0])
        # Packed tensors are a batch of one to the kernel; rows are addressed absolutely.
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        lse_shape = (batch, nheads, seqlen_q)
        q4, k4, v4 = q, k, v
    if out is None:
        out = empty_buffer(q.shape, q.dtype, q.device)
    if lse is None:
        lse = empty_buffer(lse_shape, torch.float32, q.device)
    if q.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out, lse
    if k.numel() == 0 or seqlen_k == 0:  # nothing to attend to: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    o4 = out.unsqueeze(0) if varlen else out
    left, right = window_size
    if causal:
        right = 0
    block_d = max(next_power_of_2(headdim), 16)
    # Packed batches take the pointer path: a TMA box would read across sequence ends.
    tma_ok = not varlen and use_tma is not False
    flops = 4 * batch * nheads * seqlen_q * seqlen_k * headdim
    if use_tma is None and q.is_cuda and flops < _TMA_MIN_FLOPS:
        tma_ok = False
    tma_ok = tma_ok and tma_usable(q, k, v, out)  # after the size test: small calls skip its host time
    alibi_stride_b = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    interp = interpreting()

    def launch(config):
        if config[0] == "gluon_ws":
            _gluon_module().flash_attn_forward_gluon_ws(q, k, v, softmax_scale, right == 0, *config[1:], out=out,
                                                        lse=lse)
            return
        bm, bn, warps, stages, tma = config
        if tma:
            Q, K, V, O = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, block_d])
                          for t, rows in ((q4, bm), (k4, bn), (v4, bn), (o4, bm)))
        else:
            Q, K, V, O = q4, k4, v4, o4
        extra = {} if interp else {"num_warps": warps, "num_stages": stages}
        launch_kernel(_attn_fwd_kernel, (cdiv(seqlen_q, bm), batch * nheads), (
            Q, K, V, O, lse, alibi_slopes if alibi_slopes is not None else lse,
            cu_seqlens_q if varlen else lse, cu_seqlens_k if varlen else lse,
            *q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *o4.stride()[:3],
            *lse_strides, alibi_stride_b,
            nheads, nheads // nheads_k, seqlen_q, seqlen_k,
            left, right, softmax_scale * LOG2E if softcap <= 0 else softcap * LOG2E,
            softmax_scale / softcap if softcap > 0 else 1.0, seed, dropout_p), dict(
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, HEADDIM=headdim,
            HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0, IS_VARLEN=varlen, USE_TMA=tma,
            UPCAST_DOT=interp and q.dtype == torch.bfloat16, LAUNCH_GROUP=launch_group(right), **extra))

    if interp or block_m is not None:
        config = (block_m or 16, block_n or 16, num_warps or 4, num_stages or 2,
                  tma_ok if use_tma is None else use_tma)
    else:
        gluon = _gluon_candidates(q, k, v, flops, (left, right), softcap, alibi_slopes, dropout_p,
                                  varlen) if use_tma is not False else ()
        # The key marks classes with Gluon candidates, so choices stored without them are not reused.
        key = (q.dtype, headdim, left >= 0, right >= 0, softcap > 0, alibi_slopes is not None, dropout_p > 0,
               varlen, tma_ok, size_bucket(seqlen_q), size_bucket(seqlen_k), size_bucket(batch * nheads)) \
            + (("gluon",) if gluon else ())
        config = _tuner.choose(key, config_candidates(_GPU_CONFIGS, block_d, tma_ok, gluon), launch)
    launch(config)
    return out, lse


def dropout_keep_mask(batch, nheads, seqlen_q, seqlen_k, dropout_p, seed, device):
    """The keep mask (bool [batch, nheads, seqlen_q, seqlen_k]) that dropout with this seed
    applies in the dense kernels; for tests and debugging."""
    mask = torch.empty(batch, nheads, seqlen_q, seqlen_k, dtype=torch.int8, device=device)
    _dropout_mask_kernel[(cdiv(seqlen_q, 32), batch * nheads)](
        mask, nheads, seqlen_q, seqlen_k, seed, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return mask.bool()

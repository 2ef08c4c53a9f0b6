"""FlashAttention-2 backward pass in Triton, and its launcher.

Two strategies, both recomputing P = exp2(S - lse) from the saved float32 lse with the
forward pass's score, mask and dropout helpers; nothing of size seqlen_q x seqlen_k is
stored.
- Deterministic (no atomics, bit-identical gradients run to run):
  dQ: one program per (query block, batch, head) walks the key blocks that block sees.
  It first computes delta = rowsum(dO * O) for its rows and stores it for the next kernel.
  dK, dV: one program per (key block, batch, kv head) walks the query blocks that see the
  key block, for every query head of the kv group, so GQA/MQA sums its gradients in
  registers. 7 matmuls per (query block, key block) pair.
- Atomic dQ (deterministic=False, where it measures faster): a small kernel computes
  delta, then the dK/dV kernel also adds each tile's dS @ K into a float32 dQ with atomic
  adds: 5 matmuls per pair, but the order of the adds varies from run to run.
The dK/dV kernel works on transposed tiles (S^T = K Q^T, [BLOCK_N, BLOCK_M]) so that P^T
and dS^T, the left operands of its matmuls, come straight from the accumulator registers
instead of a transpose through shared memory.
"""


import torch
import triton
import triton.language as tl

from .flash_fwd import (LOG2E, _batch_head, _dot, _dropout_keep, _grid_position, _load_tile, _query_block,
                        _scores_log2, _store_tile, _tanh, config_candidates, launch_group)
from .launch import (LaunchTuner, TensorDescriptor, cdiv, copy_into, empty_buffer, gluon_kernels, interpreting,
                     launch_kernel, next_power_of_2, size_bucket, tma_usable)


@triton.jit
def _query_block_range(start_n, last_n, seqlen_q, seqlen_k, diag, window_left, window_right,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """For key block [start_n, last_n]: query rows that see any of its keys, [lo, hi), and
    whole query blocks whose every row sees every key of it, [full_lo, full_hi)."""
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:
        lo = tl.maximum(start_n - diag - window_right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(last_n - diag + window_left + 1, seqlen_q)
    full_lo = lo
    if HAS_RIGHT:
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - window_right, 0), BLOCK_M) * BLOCK_M
    full_hi = seqlen_q // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        full_hi = tl.minimum(full_hi, tl.maximum(start_n - diag + window_left + 1, 0) // BLOCK_M * BLOCK_M)
    # A key block that runs past the sequence needs the mask on every query block.
    partial = start_n + BLOCK_N > seqlen_k
    full_lo = tl.where(partial, lo, full_lo)
    full_hi = tl.where(partial, lo, full_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_bwd_dq_blocks(dq, q, do, lse2, delta, K, V, bt, hk, k_start, offs_m, lo, hi,
                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        seqlen_k, diag, window_left, window_right,
                        qk_scale, softcap_scale, alibi_slope, seed, dropout_p,
                        MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
                        UPCAST_DOT: tl.constexpr):
    """Accumulate dS @ K over key blocks [lo, hi) into dq (dS in softmax-score units)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(K, bt, k_start + start_n, hk, stride_kb, stride_ks, stride_kh, k_start + seqlen_k,
                       BLOCK_N, BLOCK_D, HEADDIM, False)
        v = _load_tile(V, bt, k_start + start_n, hk, stride_vb, stride_vs, stride_vh, k_start + seqlen_k,
                       BLOCK_N, BLOCK_D, HEADDIM, False)
        qk = _dot(q, tl.trans(k), None, UPCAST_DOT)
        s = _scores_log2(qk, offs_m[:, None], offs_n[None, :], seqlen_k, diag, window_left, window_right,
                         qk_scale, softcap_scale, alibi_slope,
                         MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), None, UPCAST_DOT)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m[:, None], offs_n[None, :], seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = _tanh(qk * softcap_scale)
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST_DOT)
    return dq


@triton.jit
def _store_delta(O, DO, DELTA, bt, h, q_start, start_m, seqlen_q, row_offset, in_seq,
                 stride_ob, stride_os, stride_oh,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr):
    """Store delta = rowsum(dO * O) for query rows start_m.. of head h; returns (dO tile, delta)."""
    do = _load_tile(DO, bt, q_start + start_m, h, stride_ob, stride_os, stride_oh, q_start + seqlen_q,
                    BLOCK_M, BLOCK_D, HEADDIM, False)
    o = _load_tile(O, bt, q_start + start_m, h, stride_ob, stride_os, stride_oh, q_start + seqlen_q,
                   BLOCK_M, BLOCK_D, HEADDIM, False)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row_offset, delta, mask=in_seq)
    return do, delta


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, DQ_ACC, CU_Q, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                           NHEADS, SEQLEN_Q, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           HEADDIM: tl.constexpr, IS_VARLEN: tl.constexpr, ZERO_DQ: tl.constexpr):
    """delta for one block of query rows, for the atomic-dQ strategy (no dQ kernel runs).
    With ZERO_DQ, also zeroes those rows of the float32 dQ accumulator DQ_ACC (O's layout):
    one kernel and one host op fewer than a separate fill of the same bytes."""
    b, h, bt, q_start, seqlen_q, _, _ = _batch_head(tl.program_id(1), NHEADS, CU_Q, CU_Q, SEQLEN_Q, SEQLEN_Q,
                                                    IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_offset = b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m
    _store_delta(O, DO, DELTA, bt, h, q_start, start_m, seqlen_q, row_offset, offs_m < seqlen_q,
                 stride_ob, stride_os, stride_oh, BLOCK_M, BLOCK_D, HEADDIM)
    if ZERO_DQ:
        _store_tile(DQ_ACC, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), bt, q_start + start_m, h,
                    stride_ob, stride_os, stride_oh, q_start + seqlen_q, BLOCK_M, BLOCK_D, HEADDIM, False)


def _launch_delta(out, dout, delta, lse_strides, nheads, seqlen_q, cu_seqlens_q=None, dq_acc=None):
    """delta = rowsum(dO * O) into delta (lse's layout) and, given dq_acc, zeros into it.

    out, dout [batch, seqlen_q, nheads, headdim] with one layout (packed varlen: batch 1 and
    cu_seqlens_q int32 [batch + 1]); dq_acc float32 in that layout too. In a packed batch
    dq_acc must be zeroed by the caller: rows past cu_seqlens_q[-1] belong to no sequence.
    """
    headdim = out.shape[-1]
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else out.shape[0]
    zero_dq = dq_acc is not None and not varlen
    launch_kernel(_attn_bwd_delta_kernel, (cdiv(seqlen_q, _DELTA_BLOCK_M), batch * nheads), (
        out, dout, delta, dq_acc if zero_dq else delta, cu_seqlens_q if varlen else delta,
        out.stride(0), out.stride(1), out.stride(2), *lse_strides, nheads, seqlen_q),
        dict(BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=max(next_power_of_2(headdim), 16), HEADDIM=headdim,
             IS_VARLEN=varlen, ZERO_DQ=zero_dq))


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, ALIBI, CU_Q, CU_K,
                        stride_qb, stride_qs, stride_qh,
                        stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh,
                        stride_ob, stride_os, stride_oh,
                        stride_lse_b, stride_lse_h, stride_alibi_b,
                        NHEADS, GROUP, SEQLEN_Q, SEQLEN_K,
                        window_left, window_right, qk_scale, softcap_scale, softmax_scale, seed, dropout_p,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        HEADDIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        IS_VARLEN: tl.constexpr, UPCAST_DOT: tl.constexpr, LAUNCH_GROUP: tl.constexpr):
    """dQ for one query block; O, dO and dQ share one layout (strides stride_o*)."""
    (b, h, hk, bt, q_start, seqlen_q, k_start, seqlen_k, start_m, offs_m, diag, alibi_slope,
     lo, full_lo, full_hi, hi) = _query_block(CU_Q, CU_K, ALIBI, stride_alibi_b, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K,
                                              window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                              HAS_ALIBI, IS_VARLEN, LAUNCH_GROUP)
    if IS_VARLEN:  # the grid covers the longest sequence of the batch
        if start_m >= seqlen_q:
            return
    seed_bh = seed + b * NHEADS + h

    q = _load_tile(Q, bt, q_start + start_m, h, stride_qb, stride_qs, stride_qh, q_start + seqlen_q,
                   BLOCK_M, BLOCK_D, HEADDIM, False)
    row_offset = b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start + offs_m
    in_seq = offs_m < seqlen_q
    do, delta = _store_delta(O, DO, DELTA, bt, h, q_start, start_m, seqlen_q, row_offset, in_seq,
                             stride_ob, stride_os, stride_oh, BLOCK_M, BLOCK_D, HEADDIM)
    # Rows past the sequence get lse = +inf, so their P is 0 whatever their scores.
    lse2 = tl.load(LSE + row_offset, mask=in_seq, other=float("inf")) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_blocks(dq, q, do, lse2, delta, K, V, bt, hk, k_start, offs_m, lo, full_lo,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
                             seed_bh, dropout_p, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                             BLOCK_N, BLOCK_D, HEADDIM, UPCAST_DOT)
    dq = _attn_bwd_dq_blocks(dq, q, do, lse2, delta, K, V, bt, hk, k_start, offs_m, full_lo, full_hi,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
                             seed_bh, dropout_p, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                             BLOCK_N, BLOCK_D, HEADDIM, UPCAST_DOT)
    dq = _attn_bwd_dq_blocks(dq, q, do, lse2, delta, K, V, bt, hk, k_start, offs_m, full_hi, hi,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, alibi_slope,
                             seed_bh, dropout_p, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                             BLOCK_N, BLOCK_D, HEADDIM, UPCAST_DOT)
    dq = dq * softmax_scale
    _store_tile(DQ, dq.to(q.dtype), bt, q_start + start_m, h, stride_ob, stride_os, stride_oh,
                q_start + seqlen_q, BLOCK_M, BLOCK_D, HEADDIM, False)


@triton.jit
def _attn_bwd_dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, bt, b, h, q_start, offs_n, lo, hi,
                          stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh,
                          stride_lse_b, stride_lse_h,
                          seqlen_q, seqlen_k, diag, window_left, window_right,
                          qk_scale, softcap_scale, softmax_scale, alibi_slope, seed, dropout_p,
                          MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Accumulate P^T dO into dv and dS^T Q into dk over query blocks [lo, hi) of head h;
    with ATOMIC_DQ also add dS K (scaled) into the float32 DQ_ACC (dO's layout; with DQ_TMA
    a tensor descriptor over it, [batch, seqlen, nheads, headdim] in blocks of [1, BLOCK_M,
    1, BLOCK_D])."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_base = b.to(tl.int64) * stride_lse_b + h.to(tl.int64) * stride_lse_h + q_start
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(Q, bt, q_start + start_m, h, stride_qb, stride_qs, stride_qh, q_start + seqlen_q,
                       BLOCK_M, BLOCK_D, HEADDIM, False)
        do = _load_tile(DO, bt, q_start + start_m, h, stride_ob, stride_os, stride_oh, q_start + seqlen_q,
                        BLOCK_M, BLOCK_D, HEADDIM, False)
        in_seq = offs_m < seqlen_q
        lse2 = tl.load(LSE + row_base + offs_m, mask=in_seq, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=in_seq, other=0.0)
        kq = _dot(k, tl.trans(q), None, UPCAST_DOT)  # S^T: [BLOCK_N, BLOCK_M]
        s = _scores_log2(kq, offs_m[None, :], offs_n[:, None], seqlen_k, diag, window_left, window_right,
                         qk_scale, softcap_scale, alibi_slope,
                         MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI)
        p = tl.exp2(s - lse2[None, :])
        dp = _dot(v, tl.trans(do), None, UPCAST_DOT)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_m[None, :], offs_n[:, None], seqlen_k, dropout_p)
            p_kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_kept = p
        dv = _dot(p_kept.to(do.dtype), do, dv, UPCAST_DOT)
        ds = p * (dp - delta[None, :])
        if HAS_SOFTCAP:
            t = _tanh(kq * softcap_scale)
            ds = ds * (1.0 - t * t)
        ds = ds.to(q.dtype)
        dk = _dot(ds, q, dk, UPCAST_DOT)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(ds), k, None, UPCAST_DOT) * softmax_scale
            if DQ_TMA:
                # One bulk reduce-add through the TMA unit instead of BLOCK_M x BLOCK_D atomics
                # from the threads. The box clips at the tensor's edges; in a packed batch it
                # may reach the next sequence's first rows, which get exact zeros (rows past
                # this sequence have lse +inf, so P, dS and their dq rows are 0).
                DQ_ACC.atomic_add([bt, q_start + start_m, h, 0], tl.reshape(dq, [1, BLOCK_M, 1, BLOCK_D]))
            else:
                ptrs = (DQ_ACC + bt.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                        + (q_start + offs_m[:, None]).to(tl.int64) * stride_os + offs_d[None, :])
                tl.atomic_add(ptrs, dq, mask=in_seq[:, None] & (offs_d[None, :] < HEADDIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC, ALIBI, CU_Q, CU_K,
                          stride_qb, stride_qs, stride_qh,
                          stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh,
                          stride_ob, stride_os, stride_oh,
                          stride_dkb, stride_dks, stride_dkh,
                          stride_lse_b, stride_lse_h, stride_alibi_b,
                          NHEADS, NHEADS_K, GROUP, SEQLEN_Q, SEQLEN_K,
                          window_left, window_right, qk_scale, softcap_scale, softmax_scale, seed, dropout_p,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          HEADDIM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          IS_VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
                          UPCAST_DOT: tl.constexpr, LAUNCH_GROUP: tl.constexpr):
    """dK, dV for one key block of one kv head, summed over the query heads of its group;
    dK and dV share one layout (strides stride_dk*). With ATOMIC_DQ, also this key
    block's share of dQ, added into DQ_ACC. LAUNCH_GROUP orders the programs
    (_grid_position; under a causal mask the first key blocks are the longest)."""
    pid_n, pid_bh = _grid_position(LAUNCH_GROUP, False)
    b, hk, bt, q_start, seqlen_q, k_start, seqlen_k = _batch_head(pid_bh, NHEADS_K, CU_Q, CU_K, SEQLEN_Q, SEQLEN_K,
                                                                  IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if IS_VARLEN:
        if start_n >= seqlen_k:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    diag = seqlen_k - seqlen_q
    last_n = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = _query_block_range(start_n, last_n, seqlen_q, seqlen_k, diag,
                                                  window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    k = _load_tile(K, bt, k_start + start_n, hk, stride_kb, stride_ks, stride_kh, k_start + seqlen_k,
                   BLOCK_N, BLOCK_D, HEADDIM, False)
    v = _load_tile(V, bt, k_start + start_n, hk, stride_vb, stride_vs, stride_vh, k_start + seqlen_k,
                   BLOCK_N, BLOCK_D, HEADDIM, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(ALIBI + b * stride_alibi_b + h) * 1.4426950408889634
        seed_bh = seed + b * NHEADS + h
        dk, dv = _attn_bwd_dkdv_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, bt, b, h, q_start, offs_n, lo, full_lo,
            stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
            seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, softmax_scale,
            alibi_slope, seed_bh, dropout_p, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, DQ_TMA, BLOCK_M, BLOCK_D, HEADDIM, UPCAST_DOT)
        dk, dv = _attn_bwd_dkdv_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, bt, b, h, q_start, offs_n, full_lo, full_hi,
            stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
            seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, softmax_scale,
            alibi_slope, seed_bh, dropout_p, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, DQ_TMA, BLOCK_M, BLOCK_D, HEADDIM, UPCAST_DOT)
        dk, dv = _attn_bwd_dkdv_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, DQ_ACC, bt, b, h, q_start, offs_n, full_hi, hi,
            stride_qb, stride_qs, stride_qh, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
            seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_scale, softmax_scale,
            alibi_slope, seed_bh, dropout_p, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, DQ_TMA, BLOCK_M, BLOCK_D, HEADDIM, UPCAST_DOT)
    dk = dk * softmax_scale
    _store_tile(DK, dk.to(k.dtype), bt, k_start + start_n, hk, stride_dkb, stride_dks, stride_dkh,
                k_start + seqlen_k, BLOCK_N, BLOCK_D, HEADDIM, False)
    _store_tile(DV, dv.to(v.dtype), bt, k_start + start_n, hk, stride_dkb, stride_dks, stride_dkh,
                k_start + seqlen_k, BLOCK_N, BLOCK_D, HEADDIM, False)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim. dQ programs hold a query
# block and stream keys (BLOCK_N is the streamed one); dK/dV programs hold a key block and
# stream queries (BLOCK_M is streamed). Small streamed tiles keep the registers in check.
_DQ_CONFIGS = {
    64: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3)],
    # At head dim 128 none spills on triton 3.6 (scripts/compile_check.py --candidates,
    # results/tuning/candidate_resources_triton36.txt); (64, 32, 4, 3) fits two programs
    # per SM (154 registers, 80 KB of shared memory).
    128: [(128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
    256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
}
# (32, 64, 4, 3) is left out: on the H100 with triton 3.6 it gave dK 5% off at head dim 128
# (causal GQA, benchmarks/debug_launch_configs.py) while every other configuration agreed.
# With transposed tiles, (64, 128, 8, 2|3) won every row of the d128 backward benchmark
# for both strategies (results/tuning/bwd_choices_b3eb523.json); (64, 64, 4, 3) and
# (32, 128, 4, 3) never did, so they are no longer timed there (each whole-backward
# candidate costs a compile and a timing per problem class).
# Compiled as a launch specializes them (16-byte aligned pointers, strides divisible by 16:
# scripts/compile_check.py --candidates,
# results/tuning/candidate_resources_triton36.txt; the kilobytes of spills read there
# before came from compiling without that specialization, which also left the Q/dO tile
# loads unvectorized and unpipelined), the split strategy's candidates spill 0-56 bytes a
# thread, the atomic ones 40-360 with per-thread atomics and 0-272 with TMA reduces (16-32
# KB more shared memory for the staging tile). Every 8-warp candidate runs one program per
# SM (130-214 KB of shared memory); (64, 64, 4, 2) fits two 4-warp programs per SM (97 KB,
# 255 registers), so one program's softmax can overlap the other's matmuls. On the H200
# the tuner chose the atomic strategy's (64, 128, 8, 3) with TMA reduces for every row of
# the d128 causal benchmark before the Gluon backward joined the tuning; since its launch
# groups (0ca08a7) the Gluon launch wins every row it is offered, and (64, 128, 8, 3)
# with TMA reduces kept (2, 48, 48, 1024) while that row was below _GLUON_BWD_MIN_FLOPS
# (results/attention_bwd_nvidia-h200_2026-12-02.json, 31600a5).
_DKDV_CONFIGS = {
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
    256: [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
}
_DELTA_BLOCK_M = 64
# The warp-specialized Gluon backward (gluon_bwd.py, Hopper only; atomic dQ) competes in
# the dK/dV tuning for the calls the Gluon forward covers, from the forward's size on.
# MODELACCEL_GLUON_BWD=0 leaves it out.
# Below ~3e10 FLOPs (4 b h sq sk d) the backward's GPU time is below the host's time per
# call. From 3e10 to 1e11 it was not offered either while every call built its launch:
# the Gluon launch costs more host time (five descriptors), and on (2, 48, 48, 1024) it
# tuned level with Triton on the GPU but measured 343 against 292 us per call once the host
# fell behind (benchmarks/profile_host.py bwd). Repeated training calls replay their
# launches (interface._replayed), descriptors included, so it is offered there again: its
# per-tile dq_tma launch ran that row at 246.6 TFLOPS, the tuned launcher (Triton there)
# at 203.1 (results/tuning/gluon_bwd_dq_tma_swizzled_h200_58d073a.json).
_GLUON_BWD_MIN_FLOPS = 3e10


def _gluon_bwd_module():
    """gluon_bwd, or None where the Gluon backward is not offered (launch.gluon_kernels)."""
    return gluon_kernels("gluon_bwd")


def _gluon_bwd_candidates(q, k, v, window, softcap, alibi_slopes, dropout_p, varlen):
    """The Gluon backward's dK/dV tuning candidates for this call, or ()."""
    flops = 4 * q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * q.shape[3] if not varlen else 0
    if not q.is_cuda or flops < _GLUON_BWD_MIN_FLOPS or interpreting():
        return ()
    gluon_bwd = _gluon_bwd_module()
    if gluon_bwd is None:
        return ()
    from .gluon_fwd import gluon_forward_applies
    if not gluon_forward_applies(q, k, v, window, softcap, alibi_slopes, dropout_p, varlen):
        return ()
    return gluon_bwd.GLUON_BWD_CANDIDATES[q.shape[-1]]


_dq_tuner = LaunchTuner("attention_bwd_dq")
_dkdv_tuner = LaunchTuner("attention_bwd_dkdv")


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0, cu_seqlens_q=None,
                        cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, atomic_dq=None,
                        dq_tma=None, blocks=None, grads=None):
    """Gradients of the forward pass with the same arguments.

    Args:
        dout: gradient of out, shaped like q. out, lse: what flash_attn_forward returned.
        Other arguments as flash_attn_forward's.
        atomic_dq: False: the deterministic two-kernel backward (bit-identical gradients).
            True: dQ accumulated with float32 atomic adds (5 matmuls per tile pair, not
            bit-reproducible). None: on a GPU, whichever of the two measures faster for
            this problem class; under the interpreter or with `blocks`, False.
        dq_tma: with atomic dQ, add each tile through the TMA unit (a bulk reduce-add of a
            tensor descriptor) instead of per-element atomics. None: tuned where TMA works
            (Hopper, 16-byte aligned); under the interpreter or with `blocks`, False.
        blocks: ((BLOCK_M, BLOCK_N[, num_warps, num_stages]) for dQ, the same for dK/dV)
            to skip tuning (tests, experiments); the interpreter uses 16x16 blocks.
        grads: optional preallocated contiguous (dq, dk, dv) (tests poison them).
    Returns:
        dq shaped like q, dk and dv shaped like k (summed over each GQA group), in q's dtype.
    """
    varlen = cu_seqlens_q is not None
    nheads, headdim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    # dO, dQ and O share one layout, dK and dV another: fewer strides to pass.
    dout = dout.contiguous()
    out = out.contiguous()
    if grads is None:
        grads = (empty_buffer(q.shape, q.dtype, q.device), empty_buffer(k.shape, k.dtype, k.device),
                 empty_buffer(k.shape, v.dtype, v.device))
    dq, dk, dv = grads
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        t4 = [t.unsqueeze(0) for t in (q, k, v, out, dout, dq, dk, dv)]
        lse_strides = (0, lse.stride(0))
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        t4 = [q, k, v, out, dout, dq, dk, dv]
        lse_strides = (lse.stride(0), lse.stride(1))
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = t4
    if q.numel() == 0 or k.numel() == 0 or batch == 0 or seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = empty_buffer(lse.shape, lse.dtype, lse.device)
    left, right = window_size
    if causal:
        right = 0
    block_d = max(next_power_of_2(headdim), 16)
    alibi_stride_b = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    interp = interpreting()
    common_args = (left, right, softmax_scale * LOG2E if softcap <= 0 else softcap * LOG2E,
                   softmax_scale / softcap if softcap > 0 else 1.0, softmax_scale, seed, dropout_p)
    flags = dict(BLOCK_D=block_d, HEADDIM=headdim, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0,
                 HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0,
                 IS_VARLEN=varlen, UPCAST_DOT=interp and q.dtype == torch.bfloat16)
    alibi = alibi_slopes if alibi_slopes is not None else lse
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    dq_acc = None

    def launch_dq(config):
        bm, bn, warps, stages, _ = config
        extra = {} if interp else {"num_warps": warps, "num_stages": stages}
        launch_kernel(_attn_bwd_dq_kernel, (cdiv(seqlen_q, bm), batch * nheads), (
            q4, k4, v4, o4, do4, dq4, lse, delta, alibi, cu_q, cu_k,
            q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
            v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
            *lse_strides, alibi_stride_b, nheads, nheads // nheads_k, seqlen_q, seqlen_k, *common_args),
            dict(BLOCK_M=bm, BLOCK_N=bn, LAUNCH_GROUP=launch_group(right), **flags, **extra))

    def launch_dkdv(config, dq_config):
        """The rest of the backward after the tuned dQ launch; config's last field picks
        the atomic-dQ strategy, which replaces the dQ kernel by the delta kernel. A
        ("gluon_ws", stages, block_q) config runs the whole backward in Gluon instead."""
        if config[0] == "gluon_ws":
            _gluon_bwd_module().flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, softmax_scale, right == 0,
                                                             *config[1:], grads=(dq, dk, dv))
            return
        nonlocal dq_acc
        bm, bn, warps, stages, use_tma, atomic = config
        extra = {} if interp else {"num_warps": warps, "num_stages": stages}
        dq_target = lse
        if atomic:
            # dO's layout (contiguous, shaped like q), so the kernels reuse its strides; the
            # delta kernel zeroes it (a packed batch's rows past its last sequence: here).
            dq_acc = torch.zeros(do4.shape, dtype=torch.float32, device=q.device) if varlen \
                else empty_buffer(do4.shape, torch.float32, q.device)
            dq_target = dq_acc
            if use_tma:
                dq_target = TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), [1, bm, 1, block_d])
            _launch_delta(o4, do4, delta, lse_strides, nheads, seqlen_q, cu_seqlens_q, dq_acc)
        else:
            launch_dq(dq_config)
        launch_kernel(_attn_bwd_dkdv_kernel, (cdiv(seqlen_k, bn), batch * nheads_k), (
            q4, k4, v4, do4, dk4, dv4, lse, delta, dq_target, alibi, cu_q, cu_k,
            q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
            v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
            dk4.stride(0), dk4.stride(1), dk4.stride(2),
            *lse_strides, alibi_stride_b, nheads, nheads_k, nheads // nheads_k, seqlen_q, seqlen_k,
            *common_args), dict(BLOCK_M=bm, BLOCK_N=bn, ATOMIC_DQ=atomic, DQ_TMA=use_tma,
                                LAUNCH_GROUP=launch_group(right), **flags, **extra))
        if atomic:
            copy_into(dq, dq_acc.view(dq.shape))

    if interp or blocks is not None:
        dq_config, dkdv_config = ((*b, 4, 2)[:4] for b in (blocks or ((16, 16), (16, 16))))
        dq_config += (False,)
        dkdv_config += (bool(atomic_dq and dq_tma), bool(atomic_dq))
    else:
        key = (q.dtype, headdim, left >= 0, right >= 0, softcap > 0, alibi_slopes is not None, dropout_p > 0,
               varlen, size_bucket(seqlen_q), size_bucket(seqlen_k), size_bucket(batch * nheads),
               size_bucket(nheads // nheads_k))
        dq_config = _dq_tuner.choose(key, config_candidates(_DQ_CONFIGS, block_d, False), launch_dq)
        strategies = (False, True) if atomic_dq is None else (bool(atomic_dq),)
        tma_choices = (False, True) if dq_tma is None else (bool(dq_tma),)
        if not tma_usable(do4):  # the accumulator is laid out as dO, contiguous
            tma_choices = (False,)
        candidates = [c[:4] + (t, a) for a in strategies for t in (tma_choices if a else (False,))
                      for c in config_candidates(_DKDV_CONFIGS, block_d, False)]
        gluon = _gluon_bwd_candidates(q, k, v, (left, right), softcap, alibi_slopes, dropout_p, varlen) \
            if atomic_dq is not False and dq_tma is None else ()
        # Timed as the whole backward, so the two strategies (and the Gluon kernel) compare
        # like for like. The key marks classes with Gluon candidates, as the forward's does.
        dkdv_config = _dkdv_tuner.choose(key + (atomic_dq, dq_tma) + (("gluon",) if gluon else ()),
                                         candidates + list(gluon), lambda c: launch_dkdv(c, dq_config))
    launch_dkdv(dkdv_config, dq_config)
    return dq, dk, dv

"""The attention backward in Gluon for Hopper, warp-specialized as the forward in
gluon_fwd.py is; flash_bwd.flash_attn_backward offers it to its dK/dV tuner as candidates.
Correct on the H200 (GPU tests against the float32 reference). With its programs launched
in groups of 8 kv batch-heads (LAUNCH_GROUP) it wins the tuning on every d128 causal row
of the backward benchmark it is offered (results/attention_bwd_dcd8001_nvidia-h200_2026-12-01.md,
dcd8001: 250-431 TFLOPS, 1.21-1.40x SDPA FlashAttention-2 from 1024 to 16384 tokens, its
per-tile and host-dealt persistent launches chosen per row).

Why: the Triton backward measured 0.73-0.76x cuDNN on the H200 and 1.09-1.28x
FlashAttention-2 (issue 3 asks 1.3x); in Triton 3.6 every non-accumulating wgmma is waited
on right after it is issued, the same limit the forward had until its Gluon version
matched cuDNN.

One program owns 128 key rows of one (batch, kv head): K and V stay in shared memory, dK
and dV in the registers of two consumer warpgroups (64 key rows each, 240 registers by
setmaxnreg). A producer warp streams the query blocks that see those keys (BLOCK_Q rows of
Q and dO per step, every query head of the GQA group) through a ring of STAGES slots. Per
step a consumer computes, with S^T = K Q^T kept transposed (keys as wgmma's M):
    S^T, dP^T = V dO^T            (issued together)
    P^T = exp2(S^T - lse), dS^T = P^T (dP^T - delta), both to shared memory
    dV += P^T dO, dK += dS^T Q
    dQ^T[64 head-dim rows] = K^T dS^T over all 128 keys (both warpgroups' dS^T)
and adds its dQ^T rows (scaled) into a float32 accumulator with 16-byte atomics, or with
dq_tma as TMA reduce-adds of the tile staged in shared memory (6-13% faster at 64-row
steps, two runs apart; GLUON_BWD_CANDIDATES). Each
dQ element is added once per step (the first version added one partial per warpgroup:
twice the atomics, 0.69-0.85x the Triton backward).
delta = rowsum(dO * O) comes from flash_bwd's Triton delta kernel. A persistent launch
(one program per SM running tile after tile; GLUON_BWD_PERSISTENT_CONFIGS) keeps the Q/dO
ring running across tiles and loads the next tile's K/V as soon as the last one's products
are done; its tiles are dealt on the host as the hardware deals a per-tile grid
(_tile_schedule), which keeps launch groups' L2 locality without the static deal's
imbalance under a causal mask.

Scope: dense, fp16/bf16, head dim 64 or 128, GQA, causal (bottom-right) or not; no window,
softcap, ALiBi, dropout or varlen. Layouts as gluon_fwd._row_view takes them.
"""

import heapq

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .flash_bwd import _launch_delta
from .flash_fwd import LOG2E
from .gluon_fwd import _row_view, _sm_count, _shared_layout, _snake_order, _tile_position, _tma_load
from .launch import cached_buffer, cdiv, copy_into, empty_buffer, launch_kernel

if hasattr(tma, "async_atomic_add"):  # triton 3.9
    _tma_reduce_add = tma.async_atomic_add
else:  # triton 3.6 builds the same op (ttng.async_tma_reduce) but has no Gluon function for it
    from triton._C.libtriton import ir as _ir
    from triton.experimental.gluon.language._core import builtin as _builtin

    @_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """Add the shared-memory tile src into global memory at coord of tensor_desc (TMA
        reduce, cp.reduce.async.bulk.tensor)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

# A barrier of the calling warps (a partition's own, inside warp_specialize): thread_barrier
# in triton 3.6, barrier from 3.9.
_warps_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

KV_ROWS = 64  # key rows per consumer warpgroup (wgmma's M for S^T, dK, dV); host side
_KV_ROWS: gl.constexpr = gl.constexpr(KV_ROWS)
# Query rows per step by head dim (the default; GLUON_BWD_CONFIGS sweeps others).
Q_ROWS = {64: 64, 128: 64}
_CONSUMER_REGS: gl.constexpr = gl.constexpr(240)
_PRODUCER_REGS: gl.constexpr = gl.constexpr(24)
_MAXNREG = 168  # as gluon_fwd: leaves the default partition 240 registers
# dq_tma's shared-memory dQ tiles: two 128-byte-swizzled [BLOCK_Q, 32] boxes per warpgroup,
# which the wgmma accumulator's scalar stores fill without bank conflicts. One unswizzled
# [BLOCK_Q, 64] box (a row of 64 float32 is wider than the swizzle) took them 4-way
# conflicted and ran 4-7% slower at 64-row steps
# (results/tuning/gluon_bwd_dq_tma_swizzled_h200_58d073a.json).
_DQ_TILE_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)


@gluon.jit
def _bwd_tile(i, SCHED, n_tiles, nbh, n_nblocks, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, K_ROWS_B, K_ROWS_H, K_COLS_H,
              V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_Q: gl.constexpr, CAUSAL: gl.constexpr, LAUNCH_GROUP: gl.constexpr,
              PERSISTENT: gl.constexpr, SCHEDULED: gl.constexpr):
    """The tile at position i of this program's list (_tile_range, _tile_at), 128 key rows
    of one (batch, kv head) numbered in launch order (gluon_fwd._tile_position; under a
    causal mask the first key blocks are the longest): b, hk, its first key row, the first
    query row that sees it (lo), its query blocks per head (n_m) and steps over the GQA group
    (n_steps), and where its K and V start in their 2D views."""
    pid_bh, pid_n = _tile_position(_tile_at(i, SCHED, n_tiles, PERSISTENT, SCHEDULED), nbh, n_nblocks,
                                   LAUNCH_GROUP)
    b = pid_bh // NHEADS_K
    hk = pid_bh % NHEADS_K
    start_n = pid_n * (2 * _KV_ROWS)
    lo = 0
    if CAUSAL:
        # The first query that sees key start_n is start_n - (SEQLEN_K - SEQLEN_Q).
        lo = (gl.maximum(start_n - SEQLEN_K + SEQLEN_Q, 0) // BLOCK_Q) * BLOCK_Q
    n_m = gl.maximum(SEQLEN_Q - lo + BLOCK_Q - 1, 0) // BLOCK_Q
    return (b, hk, start_n, lo, n_m, (NHEADS // NHEADS_K) * n_m, b * K_ROWS_B + hk * K_ROWS_H + start_n,
            hk * K_COLS_H, b * V_ROWS_B + hk * V_ROWS_H + start_n, hk * V_COLS_H)


@gluon.jit
def _tile_range(SCHED, n_tiles, SCHEDULED: gl.constexpr):
    """This program's positions in its list of tiles: its slice of SCHED's table (a deal
    made on the host, _tile_schedule), else the grid-stride positions."""
    if SCHEDULED:
        first = gl.load(SCHED + gl.program_id(0))
        last = gl.load(SCHED + gl.program_id(0) + 1)
        stride = 1
    else:
        first = gl.program_id(0)
        last = n_tiles
        stride = gl.num_programs(0)
    return first, last, stride


@gluon.jit
def _tile_at(i, SCHED, n_tiles, PERSISTENT: gl.constexpr, SCHEDULED: gl.constexpr):
    """The tile (in launch order) at position i of this program's list (_tile_range); a
    per-tile grid's program i runs tile i."""
    if SCHEDULED:
        t = gl.load(SCHED + gl.num_programs(0) + 1 + i)
    elif PERSISTENT:
        t = _snake_order(i, n_tiles)
    else:
        t = i
    return t


@gluon.jit
def _bwd_load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, kv_free, local, k_row0, k_col, v_row0, v_col,
                 KV_BUFS: gl.constexpr):
    """Both warpgroups' halves of K and V of this program's tile `local` into buffer
    local % KV_BUFS, once both warpgroups are done with the tile that used it last."""
    buf = local % KV_BUFS
    bar = kv_bar.index(buf)
    mbarrier.wait(kv_free.index(buf), ((local // KV_BUFS) & 1) ^ 1)  # a fresh mbarrier reads as phase 1 done
    mbarrier.expect(bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for i in gl.static_range(2):
        _tma_load(k_desc, [k_row0 + i * _KV_ROWS, k_col], bar, k_smem.index(buf * 2 + i))
        _tma_load(v_desc, [v_row0 + i * _KV_ROWS, v_col], bar, v_smem.index(buf * 2 + i))


@gluon.jit
def _bwd_produce_tile(i, it, local, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                      delta_smem, kv_bar, kv_free, ready, empty, LSE, DELTA, SCHED, stride_lse_b, stride_lse_h, NHEADS,
                      NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                      V_ROWS_B, V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, nbh, n_nblocks, n_tiles,
                      BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, LAUNCH_GROUP: gl.constexpr,
                      KV_BUFS: gl.constexpr, PERSISTENT: gl.constexpr, SCHEDULED: gl.constexpr):
    """The producer's work for tile position i (_bwd_producer), its steps at ring positions
    it.. and its K/V in buffer local % KV_BUFS; returns the tile's steps."""
    row_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[BLOCK_Q // 32], threads_per_warp=[32],
                                                warps_per_cta=[1], order=[0])
    rows0 = gl.arange(0, BLOCK_Q, layout=row_layout)
    b, hk, start_n, lo, n_m, n_steps, k_row0, k_col, v_row0, v_col = _bwd_tile(
        i, SCHED, n_tiles, nbh, n_nblocks, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, K_ROWS_B, K_ROWS_H, K_COLS_H,
        V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_Q, CAUSAL, LAUNCH_GROUP, PERSISTENT, SCHEDULED)
    group = NHEADS // NHEADS_K
    if n_steps == 0:
        _bwd_load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, kv_free, local, k_row0, k_col, v_row0, v_col,
                     KV_BUFS)
    for t in range(n_steps):
        g = it + t
        slot = g % STAGES
        mbarrier.wait(empty.index(slot), ((g // STAGES) & 1) ^ 1)  # a fresh mbarrier reads as phase 1 done
        h = hk * group + t // n_m
        m = lo + (t % n_m) * BLOCK_Q
        bar = ready.index(slot)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [b * Q_ROWS_B + h * Q_ROWS_H + m, h * Q_COLS_H], bar, q_smem.index(slot))
        _tma_load(do_desc, [b * DO_ROWS_B + h * DO_ROWS_H + m, h * DO_COLS_H], bar, do_smem.index(slot))
        # The consumers read lse and delta from shared memory when they need them: loaded
        # from global memory there, each took 16 registers a thread through the step.
        rows = m + rows0
        in_q = rows < SEQLEN_Q
        row_base = b.to(gl.int64) * stride_lse_b + h.to(gl.int64) * stride_lse_h
        lse_smem.index(slot).store(gl.load(LSE + row_base + rows, mask=in_q, other=float("inf"))
                                   * 1.4426950408889634)
        delta_smem.index(slot).store(gl.load(DELTA + row_base + rows, mask=in_q, other=0.0))
        mbarrier.arrive(bar, count=1)
        if t == 0:
            _bwd_load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, kv_free, local, k_row0, k_col, v_row0,
                         v_col, KV_BUFS)
    return n_steps


@gluon.jit
def _bwd_producer(wg: gl.constexpr, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem,
                  lse_smem, delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc,
                  dq_smem, LSE, DELTA, SCHED, stride_dkb, stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS,
                  NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B,
                  V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh, n_nblocks, n_tiles,
                  HEAD_D: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  LAUNCH_GROUP: gl.constexpr, KV_BUFS: gl.constexpr, PERSISTENT: gl.constexpr, SCHEDULED: gl.constexpr,
                  SKIP_IDLE: gl.constexpr, DQ_TMA: gl.constexpr):
    """Per tile of this program: Q and dO of every step into the ring by TMA, and the
    step's lse (times log2 e; +inf past seqlen_q) and delta rows by plain loads into their
    own slots; a slot's mbarrier completes with the TMA bytes and a second arrival after
    those stores, and the slot is refilled once both warpgroups have released it. The ring
    runs on across tiles (position `it`). K and V load after the tile's first step, so that
    step's Q and dO are in flight while the last tile's keys finish. A per-tile launch
    (PERSISTENT False) runs one tile with its ring and buffer positions known at compile
    time, as before the persistent launches (the loop-carried ones spilled 96-112 bytes a
    thread at 64-row steps where 40 had). (wg is unused: the workers' signatures must
    match.)"""
    args = (q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, kv_bar, kv_free,
            ready, empty, LSE, DELTA, SCHED, stride_lse_b, stride_lse_h, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K,
            Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, DO_ROWS_B,
            DO_ROWS_H, DO_COLS_H, nbh, n_nblocks, n_tiles)
    if PERSISTENT:
        it = 0
        local = 0
        first, last, stride = _tile_range(SCHED, n_tiles, SCHEDULED)
        for i in range(first, last, stride):
            it += _bwd_produce_tile(i, it, local, *args, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS, PERSISTENT,
                                    SCHEDULED)
            local += 1
    else:
        _bwd_produce_tile(gl.program_id(0), 0, 0, *args, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS, PERSISTENT,
                          SCHEDULED)


@gluon.jit
def _bwd_step(g, t, dk, dv, wg: gl.constexpr, IDLE: gl.constexpr, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem,
              lse_smem, delta_smem, ready, empty, ds_full, ds_free, DQ_ACC, dq_desc, dq_smem, b, hk, n0, lo, n_m, buf,
              NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, qk_scale, softmax_scale, HEAD_D: gl.constexpr,
              BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, KV_BUFS: gl.constexpr,
              DQ_TMA: gl.constexpr):
    """Step t of the tile (g of the program: ring slot and dS^T parity) of consumer
    warpgroup wg (_bwd_consume), returning dk, dv.

    IDLE (compile time, so no runtime branch holds a wgmma: one around the products gave
    wrong dq on the GPU, 049661e): none of this warpgroup's keys is visible to the step's
    queries under the causal mask, so its P^T and dS^T are zero. It skips the S^T, dP^T,
    dV and dK products, stores a zero dS^T for the other warpgroup's dQ^T product, and
    takes its own dQ^T rows from the other half of K alone."""
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_Q, 16])
    # dQ^T rows (head dim) per warpgroup: wgmma's M is 64, so at head dim 64 the first
    # warpgroup takes them all.
    D_ROWS: gl.constexpr = 64
    HAS_DQ: gl.constexpr = wg * D_ROWS < HEAD_D
    # Four contiguous head-dim values a thread: one 16-byte vector atomic instead of four.
    atomic_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[4, 1], threads_per_warp=[16, 2],
                                                   warps_per_cta=[1, 4], order=[0, 1])
    st_zero = gl.zeros([_KV_ROWS, BLOCK_Q], gl.float32, layout=st_layout)
    dqt_zero = gl.zeros([D_ROWS, BLOCK_Q], gl.float32, layout=st_layout)
    slot = g % STAGES
    par = g % 2
    h = hk * (NHEADS // NHEADS_K) + t // n_m
    m = lo + (t % n_m) * BLOCK_Q
    qs = q_smem.index(slot)
    dos = do_smem.index(slot)
    ds_wg = ds_smem.index(par * 2 + wg)
    mbarrier.wait(ready.index(slot), (g // STAGES) & 1)
    if IDLE:
        mbarrier.wait(ds_free.index(par), ((g // 2) & 1) ^ 1)  # a fresh mbarrier reads as phase 1 done
        ds_wg.store(st_zero.to(dtype))
        fence_async_shared()
        mbarrier.arrive(ds_full.index(par), count=1)
        mbarrier.wait(ds_full.index(par), (g // 2) & 1)
        if HAS_DQ:
            dqt_token = warpgroup_mma(k_smem.index(buf * 2 + 1 - wg).slice(wg * D_ROWS, D_ROWS, dim=1).permute((1, 0)),
                                      ds_smem.index(par * 2 + 1 - wg), dqt_zero, use_acc=False, is_async=True)
            dqt = warpgroup_mma_wait(num_outstanding=0, deps=[dqt_token])
    else:
        k_wg = k_smem.index(buf * 2 + wg)
        v_wg = v_smem.index(buf * 2 + wg)
        p_wg = p_smem.index(wg)
        st_token = warpgroup_mma(k_wg, qs.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        dpt_token = warpgroup_mma(v_wg, dos.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=[st_token])
        lse2 = lse_smem.index(slot).load(gl.SliceLayout(0, st_layout))
        s = st * qk_scale
        diag = SEQLEN_K - SEQLEN_Q
        needs_mask = n0 + _KV_ROWS > SEQLEN_K
        if CAUSAL:
            needs_mask = needs_mask | (n0 + _KV_ROWS - 1 > m + diag)
        if needs_mask:
            kv_rows = n0 + gl.arange(0, _KV_ROWS, layout=gl.SliceLayout(1, st_layout))
            keep = kv_rows[:, None] < SEQLEN_K
            if CAUSAL:
                q_cols = m + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, st_layout))
                keep = keep & (kv_rows[:, None] <= q_cols[None, :] + diag)
            s = gl.where(keep, s, float("-inf"))
        pt = gl.exp2(s - lse2[None, :])
        # P^T and dS^T go through shared memory (A operands there): as register operands
        # they held 32 more registers a thread and spilled at 64-row steps.
        p_wg.store(pt.to(dtype))
        fence_async_shared()
        dv_token = warpgroup_mma(p_wg, dos, dv, is_async=True)
        dpt = warpgroup_mma_wait(num_outstanding=1, deps=[dpt_token])
        delta = delta_smem.index(slot).load(gl.SliceLayout(0, st_layout))
        dst = (pt * (dpt - delta[None, :])).to(dtype)
        mbarrier.wait(ds_free.index(par), ((g // 2) & 1) ^ 1)  # a fresh mbarrier reads as phase 1 done
        ds_wg.store(dst)
        fence_async_shared()
        dk_token = warpgroup_mma(ds_wg, qs, dk, is_async=True)
        mbarrier.arrive(ds_full.index(par), count=1)
        mbarrier.wait(ds_full.index(par), (g // 2) & 1)
        if HAS_DQ:
            # dQ^T[rows] = K^T[rows, 128 keys] dS^T[128 keys, queries], over both halves of K.
            dqt_token = warpgroup_mma(k_smem.index(buf * 2).slice(wg * D_ROWS, D_ROWS, dim=1).permute((1, 0)),
                                      ds_smem.index(par * 2), dqt_zero, use_acc=False, is_async=True)
            dqt_token = warpgroup_mma(k_smem.index(buf * 2 + 1).slice(wg * D_ROWS, D_ROWS, dim=1).permute((1, 0)),
                                      ds_smem.index(par * 2 + 1), dqt_token, is_async=True)
            dv, dk, dqt = warpgroup_mma_wait(num_outstanding=0, deps=[dv_token, dk_token, dqt_token])
        else:
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=[dv_token, dk_token])
    mbarrier.arrive(empty.index(slot), count=1)  # this step's Q and dO are consumed
    mbarrier.arrive(ds_free.index(par), count=1)  # both dS^T halves read
    if HAS_DQ and DQ_TMA:
        # The tile through shared memory and TMA reduce-adds (dQ rows [m, m + BLOCK_Q) of
        # head h, head-dim columns of this warpgroup), issued by one thread. Rows past
        # seqlen_q hold exact zeros (their P^T and dS^T are 0) and add into the next
        # sequence's rows, or fall off the tensor's end. The buffer is rewritten only once
        # the last step's reduce has read it.
        tma.store_wait(0)
        _warps_barrier()
        col = h * HEAD_D + wg * D_ROWS
        # Rows (head-dim half, query) by 32 head-dim columns: a relabelling of the
        # accumulator's registers (no data moves), stored into both swizzled boxes at once.
        halves = gl.permute(gl.reshape(dqt * softmax_scale, [2, D_ROWS // 2, BLOCK_Q]), [0, 2, 1])
        dq_smem.slice(wg * 2 * BLOCK_Q, 2 * BLOCK_Q).store(gl.reshape(halves, [2 * BLOCK_Q, D_ROWS // 2]))
        fence_async_shared()
        _warps_barrier()
        _tma_reduce_add(dq_desc, [b * SEQLEN_Q + m, col], dq_smem.slice(wg * 2 * BLOCK_Q, BLOCK_Q))
        _tma_reduce_add(dq_desc, [b * SEQLEN_Q + m, col + D_ROWS // 2], dq_smem.slice((wg * 2 + 1) * BLOCK_Q, BLOCK_Q))
    elif HAS_DQ:
        # Lanes along the head dim for the atomics, so each warp's adds are contiguous.
        dqt = gl.convert_layout(dqt * softmax_scale, atomic_layout)
        cols_q = m + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, atomic_layout))
        dq_rows = wg * D_ROWS + gl.arange(0, D_ROWS, layout=gl.SliceLayout(1, atomic_layout))
        dq_ptrs = (DQ_ACC + ((b.to(gl.int64) * SEQLEN_Q + cols_q[None, :]) * NHEADS + h) * HEAD_D
                   + dq_rows[:, None])
        gl.atomic_add(dq_ptrs, dqt, mask=cols_q[None, :] < SEQLEN_Q, sem="relaxed")
    return dk, dv


@gluon.jit
def _bwd_consume_tile(i, it, local, wg: gl.constexpr, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem,
                      delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc, dq_smem,
                      SCHED, stride_dkb, stride_dks, stride_dkh, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, K_ROWS_B,
                      K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, softmax_scale, nbh, n_nblocks,
                      n_tiles, HEAD_D: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                      LAUNCH_GROUP: gl.constexpr, KV_BUFS: gl.constexpr, PERSISTENT: gl.constexpr,
                      SCHEDULED: gl.constexpr, SKIP_IDLE: gl.constexpr, DQ_TMA: gl.constexpr):
    """Consumer warpgroup wg's work for tile position i (_bwd_consume), its steps at ring
    positions it.. and its K/V in buffer local % KV_BUFS; returns the tile's steps."""
    dtype: gl.constexpr = q_smem.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_D, 16])
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, acc_layout))
    b, hk, start_n, lo, n_m, n_steps, k_row0, k_col, v_row0, v_col = _bwd_tile(
        i, SCHED, n_tiles, nbh, n_nblocks, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, K_ROWS_B, K_ROWS_H, K_COLS_H,
        V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_Q, CAUSAL, LAUNCH_GROUP, PERSISTENT, SCHEDULED)
    n0 = start_n + wg * _KV_ROWS
    dk = gl.zeros([_KV_ROWS, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([_KV_ROWS, HEAD_D], gl.float32, layout=acc_layout)
    buf = local % KV_BUFS
    mbarrier.wait(kv_bar.index(buf), (local // KV_BUFS) & 1)
    if SKIP_IDLE and CAUSAL and wg == 1:
        # Steps s of a head with n0 > (its last query) + diag: s < (n0 - diag - lo) / BLOCK_Q.
        n_idle = gl.minimum(gl.maximum(n0 - SEQLEN_K + SEQLEN_Q - lo, 0) // BLOCK_Q, n_m)
        for gh in range(NHEADS // NHEADS_K):
            for busy in gl.static_range(2):  # the head's idle steps, then its busy ones
                for s in range(n_idle if busy else 0, n_m if busy else n_idle):
                    dk, dv = _bwd_step(it + gh * n_m + s, gh * n_m + s, dk, dv, wg, busy == 0, q_smem, do_smem, k_smem,
                                       v_smem, ds_smem, p_smem, lse_smem, delta_smem, ready, empty, ds_full, ds_free,
                                       DQ_ACC, dq_desc, dq_smem, b, hk, n0, lo, n_m, buf, NHEADS, NHEADS_K, SEQLEN_Q,
                                       SEQLEN_K, qk_scale, softmax_scale, HEAD_D, BLOCK_Q, STAGES, CAUSAL, KV_BUFS,
                                       DQ_TMA)
    else:
        for t in range(n_steps):
            dk, dv = _bwd_step(it + t, t, dk, dv, wg, False, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem,
                               delta_smem, ready, empty, ds_full, ds_free, DQ_ACC, dq_desc, dq_smem, b, hk, n0, lo, n_m,
                               buf, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K, qk_scale, softmax_scale, HEAD_D, BLOCK_Q,
                               STAGES, CAUSAL, KV_BUFS, DQ_TMA)
    mbarrier.arrive(kv_free.index(buf), count=1)  # every product with this tile's K and V is waited for

    rows_kv = n0 + gl.arange(0, _KV_ROWS, layout=gl.SliceLayout(1, acc_layout))
    offs = (b.to(gl.int64) * stride_dkb + rows_kv[:, None].to(gl.int64) * stride_dks + hk * stride_dkh
            + offs_d[None, :])
    in_kv = rows_kv[:, None] < SEQLEN_K
    gl.store(DK + offs, (dk * softmax_scale).to(dtype), mask=in_kv)
    gl.store(DV + offs, dv.to(dtype), mask=in_kv)
    return n_steps


@gluon.jit
def _bwd_consume(wg: gl.constexpr, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem,
                 lse_smem, delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc,
                 dq_smem, LSE, DELTA, SCHED, stride_dkb, stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS,
                 NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B,
                 V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh, n_nblocks, n_tiles,
                 HEAD_D: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 LAUNCH_GROUP: gl.constexpr, KV_BUFS: gl.constexpr, PERSISTENT: gl.constexpr, SCHEDULED: gl.constexpr,
                 SKIP_IDLE: gl.constexpr, DQ_TMA: gl.constexpr):
    """Per tile of this program, key rows start_n + 64 wg ... + 63 against every step's
    query block (_bwd_step): dK and dV in registers; dQ of the step over all 128 keys, this
    warpgroup's share of the head dim (rows D_ROWS wg.. of dQ^T, from both warpgroups' dS^T
    in shared memory), added to DQ_ACC. Key rows past seqlen_k are masked and not stored;
    query rows past seqlen_q (another sequence's, or TMA's zeros) have lse +inf, so their P,
    dS and dQ are 0 and their atomics are masked off. K and V are released (kv_free) once
    the tile's last products are waited for, so the next tile's load overlaps the dK/dV
    stores.

    Per step g of the program (dS^T double-buffered by g's parity): S^T, dP^T issued
    together; P^T to shared memory for dV += P^T dO; dS^T to shared memory for dK += dS^T Q;
    both warpgroups' dS^T in place (ds_full) -> dQ^T; a buffer is rewritten once both have
    read it (ds_free).

    SKIP_IDLE, under a causal mask: the second half's keys lie past every query of each
    head's first steps (n_idle: 1 of a tile's 64-row steps per head, 2 of its 32-row ones),
    which it runs idle (_bwd_step's IDLE), in a loop of their own. The first half always
    sees a key: `lo` is the first query block that sees key start_n."""
    args = (q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem, delta_smem, kv_bar, kv_free, ready, empty,
            ds_full, ds_free, DK, DV, DQ_ACC, dq_desc, dq_smem, SCHED, stride_dkb, stride_dks, stride_dkh, NHEADS,
            NHEADS_K, SEQLEN_Q, SEQLEN_K, K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale,
            softmax_scale, nbh, n_nblocks, n_tiles)
    if PERSISTENT:
        it = 0
        local = 0
        first, last, stride = _tile_range(SCHED, n_tiles, SCHEDULED)
        for i in range(first, last, stride):
            it += _bwd_consume_tile(i, it, local, wg, *args, HEAD_D, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS,
                                    PERSISTENT, SCHEDULED, SKIP_IDLE, DQ_TMA)
            local += 1
    else:
        # One tile, its ring and buffer positions known at compile time (_bwd_producer).
        _bwd_consume_tile(gl.program_id(0), 0, 0, wg, *args, HEAD_D, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS,
                          PERSISTENT, SCHEDULED, SKIP_IDLE, DQ_TMA)
    if DQ_TMA:
        tma.store_wait(0)  # the last reduce has read its tile before the program's memory goes


@gluon.jit
def _attn_bwd_ws_kernel(q_desc, k_desc, v_desc, do_desc, DK, DV, DQ_ACC, dq_desc, LSE, DELTA, SCHED, stride_dkb,
                        stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS, NHEADS_K, SEQLEN_Q, SEQLEN_K,
                        Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H,
                        DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh, n_nblocks, HEAD_D: gl.constexpr,
                        BLOCK_Q: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, DS_LAYOUT: gl.constexpr,
                        LAUNCH_GROUP: gl.constexpr, KV_BUFS: gl.constexpr, PERSISTENT: gl.constexpr,
                        SCHEDULED: gl.constexpr, SKIP_IDLE: gl.constexpr, DQ_TMA: gl.constexpr):
    """Tiles of 128 key rows of one (batch, kv head) against every query block that sees
    them: nbh = batch * nheads_k kv batch-heads of n_nblocks tiles each, in launch order
    (_bwd_tile). Program p takes tiles p, p + programs, ... (odd rounds reversed,
    gluon_fwd._snake_order): one each when the grid holds every tile, several (persistent)
    when it holds fewer. Descriptors over 2D row views (gluon_fwd._row_view): q_desc,
    do_desc in blocks [BLOCK_Q, HEAD_D], k_desc, v_desc in blocks [64, HEAD_D]. DK, DV
    [batch, seqlen_k, nheads_k, headdim] (strides given); DQ_ACC float32 [batch, seqlen_q,
    nheads, headdim] contiguous, zeroed; LSE, DELTA float32 [batch, nheads, seqlen_q].
    qk_scale = softmax_scale * log2(e)."""
    n_tiles = nbh * n_nblocks
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_Q, HEAD_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_Q, HEAD_D], do_desc.layout)
    # K and V halves by buffer (index 2 buffer + warpgroup): with two buffers the next
    # tile's keys load while the last tile's steps run.
    k_smem = gl.allocate_shared_memory(dtype, [2 * KV_BUFS, _KV_ROWS, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2 * KV_BUFS, _KV_ROWS, HEAD_D], v_desc.layout)
    # dS^T of both warpgroups, by step parity (index 2 parity + warpgroup); P^T per warpgroup.
    ds_smem = gl.allocate_shared_memory(dtype, [4, _KV_ROWS, BLOCK_Q], DS_LAYOUT)
    p_smem = gl.allocate_shared_memory(dtype, [2, _KV_ROWS, BLOCK_Q], DS_LAYOUT)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_Q], rows_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_Q], rows_layout)
    if DQ_TMA:  # each consumer warpgroup's two dQ boxes for its TMA reduces (dq_desc's blocks)
        dq_smem = gl.allocate_shared_memory(gl.float32, [4 * BLOCK_Q, 32], dq_desc.layout)
    else:
        dq_smem = delta_smem  # unused
    kv_bar = gl.allocate_shared_memory(gl.int64, [KV_BUFS, 1], mbarrier.MBarrierLayout())
    kv_free = gl.allocate_shared_memory(gl.int64, [KV_BUFS, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(KV_BUFS):
        mbarrier.init(kv_bar.index(i), count=1)
        mbarrier.init(kv_free.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)  # the TMA bytes' expect, and the lse/delta stores
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=2)
        mbarrier.init(ds_free.index(i), count=2)
    fence_async_shared()

    # Each partition gets its own tuple, written out (constexprs reach it as constexprs only so).
    gl.warp_specialize([
        (_bwd_consume, (0, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem,
                        delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc, dq_smem,
                        LSE, DELTA, SCHED, stride_dkb, stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS,
                        NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                        V_ROWS_B, V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh,
                        n_nblocks, n_tiles, HEAD_D, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS, PERSISTENT,
                        SCHEDULED, SKIP_IDLE, DQ_TMA)), 
        (_bwd_consume, (1, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem,
                        delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc, dq_smem,
                        LSE, DELTA, SCHED, stride_dkb, stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS,
                        NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                        V_ROWS_B, V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh,
                        n_nblocks, n_tiles, HEAD_D, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS, PERSISTENT,
                        SCHEDULED, SKIP_IDLE, DQ_TMA)), 
        (_bwd_producer, (0, q_desc, k_desc, v_desc, do_desc, q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, lse_smem,
                         delta_smem, kv_bar, kv_free, ready, empty, ds_full, ds_free, DK, DV, DQ_ACC, dq_desc, dq_smem,
                         LSE, DELTA, SCHED, stride_dkb, stride_dks, stride_dkh, stride_lse_b, stride_lse_h, NHEADS,
                         NHEADS_K, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                         V_ROWS_B, V_ROWS_H, V_COLS_H, DO_ROWS_B, DO_ROWS_H, DO_COLS_H, qk_scale, softmax_scale, nbh,
                         n_nblocks, n_tiles, HEAD_D, BLOCK_Q, STAGES, CAUSAL, LAUNCH_GROUP, KV_BUFS, PERSISTENT,
                         SCHEDULED, SKIP_IDLE, DQ_TMA)), 
    ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])


# (STAGES of the Q/dO ring, query rows per step) to sweep on the GPU, by head dim. Shared
# memory at head dim 128: K and V 64 KB, dS^T 4 and P^T 2 tiles of 64 x BLOCK_Q, Q and dO
# 2 x BLOCK_Q x 256 bytes a stage, lse and delta 2 x BLOCK_Q x 4: 140-231 KB
# (compile_check --gluon-bwd, triton 3.6). 64-row steps at head dim 128 spill 32 bytes a
# thread (104-208 while the consumers loaded lse and delta themselves), 32-row steps none.
GLUON_BWD_CONFIGS = {64: [(2, 64), (3, 64)], 128: [(2, 32), (3, 32), (2, 64), (3, 64)]}
# A third field True: the persistent launch; a fourth its launch group (default 0: snake
# order over grid order); a fifth its K/V buffers (default 1); a sixth True deals the tiles
# on the host (_tile_schedule); a seventh True skips the second warpgroup's causal idle
# steps (skip_idle); an eighth True adds dQ by TMA reduces (dq_tma; listed here although
# one of them is a per-tile launch, for the persistent tests' shapes and NaN-filled grads).
# Only the dealt launches in groups of 8 are tuning candidates (GLUON_BWD_CANDIDATES): the
# snake deal lost from 2K tokens, double-buffered K/V gained nothing (benchmarks/NOTES.md,
# twelfth session).
# An eighth field True: each step's dQ tile is added by one TMA reduce from shared memory
# (dq_tma), here for the launches the tuner took at dcd8001 (the dealt 32-row idle-skipping
# one at 1K, the dealt 64-row one at 2K, 8K and 16K, the per-tile 64-row one at 4K).
_DQ_TMA_CONFIGS = [(2, 32, True, 8, 1, True, True, True), (2, 64, True, 8, 1, True, False, True),
                   (2, 64, False, 8, 1, False, False, True)]
GLUON_BWD_PERSISTENT_CONFIGS = {
    64: [(2, 64, True), (2, 64, False, 8, 1, False, False, True)],
    128: [(2, 32, True), (2, 64, True), (2, 32, True, 8), (2, 64, True, 8), (2, 32, True, 0, 2), (2, 32, True, 8, 2),
          (2, 32, True, 8, 1, True), (2, 64, True, 8, 1, True), (2, 32, True, 0, 1, True),
          (2, 32, True, 8, 1, True, True), (2, 64, True, 8, 1, True, True), *_DQ_TMA_CONFIGS]}
# kv batch-heads per launch group (gluon_fwd._tile_position); 0: grid order. Groups of 8
# measured 1.02-1.17x grid order's speed on every row of the sweep gluon_fwd.LAUNCH_GROUP
# cites (geomean 1.085x; 4: 1.080x, 16: 1.079x, 32: 1.073x): +15-17% at 1024-2048 tokens,
# where the Triton backward had been the faster one.
LAUNCH_GROUP = 8
# As flash_bwd's dK/dV tuning candidates, by head dim: the per-tile launches, and at head dim
# 128 the persistent ones dealt on the host in launch groups of 8, which ran 2-6% ahead of
# the per-tile launch from 1K to 4K tokens and 1-3% behind at GQA 32/8 8K
# (results/tuning/quick_bwd_persistent_h200_708a85b.json).
GLUON_BWD_CANDIDATES = {d: [("gluon_ws", *c) for c in configs] for d, configs in GLUON_BWD_CONFIGS.items()}
GLUON_BWD_CANDIDATES[128] += [("gluon_ws", 2, 64, True, 8, 1, True), ("gluon_ws", 2, 32, True, 8, 1, True)]
# The 32-row dealt launch with the causal idle steps skipped ran 0.3-0.6% ahead of the same
# launch without at 1K-4K tokens (results/tuning/quick_bwd_idle_h200_4ac63c0.json); the
# 64-row one 1-6% behind (more spills), so only the first is offered.
GLUON_BWD_CANDIDATES[128] += [("gluon_ws", 2, 32, True, 8, 1, True, True)]
# dQ by TMA reduces (dq_tma) at 64-row steps: the dealt persistent launch ran 5.0-7.0% ahead
# of its atomic twin on every square row from 1K to 16K tokens (and the 48-head one), 2.2%
# at GQA 32/8 8K; the per-tile one 1.7-7.1% ahead except at 4K (6.1% behind)
# (benchmarks/gluon_bwd.py at 6b1c7a4, untuned, results/tuning/gluon_bwd_dq_tma_h200_6b1c7a4.json).
# Staged in swizzled boxes (58d073a) they gained another 3.8-6.5% (dealt) and 1.3-8.9%
# (per-tile) on every row, the dealt one on the 48-head row excepted (-16%, one run)
# (results/tuning/gluon_bwd_dq_tma_swizzled_h200_58d073a.json).
# At 32-row steps it was 1.0% behind to 1.7% ahead (either staging), so those are not offered.
# Only the per-tile launch is: the dealt one ran two of fourteen rows 16-23% slow (the 48-head
# row in that sweep; at 1K, where the tuner had taken it, 213.7 TFLOPS in the benchmark
# against 277.9 in the sweep, results/tuning/bench_bwd_h200_77bf272.log), while the per-tile
# one ran ahead of the dealt one-box launch on every row of the sweep.
GLUON_BWD_CANDIDATES[128] += [("gluon_ws", 2, 64, False, 8, 1, False, False, True)]


def config_name(config):
    """A launch configuration's name (benchmarks, test ids): gluon_s{stages}q{query rows},
    then p for persistent launches, G{group} for the launch group, K{buffers} for the K/V
    buffers, S for tiles dealt on the host, I for causal idle steps skipped and T for dQ
    added by TMA reduces. config: a GLUON_BWD_*CONFIGS entry, or a candidate without its
    leading "gluon_ws"."""
    stages, block_q, *rest = config
    return (f"gluon_s{stages}q{block_q}{'p' if rest and rest[0] else ''}"
            f"{f'G{rest[1]}' if len(rest) > 1 else ''}"
            f"{f'K{rest[2]}' if len(rest) > 2 else ''}"
            f"{'S' if len(rest) > 3 and rest[3] else ''}"
            f"{'I' if len(rest) > 4 and rest[4] else ''}"
            f"{'T' if len(rest) > 5 and rest[5] else ''}")


# A tile's fixed cost in the host's deal (_tile_schedule), in query rows of work: its K/V
# wait and dK/dV stores, about two 64-row steps.
_TILE_OVERHEAD_ROWS = 128
_schedules = {}


def _host_tile_position(t, nbh, nblocks, launch_group):
    """gluon_fwd._tile_position on the host."""
    if launch_group == 0:
        return t % nbh, t // nbh
    first = t // (launch_group * nblocks) * launch_group
    size = min(nbh - first, launch_group)
    rest = t - first * nblocks
    return first + rest % size, rest // size


def _tile_schedule(batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, group, block_q, causal, launch_group, programs,
                   device):
    """int32 [programs + 1 + tiles] on `device`: program p runs tiles table[offsets[p]:
    offsets[p + 1]] (offsets first, then the table), dealt as the hardware deals a grid with
    a program per tile: in launch order, each tile to the program that is free first, by
    each tile's predicted work (its query rows over the GQA group, plus _TILE_OVERHEAD_ROWS).
    A static snake deal left programs up to 2x apart once launch groups cycle through
    the causal lengths. Made once per problem and cached. None while a CUDA graph is being
    captured and the problem has no table yet: the copy to the GPU would only run at replay,
    leaving the cached table unwritten for later direct calls (the caller then deals in
    snake order)."""
    key = (batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, group, block_q, causal, launch_group, programs, device)
    schedule = _schedules.get(key)
    if schedule is not None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return schedule
    nbh = batch * nheads_k
    free = [(0, p) for p in range(programs)]  # (busy until, program), a heap
    tiles = [[] for _ in range(programs)]
    for t in range(nbh * n_nblocks):
        start_n = _host_tile_position(t, nbh, n_nblocks, launch_group)[1] * 2 * KV_ROWS
        lo = (max(start_n - seqlen_k + seqlen_q, 0) // block_q) * block_q if causal else 0
        work = group * max(seqlen_q - lo, 0) + _TILE_OVERHEAD_ROWS
        busy, p = heapq.heappop(free)
        tiles[p].append(t)
        heapq.heappush(free, (busy + work, p))
    offsets = [0]
    for program_tiles in tiles:
        offsets.append(offsets[-1] + len(program_tiles))
    schedule = torch.tensor(offsets + [t for program_tiles in tiles for t in program_tiles], dtype=torch.int32,
                            device=device)
    _schedules[key] = schedule
    return schedule


def flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, softmax_scale, causal=False, stages=2, block_q=None,
                                 persistent=False, launch_group=None, kv_buffers=1, scheduled=False, skip_idle=False,
                                 dq_tma=False, grads=None):
    """dq, dk, dv of the forward, as flash_bwd.flash_attn_backward returns them (dq shaped
    like q, dk and dv like k and summed over each GQA group, in q's dtype).

    dout, out [batch, seqlen_q, nheads, headdim] (made contiguous), q, k, v as
    gluon_fwd.flash_attn_forward_gluon_ws takes them, lse float32 [batch, nheads, seqlen_q]
    from the forward. fp16/bf16 on Hopper, head dim 64 or 128. block_q: query rows per step
    (32 or 64; default Q_ROWS[headdim]). grads: optional (dq, dk, dv) to write, dk and dv
    contiguous (flash_bwd.flash_attn_backward passes its own). It covers the calls
    gluon_fwd.gluon_forward_applies names, with atomics (not bit-reproducible).
    persistent: one program per SM running tile after tile (the next tile's first Q/dO and
    its K/V load under the last one's steps and stores) instead of one program per tile.
    launch_group: kv batch-heads whose tiles run together (gluon_fwd._tile_position);
    default LAUNCH_GROUP, 0 for persistent launches (grid order, dealt in snake order as
    the persistent forward's). kv_buffers: 2 double-buffers K and V, so a persistent
    program's next tile loads under the last one's steps (32-row steps only: 64-row steps
    at head dim 128 leave no shared memory for it). scheduled: a persistent launch's tiles
    dealt on the host (_tile_schedule) as the hardware deals a per-tile grid, instead of in
    snake order. skip_idle: under a causal mask the second warpgroup skips the products of
    the steps whose queries see none of its keys (_bwd_consume). dq_tma: each step's dQ
    tile goes to the float32 accumulator as TMA reduce-adds from shared memory (two swizzled
    [block_q, 32] boxes per warpgroup and step, _DQ_TILE_LAYOUT) instead of 16-byte atomics
    from every thread."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim not in (64, 128):
        raise ValueError(f"the Gluon backward takes head dim 64 or 128, got {headdim}")
    dout, out = dout.contiguous(), out.contiguous()
    views = [_row_view(t) for t in (q, k, v, dout)]
    if any(view is None for view in views):
        raise ValueError("the Gluon backward takes q, k, v contiguous as [batch, seqlen, heads, headdim] or "
                         "[batch, heads, seqlen, headdim]")
    if grads is None:
        grads = (None, torch.empty(k.shape, dtype=k.dtype, device=k.device),
                 torch.empty(k.shape, dtype=v.dtype, device=v.device))
    dq, dk, dv = grads
    dq_acc = empty_buffer(q.shape, torch.float32, q.device)  # zeroed with delta
    delta = empty_buffer(lse.shape, lse.dtype, lse.device)
    _launch_delta(out, dout, delta, (lse.stride(0), lse.stride(1)), nheads, seqlen_q, dq_acc=dq_acc)
    block_q = block_q or Q_ROWS[headdim]
    tile = _shared_layout((block_q, headdim), q.dtype)
    q_desc, do_desc = (TensorDescriptor.from_tensor(views[i][0], [block_q, headdim], tile) for i in (0, 3))
    kv_tile = _shared_layout((KV_ROWS, headdim), q.dtype)
    k_desc, v_desc = (TensorDescriptor.from_tensor(views[i][0], [KV_ROWS, headdim], kv_tile) for i in (1, 2))
    # Rows (batch, query) by columns (head, head dim) of the accumulator (_DQ_TILE_LAYOUT).
    dq_desc = TensorDescriptor.from_tensor(dq_acc.view(batch * seqlen_q, nheads * headdim), [block_q, 32],
                                           _DQ_TILE_LAYOUT) if dq_tma else q_desc
    n_nblocks = cdiv(seqlen_k, 2 * KV_ROWS)
    n_tiles = batch * nheads_k * n_nblocks
    grid = (min(n_tiles, _sm_count(q.device.index)) if persistent else n_tiles,)
    if launch_group is None:
        launch_group = 0 if persistent else LAUNCH_GROUP
    schedule = None
    if scheduled:
        if not persistent:
            raise ValueError("scheduled=True deals the tiles of a persistent launch; pass persistent=True")
        schedule = _tile_schedule(batch, nheads_k, n_nblocks, seqlen_q, seqlen_k, nheads // nheads_k, block_q,
                                  causal, launch_group, grid[0], q.device)  # None: snake order, below
        if schedule is not None:
            cached_buffer(schedule)
    launch_kernel(_attn_bwd_ws_kernel, grid, (
        q_desc, k_desc, v_desc, do_desc, dk, dv, dq_acc, dq_desc, lse, delta, delta if schedule is None else schedule,
        dk.stride(0), dk.stride(1), dk.stride(2),
        lse.stride(0), lse.stride(1), nheads, nheads_k, seqlen_q, seqlen_k, *views[0][1:], *views[1][1:],
        *views[2][1:], *views[3][1:], softmax_scale * LOG2E, softmax_scale, batch * nheads_k, n_nblocks), dict(
        HEAD_D=headdim, BLOCK_Q=block_q, STAGES=stages, CAUSAL=causal,
        DS_LAYOUT=_shared_layout((KV_ROWS, block_q), q.dtype),
        LAUNCH_GROUP=launch_group,
        KV_BUFS=kv_buffers, PERSISTENT=persistent, SCHEDULED=schedule is not None, SKIP_IDLE=skip_idle, DQ_TMA=dq_tma,
        num_warps=4,
        maxnreg=_MAXNREG))
    if dq is None:
        return dq_acc.to(q.dtype), dk, dv
    return copy_into(dq, dq_acc), dk, dv

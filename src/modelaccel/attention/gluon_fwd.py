"""The attention forward in Gluon for Hopper, warp-specialized as FlashAttention-3 is.

Why Gluon: Triton 3.6 waits on every non-accumulating wgmma right after issuing it (TTGIR
of flash_fwd._attn_fwd_kernel), so a warpgroup's exp2/max/sum work and its tensor-core work
run one after the other; that was most of the gap to cuDNN (benchmarks/NOTES.md). Gluon
(triton.experimental.gluon, in triton 3.6) issues wgmma asynchronously, lets the kernel say
where to wait, and splits a program's warps into partitions with their own registers:
- one producer warp streams Q and K/V tiles by TMA into a ring of shared-memory slots;
- two consumer warpgroups of 64 query rows each share that ring. Per key block j one
  issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together, waits for S_j alone, and runs
  the softmax of S_j while the P V product is still on the tensor cores; with PINGPONG
  the two warpgroups take turns issuing, so one's products run under the other's softmax.
- setmaxnreg gives each consumer 240 registers and the producer 24.
A first version without warp specialization (one or two programs per SM, the same
overlap within a warpgroup) measured no faster than the Triton kernel on the H200
(benchmarks/results/gluon_fwd_*): the two partitions and their registers are what count.

Scope: dense [batch, seqlen, nheads, headdim] fp16/bf16, head dim 64 or 128, GQA, causal
(bottom-right) or not; no window, softcap, ALiBi, dropout or varlen. GPU only: Gluon does
not run in the Triton interpreter, so the CPU tests cover the Triton kernel and
tests/attention/test_gluon_fwd_gpu.py this one. flash_fwd.flash_attn_forward offers it
to its tuner as extra candidates where gluon_forward_applies.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .flash_fwd import LOG2E
from .launch import capability, cdiv, launch_kernel

# triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 only async_load.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global


@gluon.jit
def _tile_position(t, nbh, nblocks, LAUNCH_GROUP: gl.constexpr):
    """(batch-head, block) of the t-th tile in launch order over nbh batch-heads of nblocks
    blocks each, as flash_fwd._grid_position numbers the Triton kernels' programs:
    LAUNCH_GROUP 0 is grid order (every batch-head's block 0, then every block 1, ...);
    G > 0 runs the blocks of G batch-heads at a time, so the tiles resident together read
    the K/V (forward) or Q/dO and dQ (backward) of a few heads, which stay in L2, instead of
    every head's. Block 0 comes first either way (the kernels map it to their longest tile)."""
    if LAUNCH_GROUP == 0:
        return t % nbh, t // nbh
    first = t // (LAUNCH_GROUP * nblocks) * LAUNCH_GROUP
    size = gl.minimum(nbh - first, LAUNCH_GROUP)
    rest = t - first * nblocks
    return first + rest % size, rest // size


@gluon.jit
def _snake_order(i, n_tiles):
    """The tile a program runs at its i-th grid-stride position (i = program + r programs):
    i itself in even rounds r, the round reversed in odd ones. Over tiles in decreasing
    length (causal in grid order) the program that took the longest tile of one round
    takes the shortest of the next, so persistent programs end their work together; a
    grid with a program per tile has only round 0."""
    programs = gl.num_programs(0)
    first = i // programs * programs
    t = i
    if (i // programs) % 2 == 1:
        t = 2 * first + gl.minimum(programs, n_tiles - first) - 1 - i
    return t


@gluon.jit
def _fwd_tile(i, n_tiles, nbh, n_mblocks, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H,
              K_ROWS_B, K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, LAUNCH_GROUP: gl.constexpr):
    """The tile a program runs at its i-th grid-stride position (_snake_order; 128 query
    rows of one (batch, head)): b, h, its first query row, its key blocks, and where its
    Q, K and V start in their 2D views (_row_view). Causal runs the longest query blocks
    first. Both consumers run the same number of key blocks (the lower half masks one more)."""
    pid_bh, pid_m = _tile_position(_snake_order(i, n_tiles), nbh, n_mblocks, LAUNCH_GROUP)
    if CAUSAL:
        pid_m = n_mblocks - 1 - pid_m
    b = pid_bh // NHEADS
    h = pid_bh % NHEADS
    start_m = pid_m * (2 * _WS_ROWS)
    hi = SEQLEN_K
    if CAUSAL:
        hi = gl.minimum(SEQLEN_K, gl.maximum(start_m + 2 * _WS_ROWS + SEQLEN_K - SEQLEN_Q, 0))
    n_blocks = gl.maximum((hi + BLOCK_N - 1) // BLOCK_N, 1)
    hk = h // GROUP
    return (b, h, start_m, n_blocks, b * Q_ROWS_B + h * Q_ROWS_H + start_m, h * Q_COLS_H,
            b * K_ROWS_B + hk * K_ROWS_H, hk * K_COLS_H, b * V_ROWS_B + hk * V_ROWS_H, hk * V_COLS_H)


@gluon.jit
def _online_softmax(s, m_i, l_i, offs_m, start_m, start_n, offs_n0, qk_scale, SEQLEN_K, diag,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """P = exp2(scores * qk_scale - running max) for the key block at start_n (the max kept
    in scaled log2 units, so each score costs one FMA before its exp2), with the running
    max and sum updated; alpha rescales what was accumulated before. Only a block that
    reaches past the keys or across the causal diagonal is masked (a uniform branch)."""
    needs_mask = start_n + BLOCK_N > SEQLEN_K
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > start_m + diag)
    if needs_mask:
        offs_n = start_n + offs_n0
        keep = offs_n[None, :] < SEQLEN_K
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha



# The trace (flash_attn_forward_gluon_ws's trace, benchmarks/gluon_fwd_timeline.py): per
# program, per partition (consumer warpgroups 0 and 1, then the producer), per tile of the
# program's first TRACE_TILES, TRACE_EVENTS slots: clock64 readings (SM cycles) at fixed
# points, the consumers' key blocks of the tile (event 8) and globaltimer at its end (9).
TRACE_TILES = 16
TRACE_EVENTS = 10
_TRACE_TILES: gl.constexpr = gl.constexpr(TRACE_TILES)
_TRACE_EVENTS: gl.constexpr = gl.constexpr(TRACE_EVENTS)


@gluon.jit
def _trace_store(trace, part, local, event, value, anchor, TRACE: gl.constexpr):
    """With TRACE, value (a tensor shaped as anchor) into the trace slot (this program,
    partition part, its local-th tile, event); anchor is any int32 arange of the partition,
    whose element 0 stores. Nothing at all without TRACE."""
    if TRACE:
        slot = ((gl.program_id(0) * 3 + part) * _TRACE_TILES + local) * _TRACE_EVENTS + event
        gl.store(trace + slot + anchor * 0, value, mask=(anchor == 0) & (local < _TRACE_TILES))


@gluon.jit
def _stamp(trace, part, local, event, anchor, TRACE: gl.constexpr):
    """_trace_store of the SM's cycle counter (clock64), read in anchor's layout."""
    if TRACE:
        clock = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [anchor], dtype=gl.int64, is_pure=False,
                                          pack=1)
        _trace_store(trace, part, local, event, clock, anchor, TRACE)


@gluon.jit
def _stamp_ns(trace, part, local, event, anchor, TRACE: gl.constexpr):
    """_trace_store of the GPU's nanosecond timer (globaltimer), which puts the cycle counts
    of different programs on one clock."""
    if TRACE:
        ns = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [anchor], dtype=gl.int64, is_pure=False,
                                       pack=1)
        _trace_store(trace, part, local, event, ns, anchor, TRACE)


# Every partition takes the same arguments (Gluon requires it of the workers; the default
# partition follows suit so that one body serves both consumers).
WS_ROWS = 64  # query rows per consumer warpgroup (wgmma's M); host side
_WS_ROWS: gl.constexpr = gl.constexpr(WS_ROWS)


@gluon.jit
def _ws_take_turn(turn_bars, wg: gl.constexpr, section, PINGPONG: gl.constexpr):
    """Wait until the other warpgroup has issued its products of the section before ours
    (warpgroup 0 goes first in each section)."""
    if PINGPONG:
        if wg == 0:
            mbarrier.wait(turn_bars.index(0), (section - 1) & 1, pred=section > 0)
        else:
            mbarrier.wait(turn_bars.index(1), section & 1)


@gluon.jit
def _ws_pass_turn(turn_bars, wg: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - wg), count=1)


@gluon.jit
def _ws_producer(wg: gl.constexpr, q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, o_smem, q_bars, q_free, k_ready, v_ready,
                 k_empty, v_empty, turn_bars, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                 NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                 V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, n_tiles, BLOCK_N: gl.constexpr,
                 HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                 LAUNCH_GROUP: gl.constexpr, Q_AFTER_FIRST_KV: gl.constexpr, trace, TRACE: gl.constexpr,
                O_TMA: gl.constexpr):
    """Per tile of this program: Q for both warpgroups (each half once its warpgroup is done
    with the last tile's), then K and V block by block into the ring, which runs on across
    tiles (ring position `it`). A slot's K is refilled once both warpgroups have their
    scores from it, its V once both have the P V product: K runs up to a block ahead of V.
    Q_AFTER_FIRST_KV: the tile's first K and V are asked for before its Q, which waits for
    both warpgroups to finish the last tile's scores; K and V need only a free ring slot, so
    in a persistent program they load under the last tile's final block instead of after it
    (flash_attn_forward_gluon_ws's kv_first says where that pays).
    (wg is unused: the workers' signatures must match.)"""
    anchor = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
    it = 0
    local = 0
    for i in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        _stamp(trace, 2, local, 0, anchor, TRACE)
        b, h, start_m, n_blocks, q_row0, q_col, k_row0, k_col, v_row0, v_col = _fwd_tile(
            i, n_tiles, nbh, n_mblocks, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B,
            K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_N, CAUSAL, LAUNCH_GROUP)
        if not Q_AFTER_FIRST_KV:
            _ws_load_q(q_desc, q_smem, q_bars, q_free, q_row0, q_col, local)
            _stamp(trace, 2, local, 2, anchor, TRACE)
        for j in range(n_blocks):
            g = it + j
            slot = g % STAGES
            phase = ((g // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), phase)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [k_row0 + j * BLOCK_N, k_col], k_ready.index(slot), k_smem.index(slot))
            if j == 0:
                _stamp(trace, 2, local, 1, anchor, TRACE)
            mbarrier.wait(v_empty.index(slot), phase)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [v_row0 + j * BLOCK_N, v_col], v_ready.index(slot), v_smem.index(slot))
            if Q_AFTER_FIRST_KV:
                if j == 0:
                    _ws_load_q(q_desc, q_smem, q_bars, q_free, q_row0, q_col, local)
                    _stamp(trace, 2, local, 2, anchor, TRACE)
        _stamp(trace, 2, local, 3, anchor, TRACE)
        it += n_blocks
        local += 1


@gluon.jit
def _ws_load_q(q_desc, q_smem, q_bars, q_free, q_row0, q_col, local):
    """The producer's Q loads of a program's local-th tile, each half once its warpgroup
    has freed the slot."""
    for half in gl.static_range(2):
        mbarrier.wait(q_free.index(half), (local & 1) ^ 1)  # a fresh mbarrier reads as phase 1 done
        mbarrier.expect(q_bars.index(half), q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row0 + half * _WS_ROWS, q_col], q_bars.index(half), q_smem.index(half))


@gluon.jit
def _ws_consume(wg: gl.constexpr, q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, o_smem, q_bars, q_free, k_ready, v_ready,
                k_empty, v_empty, turn_bars, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, n_tiles, BLOCK_N: gl.constexpr,
                HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                LAUNCH_GROUP: gl.constexpr, Q_AFTER_FIRST_KV: gl.constexpr, trace, TRACE: gl.constexpr,
                O_TMA: gl.constexpr):
    """Per tile of this program, query rows start_m + 64 wg ... + 63 against every key
    block: S_j and P_{j-1} V_{j-1} in flight together, the softmax of S_j under the second,
    the ring's slots released as their K or V is consumed, and this warpgroup's Q slot
    released after its last scores, so the next tile's Q loads under the last P V product
    and the stores. A query block past a sequence's end reads the next sequence's rows (or
    TMA's zeros past the tensor): never stored. A key block past seqlen_k is masked. Rows
    that see no key (causal, seqlen_q > seqlen_k) give 0, lse +inf. The turn-taking
    sections (PINGPONG) are numbered on across tiles (sec)."""
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    offs_n0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([_WS_ROWS, BLOCK_N], gl.float32, layout=s_layout)
    q = q_smem.index(wg)
    diag = SEQLEN_K - SEQLEN_Q
    it = 0
    sec = 0
    local = 0
    _stamp(trace, wg, 0, 7, offs_n0, TRACE)
    for i in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        _stamp(trace, wg, local, 0, offs_n0, TRACE)
        b, h, start_m, n_blocks, q_row0, q_col, k_row0, k_col, v_row0, v_col = _fwd_tile(
            i, n_tiles, nbh, n_mblocks, NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B,
            K_ROWS_H, K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, BLOCK_N, CAUSAL, LAUNCH_GROUP)
        row0 = start_m + wg * _WS_ROWS
        offs_m = row0 + gl.arange(0, _WS_ROWS, layout=rows_s)
        mbarrier.wait(q_bars.index(wg), local & 1)
        _stamp(trace, wg, local, 1, offs_n0, TRACE)
        _trace_store(trace, wg, local, 8, (offs_n0 * 0 + n_blocks).to(gl.int64), offs_n0, TRACE)

        # Section 0: the scores of block 0 alone.
        first = it % STAGES
        _ws_take_turn(turn_bars, wg, sec, PINGPONG)
        mbarrier.wait(k_ready.index(first), (it // STAGES) & 1)
        s_token = warpgroup_mma(q, k_smem.index(first).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _ws_pass_turn(turn_bars, wg, PINGPONG)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_token])
        mbarrier.arrive(k_empty.index(first), count=1)
        _stamp(trace, wg, local, 2, offs_n0, TRACE)
        m_i = gl.full([_WS_ROWS], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([_WS_ROWS], gl.float32, layout=rows_s)
        p_f32, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, offs_m, row0, 0, offs_n0, qk_scale, SEQLEN_K, diag,
                                                 _WS_ROWS, BLOCK_N, CAUSAL)
        p = gl.convert_layout(p_f32.to(dtype), p_layout)
        acc = gl.zeros([_WS_ROWS, HEAD_D], gl.float32, layout=o_layout)
        _stamp(trace, wg, local, 3, offs_n0, TRACE)

        for j in range(1, n_blocks):
            g = it + j
            slot = g % STAGES
            prev = (g - 1) % STAGES
            _ws_take_turn(turn_bars, wg, sec + j, PINGPONG)
            mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
            s_token = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
            o_token = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            _ws_pass_turn(turn_bars, wg, PINGPONG)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_token])
            mbarrier.arrive(k_empty.index(slot), count=1)
            p_f32, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, offs_m, row0, j * BLOCK_N, offs_n0, qk_scale,
                                                     SEQLEN_K, diag, _WS_ROWS, BLOCK_N, CAUSAL)
            acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p])
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
            p = gl.convert_layout(p_f32.to(dtype), p_layout)
        _stamp(trace, wg, local, 4, offs_n0, TRACE)
        mbarrier.arrive(q_free.index(wg), count=1)  # every product with Q has been waited for

        # Last section: the P V product of the last block.
        g_last = it + n_blocks - 1
        last = g_last % STAGES
        _ws_take_turn(turn_bars, wg, sec + n_blocks, PINGPONG)
        mbarrier.wait(v_ready.index(last), (g_last // STAGES) & 1)
        o_token = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        _ws_pass_turn(turn_bars, wg, PINGPONG)
        acc, _ = warpgroup_mma_wait(num_outstanding=0, deps=[o_token, p])
        mbarrier.arrive(v_empty.index(last), count=1)
        _stamp(trace, wg, local, 5, offs_n0, TRACE)

        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        out = (acc / gl.convert_layout(l_safe, rows_o)[:, None]).to(dtype)
        if O_TMA and row0 + _WS_ROWS <= SEQLEN_Q:
            # One bulk copy instead of 32-64 scattered stores a thread, which held the
            # warpgroup 1.4-2.3 us a tile (benchmarks/gluon_fwd_timeline.py): the copy runs
            # on while the next tile starts; the last one still reading this buffer is
            # waited for first. A tile reaching past seqlen_q would write the next sequence's
            # rows: it stores as below.
            tma.store_wait(0)
            o_smem.index(wg).store(out)
            fence_async_shared()
            _tma_store(o_desc, [b * SEQLEN_Q + row0, h * HEAD_D], o_smem.index(wg))
        else:
            offs_mo = row0 + gl.arange(0, _WS_ROWS, layout=rows_o)
            offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
            out_ptrs = (O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
                        + offs_mo[:, None].to(gl.int64) * stride_os + offs_d[None, :])
            gl.store(out_ptrs, out, mask=offs_mo[:, None] < SEQLEN_Q)
        gl.store(LSE + b.to(gl.int64) * stride_lse_b + h * stride_lse_h + offs_m, lse, mask=offs_m < SEQLEN_Q)
        _stamp(trace, wg, local, 6, offs_n0, TRACE)
        _stamp_ns(trace, wg, local, 9, offs_n0, TRACE)
        it += n_blocks
        sec += n_blocks + 1
        local += 1
    if O_TMA:
        tma.store_wait(0)  # the shared memory must outlive the copies reading it


@gluon.jit
def _attn_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                        NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H,
                        K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, BLOCK_N: gl.constexpr,
                        HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                        LAUNCH_GROUP: gl.constexpr, Q_AFTER_FIRST_KV: gl.constexpr, trace, TRACE: gl.constexpr,
                O_TMA: gl.constexpr):
    """Tiles of 128 query rows of one (batch, head): nbh = batch * nheads batch-heads of
    n_mblocks tiles each, in launch order (_fwd_tile: heads fastest within launch groups, so
    the tiles sharing a kv head run together; causal runs the longest first). Program p
    takes tiles p, p + programs, ... (odd rounds reversed, _snake_order): one each when
    the grid holds every tile, several (persistent) when it holds fewer. q_desc is over a
    2D view of q in blocks [64, HEAD_D] where sequence position s of (batch b, head h) is
    row b Q_ROWS_B + h Q_ROWS_H + s from column h Q_COLS_H (_row_view); k_desc, v_desc
    likewise over k, v in blocks [BLOCK_N, HEAD_D]. O [batch, seqlen_q, nheads, headdim],
    LSE float32."""
    n_tiles = nbh * n_mblocks
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, _WS_ROWS, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    if O_TMA:  # each warpgroup's output tile goes out through shared memory by TMA (16 KB each)
        o_smem = gl.allocate_shared_memory(dtype, [2, _WS_ROWS, HEAD_D], o_desc.layout)
    else:
        o_smem = q_smem  # unused
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(q_free.index(i), count=1)
        mbarrier.init(turn_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    # Each partition gets its own tuple, written out: constexprs reach a partition as
    # constexprs only so (BLOCK_N sizes layouts).
    gl.warp_specialize([
        (_ws_consume, (0, q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, o_smem, q_bars, q_free, k_ready, v_ready, k_empty,
                       v_empty, turn_bars, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h, NHEADS,
                       GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                       V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, n_tiles, BLOCK_N, HEAD_D, STAGES,
                       CAUSAL, PINGPONG, LAUNCH_GROUP, Q_AFTER_FIRST_KV, trace, TRACE, O_TMA)),
        (_ws_consume, (1, q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, o_smem, q_bars, q_free, k_ready, v_ready, k_empty,
                       v_empty, turn_bars, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h, NHEADS,
                       GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H, K_COLS_H,
                       V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, n_tiles, BLOCK_N, HEAD_D, STAGES,
                       CAUSAL, PINGPONG, LAUNCH_GROUP, Q_AFTER_FIRST_KV, trace, TRACE, O_TMA)),
        (_ws_producer, (0, q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, o_smem, q_bars, q_free, k_ready, v_ready, k_empty,
                        v_empty, turn_bars, O, LSE, stride_ob, stride_os, stride_oh, stride_lse_b, stride_lse_h,
                        NHEADS, GROUP, SEQLEN_Q, SEQLEN_K, Q_ROWS_B, Q_ROWS_H, Q_COLS_H, K_ROWS_B, K_ROWS_H,
                        K_COLS_H, V_ROWS_B, V_ROWS_H, V_COLS_H, qk_scale, nbh, n_mblocks, n_tiles, BLOCK_N, HEAD_D,
                        STAGES, CAUSAL, PINGPONG, LAUNCH_GROUP, Q_AFTER_FIRST_KV, trace, TRACE, O_TMA)),
    ],
                       [4, 1], [_WS_CONSUMER_REGS, 24])


# Registers per thread: the second consumer and the producer ask for these; the kernel's
# maxnreg leaves the first consumer (the default partition) the same 240:
# (168 * 12 warps - 240 * 4 - 24 * 4) * 32 / 128 threads = 240.
_WS_CONSUMER_REGS: gl.constexpr = gl.constexpr(240)
_WS_MAXNREG = 168

# (BLOCK_N, STAGES, PINGPONG[, PERSISTENT[, LAUNCH_GROUP[, KV_FIRST]]]). Shared memory at head dim 128:
# 32 KB of Q + 64 KB per stage.
# On the H200 (benchmarks/results/gluon_fwd_*) 128-key blocks won every row; 64-key blocks
# (4 or 3 stages) were 5-15% slower and are not candidates. Turn-taking gained 0-3% at
# 128 x 2 and is kept beside the free-running launch, 3 stages where the ring runs dry.
GLUON_WS_CONFIGS = [(128, 2, True), (128, 2, False), (128, 3, True)]
# A fourth field True: the persistent launch (one program per SM running tile after tile),
# a fifth its launch group (default 0: snake order over grid order). On the H200 (GPU time,
# benchmarks/gluon_fwd.py, results/tuning/gluon_fwd_persistent_*_e2443d6.json) persistent
# launches took the 512-2048-token Llama-3-8B prefills 6-23% past the per-tile ones, to
# 1.12-1.13x cuDNN at batch 1 and 1024-2048 tokens, and lost 5-40% on square rows from
# 2048 tokens; snake order won at batch 1-2, groups of 8 at batch 8 and (16, 16, 16, 1024).
GLUON_WS_CONFIGS += [c + (True,) for c in [(128, 2, True), (128, 3, True)]]
GLUON_WS_CONFIGS += [c + (True, 8) for c in [(128, 2, True), (128, 3, True)]]
# Batch-heads per launch group (_tile_position); 0: grid order over every batch-head.
# On the H200 (benchmarks/gluon_launch_order.py, results/tuning/gluon_launch_order_h200_
# a24775d.json, 11 causal d128 rows) groups of 8 took the forward 5.6% faster than grid
# order (geomean; 4: 5.3%, 16: 4.2%, 32: 2.4%), up to 21% at (8, 16, 16, 2048) and 8% at
# Llama-3-8B's (8, 32, 8, 8192), and the backward 8.5% (1.02-1.17x on every row).
LAUNCH_GROUP = 8
# A sixth field True: the producer asks for each tile's first K/V before its Q (kv_first).
# On the H200 (benchmarks/gluon_producer_order.py, results/tuning/gluon_producer_order_h200_
# fd01c14.*, 7 causal d128 rows, 3 rounds, GPU time) that took the persistent launches in
# groups of 8 up 2-9% on 6 of 7 rows ((8, 32, 8, 512) 256.3 -> 261.5 TFLOPS, (8, 32, 8, 2048)
# 496.1 -> 515.3), snake order -2.3% to +2.2% (a candidate both ways), and the per-tile
# launch 1-4% down (its one tile needs Q first).
GLUON_WS_CONFIGS += [(128, 2, True, True, 0, True)]
# As flash_fwd.flash_attn_forward's tuner sees them.
GLUON_WS_CANDIDATES = [("gluon_ws", *c) for c in GLUON_WS_CONFIGS]


def _row_view(t):
    """t [batch, seqlen, heads, headdim] as a 2D tensor whose rows are sequence positions,
    with (rows per batch, rows per head, columns per head) locating (b, h, s), or None.

    Two layouts qualify: [batch, seqlen, heads, headdim] contiguous (flash-attn's; a row
    holds every head) and [batch, heads, seqlen, headdim] contiguous seen through a
    transpose (Transformers' layout; each head is a run of rows). Anything else goes to
    the Triton kernel, which takes any strides."""
    batch, seqlen, heads, headdim = t.shape
    sb, ss, sh, sd = t.stride()
    if sd != 1 or t.data_ptr() % 16:
        return None
    if ss == heads * headdim and sh == headdim and (batch == 1 or sb == seqlen * ss):
        return t.as_strided((batch * seqlen, heads * headdim), (ss, 1)), seqlen, 0, headdim
    if ss == headdim and sh == seqlen * headdim and (batch == 1 or sb == heads * sh):
        return t.as_strided((batch * heads * seqlen, headdim), (ss, 1)), heads * seqlen, seqlen, 0
    return None


def flash_attn_forward_gluon_ws(q, k, v, softmax_scale, causal=False, block_n=128, stages=2, pingpong=True,
                                persistent=False, launch_group=None, kv_first=None, out=None, lse=None, trace=None):
    """The warp-specialized forward: out [batch, seqlen_q, nheads, headdim] (q's dtype) and
    lse float32 [batch, nheads, seqlen_q] (natural log; +inf for a row that sees no key), as
    flash_fwd.flash_attn_forward returns them.

    q [batch, seqlen_q, nheads, headdim], k/v [batch, seqlen_k, nheads_k, headdim]:
    fp16/bf16 CUDA tensors on Hopper, each contiguous either as is or as the transpose of a
    contiguous [batch, heads, seqlen, headdim] (_row_view); headdim 64 or 128, nheads a
    multiple of nheads_k. causal is bottom-right aligned. out/lse: optional outputs.
    persistent: one program per SM, each running tiles one after the other (the next tile's
    Q and K/V load under the last one's products and stores), instead of one program per
    tile. launch_group: batch-heads whose tiles run together (_fwd_tile); default
    LAUNCH_GROUP, 0 for persistent launches (grid order: under a causal mask every tile in
    decreasing length, which the snake order deals out evenly; launch groups cycle through
    the lengths group by group, and a static deal of them left programs 2x apart).
    kv_first: each tile's first K/V asked for before its Q (_ws_producer's Q_AFTER_FIRST_KV);
    default: for persistent launches in launch groups, where it measured faster.
    trace: None, or an int64 CUDA tensor of at least trace_size(grid) elements that the
    kernel fills with cycle-counter readings (_stamp; benchmarks/gluon_fwd_timeline.py reads
    them); a separate compile."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim not in (64, 128):
        raise ValueError(f"the Gluon forward takes head dim 64 or 128, got {headdim}")
    views = [_row_view(t) for t in (q, k, v)]
    if any(view is None for view in views):
        raise ValueError("the Gluon forward takes q, k, v contiguous as [batch, seqlen, heads, headdim] or "
                         "[batch, heads, seqlen, headdim]")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device) if lse is None else lse
    q_desc = TensorDescriptor.from_tensor(views[0][0], [WS_ROWS, headdim],
                                          _shared_layout((WS_ROWS, headdim), q.dtype))
    kv_layout = _shared_layout((block_n, headdim), q.dtype)
    k_desc, v_desc = (TensorDescriptor.from_tensor(view[0], [block_n, headdim], kv_layout) for view in views[1:])
    n_mblocks = cdiv(seqlen_q, 2 * WS_ROWS)
    n_tiles = batch * nheads * n_mblocks
    grid = (min(n_tiles, _sm_count(q.device.index)) if persistent else n_tiles,)
    group = (0 if persistent else LAUNCH_GROUP) if launch_group is None else launch_group
    kv_first = persistent and group > 0 if kv_first is None else kv_first
    o_tma = _o_by_tma(out, headdim, block_n, stages)
    o_desc = TensorDescriptor.from_tensor(out.view(batch * seqlen_q, nheads * headdim), [WS_ROWS, headdim],
                                          q_desc.layout) if o_tma else q_desc
    args = (q_desc, k_desc, v_desc, o_desc, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(1), nheads, nheads // nheads_k, seqlen_q, seqlen_k, *views[0][1:], *views[1][1:],
            *views[2][1:], softmax_scale * LOG2E, batch * nheads, n_mblocks)
    constexprs = dict(BLOCK_N=block_n, HEAD_D=headdim, STAGES=stages, CAUSAL=causal, PINGPONG=pingpong,
                      LAUNCH_GROUP=group, Q_AFTER_FIRST_KV=bool(kv_first), O_TMA=o_tma, num_warps=4,
                      maxnreg=_WS_MAXNREG)
    if trace is None:
        # launch_kernel: Triton's binder costs ~70-100 us a call on the GPU machine's host.
        launch_kernel(_attn_fwd_ws_kernel, grid, args, dict(constexprs, trace=None, TRACE=False))
    else:
        if trace.dtype != torch.int64 or not trace.is_cuda or trace.numel() < trace_size(grid[0]):
            raise ValueError(f"trace must be an int64 CUDA tensor of at least {trace_size(grid[0])} elements")
        _attn_fwd_ws_kernel[grid](*args, **constexprs, trace=trace, TRACE=True)
    return out, lse


# Hopper's shared memory per block, less what barriers and layout conversions take.
_SHARED_BYTES = 232448 - 2048


def _o_by_tma(out, headdim, block_n, stages):
    """Whether the output tiles can leave by TMA (the kernel's O_TMA): out contiguous as
    [batch, seqlen, heads, headdim], 16-byte aligned, and room in shared memory for two
    staging tiles beside Q and the K/V ring (at head dim 128: 2 stages, not 3)."""
    ring = stages * 2 * block_n * headdim
    staged = 2 * (2 * WS_ROWS * headdim) + ring  # Q, O
    return out.is_contiguous() and out.data_ptr() % 16 == 0 and staged * out.element_size() <= _SHARED_BYTES


def trace_size(programs):
    """Elements of a trace (flash_attn_forward_gluon_ws) for a grid of that many programs:
    [programs, 3 partitions, TRACE_TILES tiles, TRACE_EVENTS events]."""
    return programs * 3 * TRACE_TILES * TRACE_EVENTS


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _shared_layout(block_shape, dtype):
    """The shared-memory layout of a TMA tile (block_shape a tuple); cached, as building it
    costs ~6 us of host time on every launch otherwise."""
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), {torch.float16: gl.float16,
                                                                   torch.bfloat16: gl.bfloat16}[dtype])


def gluon_forward_applies(q, k, v, window_size, softcap, alibi_slopes, dropout_p, varlen):
    """Whether flash_attn_forward_gluon_ws covers a call of flash_fwd.flash_attn_forward:
    dense fp16/bf16 on Hopper in a layout _row_view takes, head dim 64 or 128, no window
    (causal allowed), softcap, ALiBi or dropout."""
    left, right = window_size
    return (q.is_cuda and not varlen and left < 0 and right in (-1, 0) and softcap <= 0 and alibi_slopes is None
            and dropout_p == 0 and q.shape[-1] in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)
            and capability(q.device.index)[0] == 9 and all(_row_view(t) is not None for t in (q, k, v)))

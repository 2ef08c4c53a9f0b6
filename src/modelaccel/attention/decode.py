"""KV-cache attention for decoding (flash-decoding) in Triton, and its launchers.

Decoding reads the whole cache for a handful of query rows, so the work is split along the
cache: program (split, batch * nheads_k) folds one chunk of keys for every query row of one
kv head (seqlen_q x the GQA group, so K and V are read once per kv head) and writes a
float32 partial output with its log-sum-exp. A second kernel merges the splits by their
lse. The number of splits grows as batch x nheads_k shrinks, so a single sequence still
fills every SM.

The cache is contiguous [batch_cache, max_seqlen, nheads_k, headdim] or paged
[num_blocks, page_size, nheads_k, headdim] with a block table; paged rows are gathered
row by row through the table, so any power-of-two page size works with any key tile.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .flash_fwd import LOG2E, _dot, _scores_log2
from .launch import (LaunchTuner, capability, cdiv, empty_buffer, interpreting, launch_kernel, next_power_of_2,
                     size_bucket, zeroed_buffer)


@triton.jit
def _kv_head_rows(hk, GROUP, SEQLEN_Q, HEADDIM, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query rows of kv head hk as one tile: row r is query position r // GROUP of head
    hk * GROUP + r % GROUP. Returns (position, head, row in range) per row and (offset, in
    range) per head-dim column."""
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    return rows // GROUP, hk * GROUP + rows % GROUP, rows < GROUP * SEQLEN_Q, offs_d, offs_d < HEADDIM


@triton.jit
def _decode_split_kernel(Q, K, V, O_PART, LSE_PART, BLOCK_TABLE, CACHE_SEQLENS, CACHE_BATCH_IDX, CACHE_LEFTPAD,
                         ALIBI, O, LSE, COUNTER,
                         stride_qb, stride_qs, stride_qh,
                         stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh,
                         stride_bt, stride_alibi_b, stride_ob, stride_os, stride_oh,
                         NHEADS, NHEADS_K, GROUP, SEQLEN_Q, MAX_PAGES, SPLIT_LEN, NSPLITS,
                         window_left, window_right, qk_scale, softcap_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HEADDIM: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                         SAME_KV_STRIDES: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                         HAS_LEFTPAD: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FUSED: tl.constexpr,
                         UPCAST_DOT: tl.constexpr, SPLIT_PAGES: tl.constexpr, MERGE_ROWS: tl.constexpr,
                         MERGE_SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    """Partial attention of keys [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) for one kv head.

    Row r of the tile is query position r // GROUP of head hk * GROUP + r % GROUP. Writes
    O_PART [splits, batch, seqlen_q, nheads, headdim] and LSE_PART [splits, batch, nheads,
    seqlen_q] (float32, lse -inf where the split holds no visible key).
    PAGE_SIZE is a compile-time constant (1 for a contiguous cache), so a key's page and its
    row there are a shift and a mask, not an integer division per key row and tile. With
    SAME_KV_STRIDES (k_cache and v_cache strided alike, as when allocated alike) V's offsets
    are K's. Both matter in the paged loop, whose addresses wait for the block table: its
    SASS went from 3248 instructions to 2672 and then 2336, against 1776 / 1824 for the
    contiguous kernel (128-key tiles, triton 3.6), where the paged step took 1.0-1.9 us more than the
    contiguous one at (1, 4096) (benchmarks/decode_paged_probe.py, pages in order or not).
    SPLIT_PAGES (paged caches; a power of two > the pages one split spans, or 0): the
    split's block-table entries are read once, before the loop and beside cache_seqlens,
    and each tile takes its pages from them (tl.gather). Read inside the loop instead (0),
    the table loads wait for cache_seqlens (the loop bounds) and K/V for the table: three
    memory latencies in a row where the contiguous cache has two.
    FUSED: no combine kernel follows. With one split the program writes O and LSE itself;
    with more, the last program of a kv head to finish (an atomic count per (batch, kv
    head) in COUNTER, zeroed by the caller) merges the splits into O and LSE.
    """
    if USE_PDL:
        # The combine kernel may launch now; it waits for this grid's end before reading.
        gdc_launch_dependents()
    split = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // NHEADS_K
    hk = pid_bhk % NHEADS_K
    if SPLIT_PAGES > 0:
        first_page = split * SPLIT_LEN // PAGE_SIZE
        page_ids = first_page + tl.arange(0, SPLIT_PAGES)
        split_pages = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + page_ids, mask=page_ids < MAX_PAGES, other=0)
    seqlen_k = tl.load(CACHE_SEQLENS + b)
    cache_b = b
    if HAS_BATCH_IDX:
        cache_b = tl.load(CACHE_BATCH_IDX + b)
    first_key = 0
    if HAS_LEFTPAD:
        first_key = tl.load(CACHE_LEFTPAD + b)

    pos_q, heads, row_ok, offs_d, d_ok = _kv_head_rows(hk, GROUP, SEQLEN_Q, HEADDIM, BLOCK_M, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + pos_q[:, None] * stride_qs + heads[:, None] * stride_qh
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    diag = seqlen_k - SEQLEN_Q
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI + b * stride_alibi_b + heads, mask=row_ok, other=0.0)[:, None] * 1.4426950408889634

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    start = split * SPLIT_LEN
    # Splits need not start on a key tile: the last tile of one may reach into the next,
    # so keys are masked at the split's end, not only at the sequence's.
    last_key = tl.minimum(start + SPLIT_LEN, seqlen_k)
    end = last_key
    # Keys some row may see: causal/window bounds of the first and last query rows.
    if HAS_LEFT:
        start = tl.maximum(start, diag - window_left) // BLOCK_N * BLOCK_N
        start = tl.maximum(start, split * SPLIT_LEN)
    if HAS_RIGHT:
        end = tl.minimum(end, SEQLEN_Q - 1 + diag + window_right + 1)
    for start_n in tl.range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < last_key) & (offs_n >= first_key)
        if PAGED:
            if SPLIT_PAGES > 0:
                page = tl.gather(split_pages, tl.minimum(offs_n // PAGE_SIZE - first_page, SPLIT_PAGES - 1), 0)
            else:
                page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + offs_n // PAGE_SIZE, mask=n_ok, other=0)
            k_rows = page.to(tl.int64) * stride_kb + (offs_n % PAGE_SIZE) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (offs_n % PAGE_SIZE) * stride_vs
        else:
            k_rows = cache_b.to(tl.int64) * stride_kb + offs_n.to(tl.int64) * stride_ks
            v_rows = cache_b.to(tl.int64) * stride_vb + offs_n.to(tl.int64) * stride_vs
        k_offs = k_rows[:, None] + hk * stride_kh + offs_d[None, :]
        if SAME_KV_STRIDES:
            v_offs = k_offs
        else:
            v_offs = v_rows[:, None] + hk * stride_vh + offs_d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_offs, mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), None, UPCAST_DOT)
        s = _scores_log2(qk, pos_q[:, None], offs_n[None, :], seqlen_k, diag, window_left, window_right,
                         qk_scale, softcap_scale, 0.0, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, False)
        if HAS_ALIBI:
            s -= alibi_slope * tl.abs((pos_q[:, None] + diag - offs_n[None, :]).to(tl.float32))
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_offs, mask=kv_mask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST_DOT)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    nheads_q = NHEADS
    batch = tl.num_programs(1) // NHEADS_K
    part = split.to(tl.int64) * batch + b  # (split, batch) index
    tile_ok = row_ok[:, None] & d_ok[None, :]
    out_ptrs = (O + b.to(tl.int64) * stride_ob + pos_q[:, None] * stride_os + heads[:, None] * stride_oh
                + offs_d[None, :])
    lse_ptrs = LSE + (b * nheads_q + heads) * SEQLEN_Q + pos_q
    o_ptrs = (O_PART + ((part * SEQLEN_Q + pos_q[:, None]) * nheads_q + heads[:, None]) * HEADDIM
              + offs_d[None, :])
    lse_part_ptrs = LSE_PART + (part * nheads_q + heads) * SEQLEN_Q + pos_q
    if FUSED:
        if NSPLITS == 1:
            tl.store(out_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=tile_ok)
            tl.store(lse_ptrs, tl.where(empty, float("inf"), lse), mask=row_ok)
        else:
            tl.store(o_ptrs, acc / l_safe[:, None], mask=tile_ok)
            tl.store(lse_part_ptrs, lse, mask=row_ok)
            # Every thread's partial stores are done before the count is released.
            tl.debug_barrier()
            done = tl.atomic_add(COUNTER + pid_bhk, 1, sem="acq_rel")
            if done == NSPLITS - 1:
                _merge_splits(O_PART, LSE_PART, O, LSE, b, hk, batch, NSPLITS, nheads_q, GROUP, SEQLEN_Q, HEADDIM,
                              stride_ob, stride_os, stride_oh, MERGE_ROWS, MERGE_SPLITS, BLOCK_D)
    else:
        tl.store(o_ptrs, acc / l_safe[:, None], mask=tile_ok)
        tl.store(lse_part_ptrs, lse, mask=row_ok)


@triton.jit
def _merge_splits(O_PART, LSE_PART, O, LSE, b, hk, batch, NSPLITS, NHEADS, GROUP, SEQLEN_Q, HEADDIM,
                  stride_ob, stride_os, stride_oh,
                  MERGE_ROWS: tl.constexpr, MERGE_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the NSPLITS partial results of kv head hk's query rows by their lse (the fused
    path), MERGE_SPLITS splits a load.

    The splits are loaded side by side: one at a time, every load waited on the last (an L2
    round trip each), which made the fused launch 4-6 us slower than a separate combine
    kernel at 16 splits (tune_decode.py on the H100). The loads bypass L1 (.cg): the
    partials were written by other programs on other SMs.
    """
    pos_q, heads, row_ok, offs_d, d_ok = _kv_head_rows(hk, GROUP, SEQLEN_Q, HEADDIM, MERGE_ROWS, BLOCK_D)
    m = tl.full([MERGE_ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([MERGE_ROWS], dtype=tl.float32)
    acc = tl.zeros([MERGE_ROWS, BLOCK_D], dtype=tl.float32)
    for first in range(0, NSPLITS, MERGE_SPLITS):
        splits = first + tl.arange(0, MERGE_SPLITS)
        part = splits.to(tl.int64) * batch + b
        ok = (splits < NSPLITS)[:, None] & row_ok[None, :]
        lse_s = tl.load(LSE_PART + (part[:, None] * NHEADS + heads[None, :]) * SEQLEN_Q + pos_q[None, :],
                        mask=ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(O_PART + ((part[:, None, None] * SEQLEN_Q + pos_q[None, :, None]) * NHEADS
                                + heads[None, :, None]) * HEADDIM + offs_d[None, None, :],
                      mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        w = tl.exp(lse_s - m_use[None, :])
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(o_s * w[:, :, None], 0)
        m = m_new
    m_use = tl.where(m == float("-inf"), 0.0, m)
    # No split saw a key: out 0 and lse +inf, as the combine kernel gives.
    total_safe = tl.where(total == 0.0, 1.0, total)
    out_ptrs = (O + b.to(tl.int64) * stride_ob + pos_q[:, None] * stride_os + heads[:, None] * stride_oh
                + offs_d[None, :])
    tl.store(out_ptrs, (acc / total_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * NHEADS + heads) * SEQLEN_Q + pos_q, tl.where(total == 0.0, float("inf"),
                                                                     m_use + tl.log(total_safe)), mask=row_ok)


@triton.jit
def _decode_combine_kernel(O_PART, LSE_PART, O, LSE, NSPLITS, BATCH, NHEADS, SEQLEN_Q,
                           stride_ob, stride_os, stride_oh,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEADDIM: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """Merge the splits of one (batch, query position, head) row by their lse.

    USE_PDL: launched as a programmatic dependent of the split kernel (Hopper), so its
    programs are resident before the split kernel ends and wait here for its writes
    (griddepcontrol.wait returns once the split grid has finished and its memory is
    visible) instead of paying a kernel launch after it.
    """
    if USE_PDL:
        gdc_wait()
    pid = tl.program_id(0)  # over batch * seqlen_q * nheads, head fastest
    h = pid % NHEADS
    i = (pid // NHEADS) % SEQLEN_Q
    b = pid // (NHEADS * SEQLEN_Q)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < NSPLITS
    part = splits.to(tl.int64) * BATCH + b
    lse_s = tl.load(LSE_PART + (part * NHEADS + h) * SEQLEN_Q + i, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEADDIM
    o_s = tl.load(O_PART + ((part[:, None] * SEQLEN_Q + i) * NHEADS + h) * HEADDIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    # No split saw a key: out 0 and lse +inf, as the other kernels do for empty rows.
    out = tl.sum(o_s * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b.to(tl.int64) * stride_ob + i * stride_os + h * stride_oh + offs_d,
             out.to(O.dtype.element_ty), mask=d_ok)
    total_safe = tl.where(total == 0.0, 1.0, total)
    tl.store(LSE + (b * NHEADS + h) * SEQLEN_Q + i, tl.where(total == 0.0, float("inf"), m_use + tl.log(total_safe)))


def _sm_count(device):
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


# GPU launch candidates: (BLOCK_N, num_warps, num_stages, programs per SM, fewest key
# blocks per split). The last two set the number of splits: short caches at small batch
# want many one-block splits (every load in flight at once), long ones fewer, longer
# splits. Each problem class times them once (LaunchTuner); the first is the fallback.
# (64, 4, 3, 1, 4): one program per SM (16 splits of 8 KV heads at batch 1) was the fastest
# launch at (1, 4096) and (1, 32768) in the sweep (results/tuning/tune_decode_18fcea5.json).
# (128, 4, 3, 1, 4): the fastest launch at (1, 32768) and (8, 4096) on the H200, 81-82% of
# its 4.2 TB/s read bandwidth against 77-79% for the others
# (results/tuning/tune_decode_h200_e6bc285.json).
_DECODE_CONFIGS = [(64, 4, 3, 2, 4), (64, 4, 3, 4, 1), (64, 4, 2, 4, 1), (32, 4, 3, 4, 1),
                   (128, 4, 2, 2, 2), (128, 8, 2, 2, 1), (64, 8, 4, 2, 2), (64, 4, 4, 1, 8), (64, 4, 3, 1, 4),
                   (128, 4, 3, 1, 4)]
# A sixth field True selects the fused launch: the split kernel merges its own splits (the
# last program of each kv head to finish), so no combine kernel runs, at the price of a
# zeroed counter per call. With the splits merged one at a time it measured 4-6 us slower
# than the combine kernel (tune_decode.py, H100, 18fcea5); _merge_splits now loads them side
# by side, and the fused launches of the five most chosen tiles compete in the tuning.
_DECODE_CONFIGS += [c + (True,) for c in [(64, 4, 3, 2, 4), (64, 4, 3, 4, 1), (32, 4, 3, 4, 1), (64, 4, 3, 1, 4),
                                          (128, 4, 3, 1, 4)]]
# A decoding step's host time (two launches, ~200 us on the H100 box) exceeds the flush
# do_bench hides it behind, so direct timing ranked every candidate the same.
_tuner = LaunchTuner("decode_attention", graph_timing=True)
# The most block-table entries a program holds in registers (SPLIT_PAGES): 1024 int32 over
# 128 threads is 8 registers. Longer splits read the table inside the loop.
_SPLIT_PAGES_MAX = 1024
# The most float32 partial values the fused merge loads at once: 2048 over 128 threads is 16
# registers, 4 splits of 4 query rows at head dim 128. The kernel's registers are the most
# any part of it needs: with 8192 the fused launches took 153-204 registers against 72-128
# unfused (scripts/compile_check.py --candidates, triton 3.6), too many for 3-4 programs per
# SM; with 2048, 96-139 against 80-128 (results/tuning/candidate_resources_triton36.txt).
_MERGE_VALUES_MAX = 2048
def combine_warps(block_s, block_d):
    """Warps of a combine program merging block_s splits of block_d values: one warp up to
    4096 floats (128 a thread), then one more per 4096, at most 4.

    The combine is pure latency after the split kernel: one warp needs no cross-warp
    reduction through shared memory and barriers. Under graph replay on the H200
    (results/tuning/decode_tail_probe_h200_3989b30.*) one warp took 1.3 us off (1, 32768)'s
    step at 16 splits (40.16 -> 38.88 us) and 0.6 us off (1, 4096) and (8, 4096); at 33
    splits (8192 floats) two warps were fastest (39.87 against 40.14 at 4 and 40.42 at 1).
    """
    return max(1, min(4, block_s * block_d // 4096))


def choose_num_splits(batch, nheads_k, max_keys, device, block_n=64, programs_per_sm=2, min_blocks=4):
    """Splits that give at most `programs_per_sm` programs per SM, each with at least
    `min_blocks` key blocks. Rounded down: 17 splits of 8 heads is 136 programs on 132 SMs,
    a second wave of four."""
    programs = batch * nheads_k
    want = max(1, programs_per_sm * _sm_count(device) // programs)
    return max(1, min(want, cdiv(max_keys, min_blocks * block_n), 128))


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, causal=False, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None, block_table=None, cache_batch_idx=None, cache_leftpad=None,
                     num_splits=0, block_n=None, config=None):
    """Attention of q over a KV cache, split along the cache and merged.

    Args:
        q: [batch, seqlen_q, nheads, headdim] fp16/bf16.
        k_cache, v_cache: [batch_cache, max_seqlen, nheads_k, headdim], or with block_table
            (int32 [batch, max_blocks]) paged [num_blocks, page_size, nheads_k, headdim].
        cache_seqlens: int32 [batch], keys per sequence (new tokens already appended).
        cache_batch_idx: int32 [batch], cache row of each sequence (contiguous cache only).
        cache_leftpad: int32 [batch], first valid key of each sequence.
        num_splits: 0 chooses from batch, heads, cache length and the SM count.
        block_n / config: overrides for tests and tuning (config: one of _DECODE_CONFIGS,
            optionally with a sixth field True for the fused split-and-merge launch).
            By default the GPU launch is tuned per problem class.
    Returns:
        out [batch, seqlen_q, nheads, headdim] in q's dtype, lse [batch, nheads, seqlen_q] float32.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    max_keys = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    left, right = window_size
    if causal:
        right = 0
    block_d = max(next_power_of_2(headdim), 16)
    merge_rows = next_power_of_2(group * seqlen_q)
    block_m = max(merge_rows, 16)
    # empty_buffer / zeroed_buffer: a repeated call may replay these launches (interface._plans).
    out = empty_buffer(q.shape, q.dtype, q.device)
    lse = empty_buffer((batch, nheads, seqlen_q), torch.float32, q.device)
    interp = interpreting()
    pdl_usable = not interp and q.is_cuda and capability(q.device.index)[0] >= 9
    placeholder = cache_seqlens

    def launch(config):
        bn, warps, stages, per_sm, min_blocks, *fused = config
        fused = bool(fused and fused[0])
        splits = num_splits if num_splits > 0 else choose_num_splits(batch, nheads_k, max_keys, q.device, bn,
                                                                     per_sm, min_blocks)
        # Not rounded to whole key tiles: 33 splits of 8 KV heads are 264 programs, two on
        # each of 132 SMs, where tile-sized splits came to 32 (8 SMs with one program).
        split_len = cdiv(max_keys, splits)
        splits = cdiv(max_keys, split_len)
        merged_here = fused and splits == 1
        # With one fused split nothing is merged: the partial buffers are never touched.
        o_part = out if merged_here else empty_buffer((splits, batch, seqlen_q, nheads, headdim), torch.float32,
                                                      q.device)
        lse_part = lse if merged_here else empty_buffer((splits, batch, nheads, seqlen_q), torch.float32, q.device)
        # A fresh zeroed count per call (a memset, captured with the rest in a CUDA graph):
        # a buffer kept between calls would be shared by streams and by graphs.
        counter = zeroed_buffer((batch * nheads_k,), torch.int32, q.device) if fused and splits > 1 else placeholder
        merge_splits = max(1, min(next_power_of_2(splits), _MERGE_VALUES_MAX // (merge_rows * block_d)))
        split_pages = next_power_of_2(split_len // page_size + 2) if paged else 0
        if split_pages > _SPLIT_PAGES_MAX:
            split_pages = 0
        # With the block table read inside the loop (split_pages 0), Triton's pipeliner
        # gives those loads two stages of their own: 3 stages left one K/V buffer in flight
        # where the contiguous cache has two (compiled for sm_90 with triton 3.6: 39 KB of
        # shared memory against 72 KB). Two more stages give that loop the same K/V depth.
        pdl = not fused and pdl_usable
        extra = {} if interp else {"num_warps": warps,
                                   "num_stages": stages + (2 if paged and not split_pages else 0)}
        launch_kernel(_decode_split_kernel, (splits, batch * nheads_k), (
            q, k_cache, v_cache, o_part, lse_part,
            block_table if paged else placeholder, cache_seqlens,
            cache_batch_idx if cache_batch_idx is not None else placeholder,
            cache_leftpad if cache_leftpad is not None else placeholder,
            alibi_slopes if alibi_slopes is not None else o_part, out, lse, counter,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0) if paged else 0,
            alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
            out.stride(0), out.stride(1), out.stride(2),
            nheads, nheads_k, group, seqlen_q, block_table.shape[1] if paged else 0, split_len, splits,
            left, right, softmax_scale * LOG2E if softcap <= 0 else softcap * LOG2E,
            softmax_scale / softcap if softcap > 0 else 1.0), dict(
            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=block_d, HEADDIM=headdim, PAGED=paged, PAGE_SIZE=page_size,
            SAME_KV_STRIDES=k_cache.stride() == v_cache.stride(),
            HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFTPAD=cache_leftpad is not None,
            HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None, FUSED=fused, UPCAST_DOT=interp and q.dtype == torch.bfloat16,
            SPLIT_PAGES=split_pages, MERGE_ROWS=merge_rows, MERGE_SPLITS=merge_splits, USE_PDL=pdl, **extra))
        if not fused:
            block_s = max(next_power_of_2(splits), 2)
            combine_w = combine_warps(block_s, block_d)
            launch_kernel(_decode_combine_kernel, (batch * seqlen_q * nheads,), (
                o_part, lse_part, out, lse, splits, batch, nheads, seqlen_q,
                out.stride(0), out.stride(1), out.stride(2)),
                dict(BLOCK_S=block_s, BLOCK_D=block_d, HEADDIM=headdim, USE_PDL=pdl,
                     **({"launch_pdl": True} if pdl else {}), **({} if interp else {"num_warps": combine_w})))

    if config is None:
        if interp or block_n is not None:
            config = (block_n or 16, 4, 3, 2, 4)
        else:
            key = (q.dtype, headdim, block_m, page_size, left >= 0, right >= 0, softcap > 0, alibi_slopes is not None,
                   num_splits, size_bucket(batch * nheads_k), size_bucket(max_keys))
            config = _tuner.choose(key, _DECODE_CONFIGS, launch)
    launch(config)
    return out, lse

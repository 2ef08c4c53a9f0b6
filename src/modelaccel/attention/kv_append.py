"""Appending new tokens to a KV cache, with rotary embedding, in one Triton launch.

flash_attn_with_kvcache writes the new k/v rows into the cache at cache_seqlens (rotating
k, and q, when rotary tables are given) before it attends. Done with PyTorch indexing
that is ~20 small operations a step (the rotary gathers, casts and concatenations, two
index_put), each with its host time and its kernel; here it is one program per (token,
head). The PyTorch version, reference.append_kv_ref, stays as the CPU path and the
reference the tests compare with.
"""

import torch
import triton
import triton.language as tl

from .launch import launch_kernel, next_power_of_2


@triton.jit
def _rotated_row(X, row_offset, pos, COS, SIN, stride_cos, offs_d,
                 HEADDIM: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Row X[row_offset: row_offset + HEADDIM], its first 2 * HALF features rotated by the
    angle of position pos, in X's dtype; features are (x[d], x[partner]) pairs."""
    d_ok = offs_d < HEADDIM
    x = tl.load(X + row_offset + offs_d, mask=d_ok, other=0.0)
    if ROTARY:
        if INTERLEAVED:  # pairs (0, 1), (2, 3), ...
            partner = offs_d ^ 1
            first = offs_d % 2 == 0
            j = offs_d // 2
        else:  # pairs (i, i + HALF), GPT-NeoX style
            partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
            first = offs_d < HALF
            j = offs_d % HALF
        rotated = offs_d < 2 * HALF
        x_partner = tl.load(X + row_offset + partner, mask=rotated, other=0.0).to(tl.float32)
        c = tl.load(COS + pos * stride_cos + j, mask=rotated, other=1.0).to(tl.float32)
        s = tl.load(SIN + pos * stride_cos + j, mask=rotated, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        # The same float32 products and sums as reference.apply_rotary, then one rounding.
        y = tl.where(first, xf * c - x_partner * s, xf * c + x_partner * s)
        x = tl.where(rotated, y.to(x.dtype), x)
    return x


@triton.jit
def _append_kv_kernel(Q, Q_OUT, K_NEW, V_NEW, K_CACHE, V_CACHE, COS, SIN, CACHE_SEQLENS, CACHE_LEFTPAD,
                      CACHE_BATCH_IDX, BLOCK_TABLE,
                      stride_qb, stride_qs, stride_qh, stride_knb, stride_kns, stride_knh,
                      stride_vnb, stride_vns, stride_vnh, stride_kcb, stride_kcs, stride_kch,
                      stride_vcb, stride_vcs, stride_vch, stride_cos, stride_bt,
                      ROWS, SEQLEN_Q, SEQLEN_NEW, Q_HEADS, PAGE_SIZE,
                      HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr,
                      ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, Q_STEPS: tl.constexpr,
                      HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr):
    """Program (b * ROWS + t, h): for h < Q_HEADS, rotate query row t of head h into Q_OUT;
    otherwise write new token t of kv head h - Q_HEADS (k rotated) into the caches."""
    pid_row = tl.program_id(0)
    h = tl.program_id(1)
    b = pid_row // ROWS
    t = pid_row % ROWS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEADDIM
    seqlen = tl.load(CACHE_SEQLENS + b)
    # Rotary positions count from the sequence's first real token (after left padding).
    start = seqlen
    if HAS_LEFTPAD:
        start -= tl.load(CACHE_LEFTPAD + b)
    if h < Q_HEADS:
        if t < SEQLEN_Q:
            # Without a causal or window mask every query row takes the first new position.
            pos = start
            if Q_STEPS:
                pos += t
            row = b.to(tl.int64) * stride_qb + t * stride_qs + h * stride_qh
            x = _rotated_row(Q, row, pos, COS, SIN, stride_cos, offs_d, HEADDIM, HALF, ROTARY, INTERLEAVED)
            out_row = ((b.to(tl.int64) * SEQLEN_Q + t) * Q_HEADS + h) * HEADDIM
            tl.store(Q_OUT + out_row + offs_d, x, mask=d_ok)
    else:
        hk = h - Q_HEADS
        if t < SEQLEN_NEW:
            k = _rotated_row(K_NEW, b.to(tl.int64) * stride_knb + t * stride_kns + hk * stride_knh, start + t,
                             COS, SIN, stride_cos, offs_d, HEADDIM, HALF, ROTARY, INTERLEAVED)
            v = tl.load(V_NEW + b.to(tl.int64) * stride_vnb + t * stride_vns + hk * stride_vnh + offs_d, mask=d_ok)
            slot = seqlen + t
            if PAGED:
                cache_b = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_bt + slot // PAGE_SIZE)
                slot = slot % PAGE_SIZE
            elif HAS_BATCH_IDX:
                cache_b = tl.load(CACHE_BATCH_IDX + b)
            else:
                cache_b = b
            tl.store(K_CACHE + cache_b.to(tl.int64) * stride_kcb + slot.to(tl.int64) * stride_kcs
                     + hk * stride_kch + offs_d, k, mask=d_ok)
            tl.store(V_CACHE + cache_b.to(tl.int64) * stride_vcb + slot.to(tl.int64) * stride_vcs
                     + hk * stride_vch + offs_d, v, mask=d_ok)


def append_kv(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
              q_steps=True, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    """Write k, v [batch, seqlen_new, nheads_k, headdim] into the caches at cache_seqlens + t
    (in place), k rotated when rotary_cos/rotary_sin [seqlen_ro, rotary_dim / 2] are given.

    Inputs as flash_attn_with_kvcache's, already validated (positions inside the cache and
    the rotary tables). q_steps: query row t takes rotary position start + t (causal or
    window masks), else start. Returns q rotated the same way ([batch, seqlen_q, nheads,
    headdim], a new contiguous tensor), or q itself without rotary.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_new, nheads_k = k.shape[1], k.shape[2]
    rotary = rotary_cos is not None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary else q
    q_heads = nheads if rotary else 0
    rows = max(seqlen_new, seqlen_q) if rotary else seqlen_new
    paged = block_table is not None
    cos = rotary_cos.contiguous() if rotary else k
    sin = rotary_sin.contiguous() if rotary else k
    placeholder = cache_seqlens
    launch_kernel(_append_kv_kernel, (batch * rows, q_heads + nheads_k), (
        q, q_out, k, v, k_cache, v_cache, cos, sin, cache_seqlens,
        cache_leftpad if cache_leftpad is not None else placeholder,
        cache_batch_idx if cache_batch_idx is not None else placeholder,
        block_table if paged else placeholder,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(0) if rotary else 0, block_table.stride(0) if paged else 0,
        rows, seqlen_q, seqlen_new, q_heads, k_cache.shape[1] if paged else 1), dict(
        HEADDIM=headdim, BLOCK_D=max(next_power_of_2(headdim), 16), HALF=rotary_cos.shape[1] if rotary else 1,
        ROTARY=rotary, INTERLEAVED=bool(rotary_interleaved), Q_STEPS=bool(q_steps),
        HAS_LEFTPAD=cache_leftpad is not None, HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=paged))
    return q_out

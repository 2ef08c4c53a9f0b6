"""The PyTorch reference for attention: the definition every kernel is tested against.

It is also the CPU path of `flash_attn_func` when the Triton interpreter is off, so
there is exactly one statement of what the masks, softcap and ALiBi mean.
"""

import math

import torch


def visible_keys_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), device=None):
    """Boolean [seqlen_q, seqlen_k] mask of the keys each query may attend to.

    Query row i sits at key position i + seqlen_k - seqlen_q (bottom-right alignment,
    as flash-attn >= 2.1). `window_size=(left, right)` keeps keys within left before and
    right after that position, -1 meaning unbounded; `causal=True` is right = 0.
    """
    left, right = window_size
    if causal:
        right = 0
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    return visible


def alibi_bias(alibi_slopes, seqlen_q, seqlen_k, batch, nheads, device, dtype):
    """ALiBi bias [batch, nheads, seqlen_q, seqlen_k]: -slope * |i + seqlen_k - seqlen_q - j|."""
    slopes = alibi_slopes.to(device=device, dtype=dtype)
    if slopes.dim() == 1:
        slopes = slopes.expand(batch, nheads)
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    distance = (rows - cols).abs().to(dtype)
    return -slopes[:, :, None, None] * distance


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, compute_dtype=torch.float64, dropout_p=0.0, dropout_mask=None):
    """Attention computed the plain way, in `compute_dtype`.

    Args:
        q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim],
            nheads a multiple of nheads_k (GQA/MQA: each group of q heads shares one kv head).
        softmax_scale: default 1 / sqrt(headdim).
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (Gemma-2).
        alibi_slopes: float [nheads] or [batch, nheads].
        dropout_p, dropout_mask: with dropout_p > 0, the probabilities are multiplied by the
            keep mask (bool [batch, nheads, seqlen_q, seqlen_k]) / (1 - dropout_p); lse is
            unaffected. Differentiable in q, k, v like the rest.
    Returns:
        out [batch, seqlen_q, nheads, headdim] and lse [batch, nheads, seqlen_q], both in
        `compute_dtype`. Rows that see no key get out = 0 and lse = +inf (flash-attn's
        convention, which makes exp(s - lse) = 0 in a backward pass).
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    group = nheads // nheads_k
    qf = q.to(compute_dtype).transpose(1, 2)
    kf = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, seqlen_q, seqlen_k, batch, nheads, q.device, compute_dtype)
    visible = visible_keys_mask(seqlen_q, seqlen_k, causal, window_size, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    # exp(-inf - (+inf)) is 0, so the empty rows come out as zeros without NaN.
    lse = lse.masked_fill(empty, float("inf"))
    probs = torch.exp(scores - lse[..., None])
    if dropout_p > 0:
        probs = probs * dropout_mask.to(probs.device) / (1.0 - dropout_p)
    out = torch.matmul(probs, vf).transpose(1, 2)
    return out, lse


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, compute_dtype=torch.float64):
    """attention_ref on each sequence of a packed batch.

    q: [total_q, nheads, headdim]; k, v: [total_k, nheads_k, headdim]; cu_seqlens_q/k:
    int32 [batch + 1]. Returns out [total_q, nheads, headdim] and lse [nheads, total_q] in
    compute_dtype. Masks are aligned per sequence (bottom-right of each).
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        qs = q[starts_q[b]:starts_q[b + 1]].unsqueeze(0)
        ks = k[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        vs = v[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        slopes = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes = alibi_slopes[b]
        out, lse = attention_ref(qs, ks, vs, softmax_scale, causal, window_size, softcap, slopes, compute_dtype)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def apply_rotary(x, cos, sin, positions, interleaved=True):
    """Rotary embedding of the first rotary_dim = 2 * cos.shape[1] features of x.

    x: [batch, seqlen, nheads, headdim]; cos, sin: [seqlen_ro, rotary_dim / 2];
    positions: int [batch, seqlen], the row of cos/sin for each token. interleaved pairs
    features (0, 1), (2, 3), ...; otherwise (i, i + rotary_dim / 2) (GPT-NeoX style).
    """
    half = cos.shape[1]
    c = cos[positions].unsqueeze(2).float()  # [batch, seqlen, 1, half]
    s = sin[positions].unsqueeze(2).float()
    rot = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _append_to_cache(cache, new, cache_seqlens, cache_batch_idx, block_table):
    """Write new [batch, seqlen_new, nheads_k, headdim] rows at positions cache_seqlens + t,
    with device-side indexing only (capturable in a CUDA graph)."""
    batch, seqlen_new = new.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=new.device)
    if block_table is None:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch, device=new.device)
        cache[rows[:, None], positions] = new
    else:
        page = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, positions // page)
        cache[pages, positions % page] = new


def append_kv_ref(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                  rotary_interleaved=True, q_steps=True, cache_leftpad=None, cache_batch_idx=None, block_table=None):
    """PyTorch version of kv_append.append_kv (same arguments): writes k, v into the caches
    at cache_seqlens + t in place, k rotated when rotary tables are given, and returns q
    rotated the same way (q itself without rotary). The CPU path and the tests use it."""
    if rotary_cos is not None:
        start = cache_seqlens.long() - (cache_leftpad.long() if cache_leftpad is not None else 0)
        k = apply_rotary(k, rotary_cos, rotary_sin, start[:, None] + torch.arange(k.shape[1], device=q.device),
                         rotary_interleaved)
        steps = torch.arange(q.shape[1], device=q.device) if q_steps \
            else torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
        q = apply_rotary(q, rotary_cos, rotary_sin, start[:, None] + steps, rotary_interleaved)
    _append_to_cache(k_cache, k, cache_seqlens, cache_batch_idx, block_table)
    _append_to_cache(v_cache, v, cache_seqlens, cache_batch_idx, block_table)
    return q


def cache_rows(cache, b, length, block_table=None, cache_batch_idx=None):
    """The first `length` rows [length, nheads_k, headdim] of sequence b in a contiguous or
    paged cache."""
    if block_table is None:
        row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        return cache[row, :length]
    page = cache.shape[1]
    pages = block_table[b, :(length + page - 1) // page].long()
    return cache[pages].flatten(0, 1)[:length]


def kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None, block_table=None,
                          cache_batch_idx=None, cache_leftpad=None, compute_dtype=torch.float64):
    """attention_ref of q [batch, seqlen_q, nheads, headdim] over each sequence's cached keys
    [cache_leftpad[b], cache_seqlens[b]); returns out [batch, seqlen_q, nheads, headdim] and
    lse [batch, nheads, seqlen_q] in compute_dtype."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        first = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        k = cache_rows(k_cache, b, length, block_table, cache_batch_idx)[first:]
        v = cache_rows(v_cache, b, length, block_table, cache_batch_idx)[first:]
        slopes = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes = alibi_slopes[b]
        out, lse = attention_ref(q[b:b + 1], k[None], v[None], softmax_scale, causal, window_size, softcap,
                                 slopes, compute_dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)

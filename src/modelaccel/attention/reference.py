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
                  alibi_slopes=None, compute_dtype=torch.float64):
    """Attention computed the plain way, in `compute_dtype`.

    Args:
        q: [batch, seqlen_q, nheads, headdim]; k, v: [batch, seqlen_k, nheads_k, headdim],
            nheads a multiple of nheads_k (GQA/MQA: each group of q heads shares one kv head).
        softmax_scale: default 1 / sqrt(headdim).
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (Gemma-2).
        alibi_slopes: float [nheads] or [batch, nheads].
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
    out = torch.matmul(probs, vf).transpose(1, 2)
    return out, lse

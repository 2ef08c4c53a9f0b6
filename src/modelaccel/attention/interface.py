"""The public attention entry points, with flash-attn 2.x names and semantics."""

import math
import numbers
import os

import torch

from .flash_fwd import flash_attn_forward
from .reference import attention_ref

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEADDIM = 256


def _check_qkv(q, k, v):
    """Raise TypeError/ValueError naming what is wrong with q, k, v (flash-attn layout)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [batch, seqlen, nheads, headdim], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash attention supports torch.float16 and torch.bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, _, nheads, headdim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"batch size of k/v ({k.shape[0]}) differs from q's ({batch})")
    if k.shape[3] != headdim:
        raise ValueError(f"head dim of k/v ({k.shape[3]}) differs from q's ({headdim})")
    if headdim % 8 != 0 or headdim > MAX_HEADDIM or headdim == 0:
        raise ValueError(f"head dim must be a multiple of 8 between 8 and {MAX_HEADDIM}, got {headdim}")
    nheads_k = k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})")


def _check_options(q, dropout_p, softmax_scale, window_size, softcap, alibi_slopes):
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), got {window_size}")
    if not isinstance(softcap, numbers.Real) or softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if alibi_slopes is not None:
        batch, nheads = q.shape[0], q.shape[2]
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError("alibi_slopes must be a torch.Tensor")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")


def _use_triton(q):
    # On CPU tensors the kernel can only run in the Triton interpreter, which must have been
    # switched on before the kernels were defined (TRITON_INTERPRET=1 at import time).
    return q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes):
    if _use_triton(q):
        return flash_attn_forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)
    out, lse = attention_ref(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             compute_dtype=torch.float32)
    return out.to(q.dtype), lse


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes):
        return _forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)

    @staticmethod
    def backward(ctx, dout, dlse):
        raise NotImplementedError("modelaccel.flash_attn_func has no backward pass yet; "
                                  "use torch.nn.functional.scaled_dot_product_attention for training")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Scaled dot-product attention, FlashAttention-2 style (a drop-in for `flash_attn.flash_attn_func`).

    Args:
        q: [batch, seqlen_q, nheads, headdim], fp16 or bf16.
        k, v: [batch, seqlen_k, nheads_k, headdim], same dtype and device; nheads must be a
            multiple of nheads_k (MQA/GQA). headdim: a multiple of 8, at most 256.
            Strided tensors are accepted; a non-contiguous last dim is copied.
        dropout_p: must be 0.0 for now (dropout comes with the backward pass).
        softmax_scale: default 1 / sqrt(headdim).
        causal: mask aligned to the bottom-right corner: query i sees keys
            j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: if > 0, scores = softcap * tanh(scores / softcap) before masking.
        alibi_slopes: float32 [nheads] or [batch, nheads]; adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: accepted for API compatibility; the forward pass is always deterministic.
        return_attn_probs: also return the softmax log-sum-exp.
    Returns:
        out [batch, seqlen_q, nheads, headdim] in q's dtype; with return_attn_probs,
        (out, softmax_lse [batch, nheads, seqlen_q] float32, None).
    """
    _check_qkv(q, k, v)
    _check_options(q, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if dropout_p > 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported yet; pass dropout_p=0.0")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    args = (q, k, v, float(softmax_scale), bool(causal), tuple(window_size), float(softcap), alibi_slopes)
    # The autograd node costs host time on every call; inference does without it.
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = FlashAttnFunc.apply(*args)
    else:
        out, lse = _forward(*args)
    if return_attn_probs:
        return out, lse, None
    return out

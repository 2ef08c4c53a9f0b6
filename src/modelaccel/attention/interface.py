"""The public attention entry points, with flash-attn 2.x names and semantics."""

import math
import numbers
import weakref

import torch

from .flash_bwd import flash_attn_backward
from .flash_fwd import dropout_keep_mask, flash_attn_forward
from .launch import interpreting
from .reference import attention_ref, varlen_attention_ref

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEADDIM = 256


def _check_qkv(q, k, v, layout):
    """Raise TypeError/ValueError naming what is wrong with q, k, v.

    layout: "[batch, seqlen, nheads, headdim]" (rank 4) or "[total, nheads, headdim]" (rank 3).
    """
    rank = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash attention supports torch.float16 and torch.bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"batch size of k/v ({k.shape[0]}) differs from q's ({q.shape[0]})")
    nheads, headdim = q.shape[-2], q.shape[-1]
    if k.shape[-1] != headdim:
        raise ValueError(f"head dim of k/v ({k.shape[-1]}) differs from q's ({headdim})")
    if headdim % 8 != 0 or headdim > MAX_HEADDIM or headdim == 0:
        raise ValueError(f"head dim must be a multiple of 8 between 8 and {MAX_HEADDIM}, got {headdim}")
    nheads_k = k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})")


def _check_options(q, batch, dropout_p, softmax_scale, window_size, softcap, alibi_slopes):
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
        nheads = q.shape[-2]
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError("alibi_slopes must be a torch.Tensor")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")


# Lengths vectors already validated: id -> (weak reference, version, rows, max_seqlen, batch).
# A model passes the same cu_seqlens to every layer; checking it once saves a device sync
# per layer. The weak reference and torch's version counter catch a new tensor at a reused
# id and in-place edits.
_validated_cu_seqlens = {}


def _check_cu_seqlens(name, cu_seqlens, total, max_seqlen, device):
    """Validate a cumulative-lengths vector against its packed tensor; returns the batch size.

    Reading the lengths costs one small device-to-host copy (once per tensor and version);
    a wrong vector would otherwise make the kernels read and write other sequences' rows.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, q on {device}")
    if not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be an int >= 0, got {max_seqlen}")
    version = _version_counter(cu_seqlens)
    seen = _validated_cu_seqlens.get(id(cu_seqlens))
    if (version is not None and seen is not None and seen[0]() is cu_seqlens
            and seen[1:4] == (version, total, max_seqlen)):
        return seen[4]
    values = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but the packed tensor has {total} rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})")
    if version is not None:
        if len(_validated_cu_seqlens) > 64:
            _validated_cu_seqlens.clear()
        _validated_cu_seqlens[id(cu_seqlens)] = (weakref.ref(cu_seqlens), version, total, max_seqlen, len(lengths))
    return len(lengths)


def _version_counter(t):
    # Inference-mode tensors keep no version counter; those are checked on every call.
    try:
        return t._version
    except RuntimeError:
        return None


def _use_triton(q):
    # On CPU tensors the kernel can only run in the Triton interpreter, which must have been
    # switched on before the kernels were defined (TRITON_INTERPRET=1 at import time).
    return q.is_cuda or interpreting()


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_dropout_seed(batch, nheads):
    # From torch's default CPU generator, so torch.manual_seed makes a run reproducible;
    # the kernels add batch * nheads + head to it, which must stay within int32.
    return int(torch.randint(0, 2**31 - 1 - batch * nheads, (1,)).item())


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p, seed):
        out, lse = flash_attn_forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                      dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
        ctx.options = (softmax_scale, causal, window_size, softcap, dropout_p, seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
        softmax_scale, causal, window_size, softcap, dropout_p, seed = ctx.options
        dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None, None


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_size, softcap, alibi_slopes, dropout_p, seed):
        varlen = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        out, lse = flash_attn_forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                      dropout_p, seed, **varlen)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
        ctx.options = (softmax_scale, causal, window_size, softcap, dropout_p, seed, max_seqlen_q, max_seqlen_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        softmax_scale, causal, window_size, softcap, dropout_p, seed, max_seqlen_q, max_seqlen_k = ctx.options
        dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap,
                                         alibi_slopes, dropout_p, seed, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k)
        return dq, dk, dv, *([None] * 11)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Scaled dot-product attention, FlashAttention-2 style (a drop-in for `flash_attn.flash_attn_func`).

    Args:
        q: [batch, seqlen_q, nheads, headdim], fp16 or bf16.
        k, v: [batch, seqlen_k, nheads_k, headdim], same dtype and device; nheads must be a
            multiple of nheads_k (MQA/GQA). headdim: a multiple of 8, at most 256.
            Strided tensors are accepted; a non-contiguous last dim is copied.
        dropout_p: dropout on the attention probabilities (training only). The mask comes
            from Philox numbers seeded from torch's default generator, so torch.manual_seed
            makes it reproducible, and the backward pass regenerates it.
        softmax_scale: default 1 / sqrt(headdim).
        causal: mask aligned to the bottom-right corner: query i sees keys
            j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: if > 0, scores = softcap * tanh(scores / softcap) before masking.
        alibi_slopes: float32 [nheads] or [batch, nheads]; adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: accepted for API compatibility: the backward pass uses no atomics,
            so its gradients are always bit-identical run to run.
        return_attn_probs: also return the softmax log-sum-exp and, with dropout, the keep
            mask (for testing).
    Returns:
        out [batch, seqlen_q, nheads, headdim] in q's dtype; with return_attn_probs,
        (out, softmax_lse [batch, nheads, seqlen_q] float32, keep mask bool
        [batch, nheads, seqlen_q, seqlen_k] if dropout_p > 0 else None).
        Differentiable in q, k and v.
    """
    _check_qkv(q, k, v, "[batch, seqlen, nheads, headdim]")
    _check_options(q, q.shape[0], dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    batch, seqlen_q, nheads, _ = q.shape
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dropout_p = float(dropout_p)
    seed = _new_dropout_seed(batch, nheads) if dropout_p > 0 else 0
    options = (float(softmax_scale), bool(causal), tuple(window_size), float(softcap))
    if _use_triton(q):
        out, lse = FlashAttnFunc.apply(q, k, v, *options, alibi_slopes, dropout_p, seed)
        keep = dropout_keep_mask(batch, nheads, seqlen_q, k.shape[1], dropout_p, seed, q.device) \
            if return_attn_probs and dropout_p > 0 else None
    else:
        # CPU without the interpreter: the reference, differentiable through autograd; its
        # dropout mask comes from torch.rand, not the kernels' Philox stream.
        keep = torch.rand(batch, nheads, seqlen_q, k.shape[1]) >= dropout_p if dropout_p > 0 else None
        out, lse = attention_ref(q, k, v, *options, alibi_slopes, compute_dtype=torch.float32,
                                 dropout_p=dropout_p, dropout_mask=keep)
        out, lse = out.to(q.dtype), lse.detach()
    if return_attn_probs:
        return out, lse, keep
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over a packed batch of variable-length sequences (flash-attn's varlen API).

    Args:
        q: [total_q, nheads, headdim]; k, v: [total_k, nheads_k, headdim], fp16 or bf16:
            the sequences of a batch concatenated, no padding.
        cu_seqlens_q, cu_seqlens_k: int32 [batch + 1], where each sequence starts, from 0
            to total; a sequence may be empty.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's length.
        Other arguments as flash_attn_func; masks (causal, window, ALiBi) are aligned to the
        bottom-right corner of each sequence pair, alibi_slopes may be [batch, nheads].
    Returns:
        out [total_q, nheads, headdim]; with return_attn_probs, (out, softmax_lse
        [nheads, total_q] float32, None). Differentiable in q, k and v.
    """
    _check_qkv(q, k, v, "[total, nheads, headdim]")
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes "
                         f"({cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1})")
    _check_options(q, batch, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dropout_p = float(dropout_p)
    options = (float(softmax_scale), bool(causal), tuple(window_size), float(softcap))
    if _use_triton(q):
        seed = _new_dropout_seed(batch, q.shape[1]) if dropout_p > 0 else 0
        out, lse = FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                             int(max_seqlen_k), *options, alibi_slopes, dropout_p, seed)
    else:
        if dropout_p > 0:
            raise NotImplementedError("dropout in flash_attn_varlen_func needs the Triton kernels "
                                      "(a CUDA GPU or TRITON_INTERPRET=1)")
        out, lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *options, alibi_slopes,
                                        compute_dtype=torch.float32)
        out, lse = out.to(q.dtype), lse.detach()
    if return_attn_probs:
        return out, lse, None
    return out

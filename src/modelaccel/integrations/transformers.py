"""Hugging Face Transformers integration: `attn_implementation="modelaccel"`.

    import modelaccel.integrations.transformers  # registers (or call register())
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="modelaccel", dtype=torch.bfloat16)

Registers an attention function with Transformers' AttentionInterface, and a mask function
with its AttentionMaskInterface, so models hand us no mask (no padding: the causal/window
structure goes to the kernel as flags), the 2D padding mask, which we turn into a packed
batch for flash_attn_varlen_func (under torch.compile inside one custom op, so the graph
does not break there), or, for decoding steps over a static cache or under torch.compile,
SDPA's 4D mask of a fixed shape, which a few queries' plain attention takes.
Any other 4D mask (a custom one) takes the plain PyTorch path with a one-time warning:
slower, never wrong.

`import modelaccel` does not import Transformers; only importing this module does.
"""

import warnings
import weakref

import torch

from ..attention.flash_bwd import flash_attn_backward
from ..attention.flash_fwd import flash_attn_forward
from ..attention.interface import (_use_triton, flash_attn_heads_first, flash_attn_varlen_func,
                                   flash_attn_with_kvcache_heads_first)
from ..attention.padding import pad_input, unpad_input

NAME = "modelaccel"
# Calls with at most this many query rows over a longer key sequence are decoding steps
# (or speculative-decoding verifies) and go to the split-KV kernel.
_DECODE_MAX_QUERIES = 16
_warned = set()
# Static-cache masks padding_mask found unpadded, by id (a weak reference confirms the
# tensor): a model hands the same mask object to every layer, so a prefill into a static
# cache skips packing with one check of the mask's values, not one a layer.
_unpadded_masks = {}


def _warn_once(key, message):
    # Under torch.compile a warning would break the graph; the eager run warns instead.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _explicit_mask_attention(q, k, v, mask, scaling, softcap, dropout, training):
    """Attention under an arbitrary mask (bool: True = attend; float: added to the scores),
    computed plainly in float32. q [b, sq, h, d], k/v [b, sk, hk, d], mask broadcastable to
    [b, h, sq, sk] -> [b, sq, h, d]. Each K/V head meets its group of query heads in one
    product, so K and V are never repeated per query head (a decoding step over a long
    static cache would copy them `group` times a layer)."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    # [b, hk, group * sq, d]: query heads of one K/V head side by side
    qf = q.float().reshape(batch, seqlen_q, nheads_k, group, headdim).permute(0, 2, 3, 1, 4)
    qf = qf.reshape(batch, nheads_k, group * seqlen_q, headdim)
    kf, vf = (t.float().transpose(1, 2) for t in (k, v))
    scores = (qf @ kf.transpose(-1, -2) * scaling).view(batch, nheads_k, group, seqlen_q, seqlen_k)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    mask = mask.expand(batch, nheads, seqlen_q, seqlen_k).view(batch, nheads_k, group, seqlen_q, seqlen_k)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with every key masked give 0
    probs = torch.nn.functional.dropout(probs, dropout, training)
    out = probs.view(batch, nheads_k, group * seqlen_q, seqlen_k) @ vf
    out = out.view(batch, nheads_k, group, seqlen_q, headdim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, seqlen_q, nheads, headdim).to(q.dtype)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, **kwargs):
    """Transformers attention function backed by modelaccel's kernels.

    Args (Transformers' attention-interface conventions):
        query: [batch, nheads, seqlen_q, headdim]; key, value: [batch, nheads_k, seqlen_k,
            headdim], after the cache update (seqlen_k includes the past).
        attention_mask: None, a 2D padding mask [batch, <= seqlen_k] (1 = real token; fewer
            columns than seqlen_k means unfilled static-cache slots), or a 4D mask.
        dropout, scaling, sliding_window, softcap: the layer's settings.
        is_causal: defaults to module.is_causal.
    Returns:
        (attn_output [batch, seqlen_q, nheads, headdim], None): no attention weights.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    in_dtype = query.dtype
    batch, seqlen_q = query.shape[0], query.shape[2]
    if attention_mask is not None and not torch.compiler.is_compiling() and _is_unpadded(attention_mask):
        # a static cache's filled slots, nothing padded: those keys alone, unpacked
        key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
        attention_mask = None
    seqlen_k = key.shape[2]
    window = (-1, -1)
    if sliding_window is not None and seqlen_k > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    options = dict(dropout_p=float(dropout), softmax_scale=scaling, causal=bool(causal), window_size=window,
                   softcap=float(softcap or 0.0))

    if attention_mask is not None and attention_mask.dim() != 2:
        # Decoding steps over a static cache or under torch.compile get a 4D mask from
        # padding_mask; at <= 16 queries the plain path is small and is the one we choose.
        if seqlen_q > _DECODE_MAX_QUERIES:
            _warn_once("mask", f"modelaccel attention got a {attention_mask.dim()}D attention mask it cannot hand "
                               "to its kernels; computing attention in plain PyTorch for such calls")
        # A 4D mask already holds the causal and window structure.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = _explicit_mask_attention(q, k, v, attention_mask, scale, softcap, float(dropout), module.training)
        return out, None
    if in_dtype not in (torch.float16, torch.bfloat16):
        # The kernels take fp16/bf16, as flash-attn's do; Transformers' flash integration
        # casts the same way.
        target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else torch.bfloat16
        _warn_once(("dtype", in_dtype), f"modelaccel attention computes in {target}; the model runs in {in_dtype}")
        query, key, value = (t.to(target) for t in (query, key, value))
    if attention_mask is None and seqlen_q <= _DECODE_MAX_QUERIES and seqlen_k > seqlen_q \
            and not torch.compiler.is_compiling() \
            and not (torch.is_grad_enabled() and query.requires_grad):
        # A decoding step over the cache: the split-KV kernel fills the GPU even at batch 1.
        options.pop("dropout_p")
        out = flash_attn_with_kvcache_heads_first(query, key, value, **options)
    elif attention_mask is None:
        out = flash_attn_heads_first(query, key, value, **options)
    else:
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        mask = attention_mask.bool()
        mask_len = mask.shape[1]
        q_mask = mask[:, -seqlen_q:]  # the queries are the last tokens the mask covers
        if mask_len < seqlen_k:  # static cache: slots past the mask are not filled yet
            mask = torch.cat([mask, mask.new_zeros(batch, seqlen_k - mask_len)], dim=1)
        if not torch.compiler.is_compiling():
            out = _attention_over_padding(q, k, v, q_mask, mask, **options)
        elif (options["dropout_p"] and module.training) or not _use_triton(q):
            # The ops run no dropout (its seed would have to reach the backward) and need the
            # kernels (a GPU or the interpreter): else the same attention, spelled out.
            keep = _padding_to_4d(q_mask, mask, options)
            out = _explicit_mask_attention(q, k, v, keep, options["softmax_scale"] or query.shape[-1] ** -0.5, softcap,
                                           options["dropout_p"], module.training)
        else:
            scale = options["softmax_scale"] or query.shape[-1] ** -0.5
            out = _attention_over_padding_op(q, k, v, q_mask, mask, float(scale), options["causal"],
                                             *options["window_size"], options["softcap"])[0]
    return (out if out.dtype == in_dtype else out.to(in_dtype)), None


def _attention_over_padding(q, k, v, q_mask, k_mask, dropout_p=0.0, softmax_scale=None, causal=True,
                            window_size=(-1, -1), softcap=0.0):
    """A padded batch's attention through flash_attn_varlen_func: q [b, sq, h, d], k/v [b, sk,
    hk, d], q_mask bool [b, sq] and k_mask bool [b, sk] (True = real token) -> [b, sq, h, d],
    zeros at padded queries."""
    batch, seqlen_q = q.shape[:2]
    (q_p, k_p, v_p), q_index, _, packing = _packed(q, k, v, q_mask, k_mask)
    out_p = flash_attn_varlen_func(q_p, k_p, v_p, **packing, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                   causal=causal, window_size=window_size, softcap=softcap)
    return pad_input(out_p, q_index, batch, seqlen_q)


def _padding_to_4d(q_mask, k_mask, options):
    """The bool [b, 1, sq, sk] mask of _attention_over_padding: each real query sees the real
    keys under the causal and window structure, aligned bottom-right within its sequence as
    the varlen kernels align it (query i of n real ones against m real keys sits at key
    m - n + i); padded queries see nothing (their output is 0)."""
    q_pos = q_mask.cumsum(1) - 1 + (k_mask.sum(1, keepdim=True) - q_mask.sum(1, keepdim=True))  # [b, sq]
    k_pos = k_mask.cumsum(1) - 1  # [b, sk]: each real key's index among the real ones
    rows, cols = q_pos[:, None, :, None], k_pos[:, None, None, :]
    allowed = q_mask[:, None, :, None] & k_mask[:, None, None, :]
    left, right = options["window_size"]
    if options["causal"]:
        right = 0
    if right >= 0:
        allowed = allowed & (cols <= rows + right)
    if left >= 0:
        allowed = allowed & (cols >= rows - left)
    return allowed


# Under torch.compile the packing (its sizes depend on the mask's values) runs inside opaque
# ops, so the graph does not break at the attention call: out has q's shape, and the
# log-sum-exp the backward needs is kept padded, [b, sq, h].
@torch.library.custom_op("modelaccel::attention_over_padding", mutates_args=())
def _attention_over_padding_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mask: torch.Tensor,
                               k_mask: torch.Tensor, softmax_scale: float, causal: bool, window_left: int,
                               window_right: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q = q.shape[:2]
    (q_p, k_p, v_p), q_index, _, packing = _packed(q, k, v, q_mask, k_mask)
    out_p, lse_p = flash_attn_forward(q_p, k_p, v_p, softmax_scale, causal, (window_left, window_right), softcap,
                                      **packing)
    return pad_input(out_p, q_index, batch, seqlen_q), pad_input(lse_p.t(), q_index, batch, seqlen_q)


@_attention_over_padding_op.register_fake
def _(q, k, v, q_mask, k_mask, softmax_scale, causal, window_left, window_right, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("modelaccel::attention_over_padding_bwd", mutates_args=())
def _attention_over_padding_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   out: torch.Tensor, lse: torch.Tensor, q_mask: torch.Tensor, k_mask: torch.Tensor,
                                   softmax_scale: float, causal: bool, window_left: int, window_right: int,
                                   softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    (q_p, k_p, v_p), q_index, k_index, packing = _packed(q, k, v, q_mask, k_mask)
    dout_p, out_p, lse_p = (t.reshape(batch * seqlen_q, *t.shape[2:]).index_select(0, q_index)
                            for t in (dout, out, lse))
    dq, dk, dv = flash_attn_backward(dout_p, q_p, k_p, v_p, out_p, lse_p.t().contiguous(), softmax_scale, causal,
                                     (window_left, window_right), softcap, **packing)
    return (pad_input(dq, q_index, batch, seqlen_q), pad_input(dk, k_index, batch, seqlen_k),
            pad_input(dv, k_index, batch, seqlen_k))


@_attention_over_padding_bwd_op.register_fake
def _(dout, q, k, v, out, lse, q_mask, k_mask, softmax_scale, causal, window_left, window_right, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _packed(q, k, v, q_mask, k_mask):
    """The packed q, k, v of a padded batch, the real tokens' flat indices and the kernels'
    cu_seqlens / max_seqlen arguments."""
    q_p, q_index, cu_q, max_q, _ = unpad_input(q, q_mask)
    k_p, k_index, cu_k, max_k, _ = unpad_input(k, k_mask)
    v_p = unpad_input(v, k_mask)[0]
    packing = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    return (q_p, k_p, v_p), q_index, k_index, packing


def _attention_over_padding_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output, *inputs[3:5])
    ctx.options = inputs[5:]
    ctx.mark_non_differentiable(output[1])


def _attention_over_padding_backward(ctx, dout, dlse):
    grads = _attention_over_padding_bwd_op(dout.contiguous(), *ctx.saved_tensors, *ctx.options)
    return (*grads, *([None] * 7))


_attention_over_padding_op.register_autograd(_attention_over_padding_backward,
                                             setup_context=_attention_over_padding_setup_context)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """Transformers mask function. As flash-attn's mask preparation: None where nothing is
    padded (the kernels take causality and the window as flags), else the 2D padding mask
    [batch, kv_length] (bool), which attention_forward packs. Two cases differ:

    - A static cache holds kv_length slots of which only the first q_offset + q_length
      (less kv_offset) are filled; flags alone would let queries see the empty ones. A
      prefill (> 16 queries) gets the 2D mask of the filled slots (made of ones where
      nothing is padded, noted as unpadded so that attention_forward takes those keys
      unpacked, with one look at the mask's values here rather than one a layer).
    - A decoding step (<= 16 queries) over a static cache, or under torch.compile with a
      mask, gets Transformers' SDPA mask: 4D bool [batch, 1, q_length, kv_length] or None,
      with padding, causality and window, made without reading the mask's values (which
      would break a compiled graph) and of one shape every step (flash-attn's 2D mask
      grows a column a step: generate's compiled step recorded a CUDA graph per token).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    compiling = torch.compiler.is_compiling()
    short_mask = attention_mask is not None and attention_mask.shape[-1] < kv_length
    # A static layer's offset is a tensor (Transformers keeps it one to spare compiled graphs
    # a read), which also keeps the answer the same once the cache is full.
    # Fewer filled slots than keys means a static cache only for a causal mask: cross-attention
    # (bidirectional) has kv_length > q_length at offset 0 as well.
    static = short_mask or isinstance(q_offset, torch.Tensor) or (
        q_offset + q_length - kv_offset < kv_length and _hides_later_keys(mask_function))
    args = (batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    decoding = q_length <= _DECODE_MAX_QUERIES
    if (static and (decoding or compiling)) or (decoding and compiling and attention_mask is not None):
        if static:  # SDPA's None means its is_causal, aligned top-left; our kernels align bottom-right
            kwargs["allow_is_causal_skip"] = False
        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)
    if compiling and attention_mask is not None and not static:
        # Flash-attn's preparation asks whether anything is padded, a branch on the mask's
        # values that breaks a compiled graph; an unpadded batch packs to itself.
        return attention_mask[:, -kv_length:].bool()
    mask = ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"](*args, **kwargs)
    if static:
        filled = int(q_offset) + q_length - int(kv_offset)
        if mask is None:
            # only its shape is read (attention_forward), so it may live on the CPU
            mask = torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device", "cpu"))
        if bool(mask.all()):
            _unpadded_masks[id(mask)] = weakref.ref(mask, lambda _, key=id(mask): _unpadded_masks.pop(key, None))
    return mask


def _hides_later_keys(mask_function):
    """Whether a Transformers mask function hides key 1 from query 0 (causal ones do). It
    is index-based: asked of CPU scalars, it answers without touching the model's device."""
    if mask_function is None:
        return False
    zero, one = torch.tensor(0), torch.tensor(1)
    try:
        return not bool(mask_function(zero, zero, zero, one))
    except Exception:  # noqa: BLE001 - a custom function that cannot be asked: treat it as not causal
        return False


def _is_unpadded(mask):
    ref = _unpadded_masks.get(id(mask))
    return ref is not None and ref() is mask


def register():
    """Register attn_implementation="modelaccel" with Transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    try:  # the mask interface exists in Transformers >= 4.53
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return
    AttentionMaskInterface.register(NAME, padding_mask)


register()

"""Packing padded batches for the variable-length attention API, and unpacking them again.

`unpad_input` turns a padded batch [batch, seqlen, ...] plus its attention mask into the
packed layout `flash_attn_varlen_func` takes ([total_tokens, ...] and cumulative sequence
lengths); `pad_input` puts a packed result back. The semantics (argument order, the 5-tuple
returned, flattened row-major token indices) follow flash-attn's `bert_padding` module so
code written against flash-attn ports unchanged.

Both are plain indexing ops (`index_select` and `index_put`), so autograd differentiates
them: the gradient of a gather is a scatter-add and the other way round.
"""

import torch


def _check_mask(hidden_states, attention_mask):
    if not isinstance(hidden_states, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("hidden_states and attention_mask must be torch.Tensors, got "
                        f"{type(hidden_states).__name__} and {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have 2 dims [batch, seqlen], got shape {tuple(attention_mask.shape)}")
    if hidden_states.dim() < 2:
        raise ValueError("hidden_states must have at least 2 dims [batch, seqlen, ...], "
                         f"got shape {tuple(hidden_states.shape)}")
    if tuple(hidden_states.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the first two dims "
                         f"[batch, seqlen] of hidden_states {tuple(hidden_states.shape)}")
    # An additive float mask (0 / -inf) would read as "every token real" if taken as truthy;
    # refuse floats rather than guess which convention the caller meant.
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must be bool or integer (1 = real token, 0 = padding), "
                         f"got {attention_mask.dtype}")
    if attention_mask.device != hidden_states.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, hidden_states on {hidden_states.device}")


def unpad_input(hidden_states, attention_mask):
    """Remove the padding tokens of a batch, packing the real ones back to back.

    Args:
        hidden_states: [batch, seqlen, ...] tensor of any dtype (e.g. q/k/v as
            [batch, seqlen, nheads, headdim]).
        attention_mask: [batch, seqlen], bool or integer, nonzero = real token. Padding may
            sit on the left, on the right or anywhere; a row may be all padding.
    Returns:
        (hidden_states_unpadded, indices, cu_seqlens, max_seqlen_in_batch, seqused):
        - hidden_states_unpadded: [total, ...], the real tokens in batch order, then position
          order within each sequence; differentiable with respect to hidden_states.
        - indices: int64 [total], each real token's position in the flattened
          [batch * seqlen] layout (what `pad_input` needs to scatter back).
        - cu_seqlens: int32 [batch + 1], cumulative sequence lengths starting at 0.
        - max_seqlen_in_batch: python int, the longest sequence (0 for an empty batch).
        - seqused: int32 [batch], each sequence's length.
    """
    _check_mask(hidden_states, attention_mask)
    batch, seqlen = attention_mask.shape
    real = attention_mask != 0
    seqlens = real.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()
    # .item() synchronises with the device; the varlen kernels need the maximum on the host.
    max_seqlen = int(seqlens.max().item()) if batch > 0 else 0
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=attention_mask.device)
    cu_seqlens[1:] = torch.cumsum(seqlens, dim=0, dtype=torch.int32)
    flat = hidden_states.reshape(batch * seqlen, *hidden_states.shape[2:])
    return flat.index_select(0, indices), indices, cu_seqlens, max_seqlen, seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    """Scatter packed tokens back into a padded batch, zeros at the padding positions.

    Args:
        hidden_states: [total, ...] packed tokens (e.g. the output of `flash_attn_varlen_func`).
        indices: int64 [total], flattened [batch * seqlen] positions, as `unpad_input` returns.
        batch, seqlen: the padded shape to rebuild.
    Returns:
        [batch, seqlen, ...] tensor in hidden_states' dtype and device; differentiable with
        respect to hidden_states (padding positions get no gradient).
    """
    if not isinstance(hidden_states, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("hidden_states and indices must be torch.Tensors")
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have at least 1 dim [total, ...], got a scalar")
    if indices.dim() != 1:
        raise ValueError(f"indices must have 1 dim [total], got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 (or int32), got {indices.dtype}")
    if indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but hidden_states has {hidden_states.shape[0]} "
                         "tokens")
    batch, seqlen = int(batch), int(seqlen)
    if batch < 0 or seqlen < 0:
        raise ValueError(f"batch and seqlen must be >= 0, got {batch}, {seqlen}")
    if indices.device != hidden_states.device:
        raise ValueError(f"indices is on {indices.device}, hidden_states on {hidden_states.device}")
    rest = hidden_states.shape[1:]
    # Out-of-place index_put: autograd takes the gradient as a gather of the same indices.
    zeros = hidden_states.new_zeros(batch * seqlen, *rest)
    out = zeros.index_put((indices.long(),), hidden_states)
    return out.reshape(batch, seqlen, *rest)

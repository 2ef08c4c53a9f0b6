"""unpad_input / pad_input: flash-attn bert_padding semantics, gradients, edge cases."""

import pytest
import torch

from modelaccel.attention.padding import pad_input, unpad_input


def mask_from_lengths(lengths, seqlen, left=False):
    pos = torch.arange(seqlen)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return pos >= seqlen - lengths if left else pos < lengths


@pytest.mark.parametrize("left", [False, True])
def test_round_trip_and_outputs(left):
    torch.manual_seed(0)
    lengths = [5, 0, 8, 3]
    batch, seqlen = len(lengths), 8
    x = torch.randn(batch, seqlen, 3, 4)
    mask = mask_from_lengths(lengths, seqlen, left=left)
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)

    assert packed.shape == (sum(lengths), 3, 4)
    assert indices.dtype == torch.int64 and indices.shape == (sum(lengths),)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 5, 5, 13, 16]
    assert seqused.dtype == torch.int32 and seqused.tolist() == lengths
    assert isinstance(max_seqlen, int) and max_seqlen == 8
    # Tokens come out in batch order, then position order, and match the mask's positions.
    expected = torch.cat([x[b][mask[b]] for b in range(batch)])
    torch.testing.assert_close(packed, expected, rtol=0, atol=0)
    assert indices.tolist() == [b * seqlen + s for b in range(batch) for s in range(seqlen) if mask[b, s]]

    padded = pad_input(packed, indices, batch, seqlen)
    assert padded.shape == x.shape
    torch.testing.assert_close(padded, x * mask[:, :, None, None], rtol=0, atol=0)


def test_int_mask_and_holes_match_bool_mask():
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    a = unpad_input(x, mask)
    b = unpad_input(x, mask.bool())
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v)
        else:
            assert u == v
    assert a[2].tolist() == [0, 4, 4] and a[3] == 4 and a[4].tolist() == [4, 0]


def test_all_padding_batch():
    x = torch.randn(3, 4, 2)
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, torch.zeros(3, 4, dtype=torch.bool))
    assert packed.shape == (0, 2) and indices.numel() == 0
    assert cu_seqlens.tolist() == [0, 0, 0, 0] and max_seqlen == 0 and seqused.tolist() == [0, 0, 0]
    torch.testing.assert_close(pad_input(packed, indices, 3, 4), torch.zeros(3, 4, 2))


def test_two_dim_hidden_states():
    # [batch, seqlen] without feature dims, e.g. token ids or position ids.
    ids = torch.arange(12).reshape(3, 4)
    mask = mask_from_lengths([4, 1, 2], 4)
    packed, indices, *_ = unpad_input(ids, mask)
    assert packed.tolist() == [0, 1, 2, 3, 4, 8, 9]
    assert torch.equal(pad_input(packed, indices, 3, 4), ids * mask)


def test_gradients_flow():
    torch.manual_seed(0)
    mask = mask_from_lengths([3, 0, 5], 5, left=True)
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    packed, indices, *_ = unpad_input(x, mask)
    w = torch.randn_like(packed)
    (packed * w).sum().backward()
    expected = torch.zeros_like(x)
    expected[mask] = w
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)

    y = torch.randn(packed.shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 2, dtype=torch.float64)
    (pad_input(y, indices, 3, 5) * g).sum().backward()
    torch.testing.assert_close(y.grad, g[mask], rtol=0, atol=0)

    # Both directions together pass torch's numerical gradient check.
    assert torch.autograd.gradcheck(lambda t: pad_input(unpad_input(t, mask)[0] * 2.0, indices, 3, 5), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_exact(dtype):
    x = torch.randn(2, 7, 4, 8).to(dtype)
    mask = mask_from_lengths([7, 2], 7)
    packed, indices, *_ = unpad_input(x, mask)
    assert packed.dtype == dtype
    assert torch.equal(pad_input(packed, indices, 2, 7), x * mask[:, :, None, None].to(dtype))


@pytest.mark.parametrize("x_shape,mask_shape,match", [
    ((2, 5, 4), (2, 6), "does not match"),
    ((2, 5, 4), (3, 5), "does not match"),
    ((2, 5, 4), (2, 5, 1), "2 dims"),
    ((10,), (2, 5), "at least 2 dims"),
])
def test_unpad_input_rejects_bad_shapes(x_shape, mask_shape, match):
    with pytest.raises(ValueError, match=match):
        unpad_input(torch.randn(x_shape), torch.ones(mask_shape, dtype=torch.bool))


def test_unpad_input_rejects_float_mask():
    with pytest.raises(ValueError, match="bool or integer"):
        unpad_input(torch.randn(2, 3), torch.zeros(2, 3))


def test_pad_input_rejects_bad_indices():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="entries"):
        pad_input(x, torch.arange(3), 2, 4)
    with pytest.raises(ValueError, match="1 dim"):
        pad_input(x, torch.arange(4).reshape(2, 2), 2, 4)
    with pytest.raises(ValueError, match="int64"):
        pad_input(x, torch.arange(4).float(), 2, 4)


def _has_varlen():
    import modelaccel

    return hasattr(modelaccel, "flash_attn_varlen_func")


@pytest.mark.skipif(not _has_varlen(), reason="flash_attn_varlen_func has not landed yet")
@pytest.mark.parametrize("left", [False, True])
def test_unpad_varlen_pad_matches_per_sequence_attention(left):
    # The intended use: padded batch -> packed -> varlen attention -> padded again. Real rows
    # must equal attention over each sequence alone; gradients reach only real tokens.
    import modelaccel
    from modelaccel.attention.reference import attention_ref

    torch.manual_seed(0)
    lengths, seqlen, nheads, headdim = [37, 0, 64, 5], 64, 2, 32
    batch = len(lengths)
    mask = mask_from_lengths(lengths, seqlen, left=left)
    q, k, v = (torch.randn(batch, seqlen, nheads, headdim, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    (qu, indices, cu, max_len, _), (ku, *_), (vu, *_) = (unpad_input(t, mask) for t in (q, k, v))
    out = pad_input(modelaccel.flash_attn_varlen_func(qu, ku, vu, cu, cu, max_len, max_len, causal=True),
                    indices, batch, seqlen)
    out.float().sum().backward()
    for b, n in enumerate(lengths):
        real = mask[b]
        if n == 0:
            assert not out[b].any()
            continue
        ref, _ = attention_ref(q[b][real][None].detach(), k[b][real][None].detach(), v[b][real][None].detach(),
                               causal=True)
        torch.testing.assert_close(out[b][real].float(), ref[0].float(), atol=2e-3, rtol=2e-3)
        assert not out[b][~real].any()
    for t in (q, k, v):
        assert t.grad is not None and not t.grad[~mask].any() and torch.isfinite(t.grad).all()

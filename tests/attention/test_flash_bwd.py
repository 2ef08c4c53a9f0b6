"""Backward pass, variable-length batches and dropout against the float64 reference.

On a CPU machine these run the Triton kernels in the interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernels.
"""

import pytest
import torch

import modelaccel
from modelaccel.attention.flash_bwd import _launch_delta, flash_attn_backward
from modelaccel.attention.flash_fwd import dropout_keep_mask, flash_attn_forward
from modelaccel.attention.reference import attention_ref, varlen_attention_ref
from modelaccel.testing import assert_attention_close, assert_grads_close, random_qkv as make_qkv

DTYPES = [torch.float16, torch.bfloat16]


def randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def reference_grads(q, k, v, dout, **kwargs):
    """Output and (dq, dk, dv) of the float64 reference, by autograd."""
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(q64, k64, v64, **kwargs)
    out.backward(dout.cpu().double())
    return out.detach(), lse, (q64.grad, k64.grad, v64.grad)


def kernel_grads(q, k, v, dout, blocks=None, atomic_dq=None, dq_tma=None, **kwargs):
    """Forward then backward through the launchers, into NaN-poisoned gradient buffers."""
    scale = kwargs.pop("softmax_scale", q.shape[-1] ** -0.5)
    out, lse = flash_attn_forward(q, k, v, scale, **kwargs)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_attn_backward(dout, q, k, v, out, lse, scale, atomic_dq=atomic_dq, dq_tma=dq_tma, blocks=blocks, grads=grads,
                        **kwargs)
    return out, lse, grads


def check_grads(q, k, v, blocks=None, seed=0, atomic_dq=None, dq_tma=None, **kwargs):
    dout = randn(q.shape, q.dtype, q.device, torch.Generator().manual_seed(seed + 100))
    out, lse, grads = kernel_grads(q, k, v, dout, blocks=blocks, atomic_dq=atomic_dq, dq_tma=dq_tma, **kwargs)
    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, dout, **kwargs)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
    return assert_grads_close(grads, ref_grads, q.dtype)


SHAPES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim)
    (1, 37, 53, 2, 2, 64),
    (2, 53, 37, 4, 2, 40),
    (1, 1, 40, 4, 1, 128),
    (1, 45, 45, 4, 4, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic", "atomic_dq"])
def test_grads_match_reference(shape, causal, atomic_dq, dtype, device):
    q, k, v = make_qkv(*shape, dtype=dtype, device=device, seed=sum(shape))
    check_grads(q, k, v, causal=causal, atomic_dq=atomic_dq)


@pytest.mark.parametrize("blocks", [((16, 32), (32, 16)), ((32, 16), (16, 32))], ids=["dq16x32", "dq32x16"])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (9, 5)), (True, (20, -1)),
                                                (False, (0, 0)), (False, (-1, 3))])
def test_grads_masks_and_blocks(blocks, causal, window_size, device):
    """Mask edges inside and across tiles, with unequal block shapes in both kernels."""
    for shape in [(1, 45, 77, 2, 1, 64), (1, 77, 45, 2, 2, 48)]:
        q, k, v = make_qkv(*shape, dtype=torch.float16, device=device, seed=sum(shape))
        check_grads(q, k, v, blocks=blocks, causal=causal, window_size=window_size)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (False, (9, 5))])
def test_launch_group_order(group, causal, window_size, device, monkeypatch):
    """Programs numbered longest first in groups of batch-heads (the launch-order switch
    of the forward, dQ and dK/dV kernels) still cover every block once: out, lse and grads
    match the reference, also when the batch-heads do not fill the last group (10 of 3s)."""
    from modelaccel.attention import flash_fwd

    monkeypatch.setattr(flash_fwd, "LAUNCH_GROUP", group)
    for shape in [(1, 77, 45, 2, 1, 64), (2, 40, 61, 5, 5, 32)]:
        q, k, v = make_qkv(*shape, dtype=torch.float16, device=device, seed=sum(shape))
        check_grads(q, k, v, blocks=((16, 32), (32, 16)), causal=causal, window_size=window_size)
        check_grads(q, k, v, blocks=((16, 32), (32, 16)), causal=causal, window_size=window_size, atomic_dq=True)


def test_launch_group_keeps_the_dropout_mask(device, monkeypatch):
    """Each program draws dropout from its own batch-head's seed, wherever the launch order
    puts it: out and grads are the same bits in grid order and in groups."""
    from modelaccel.attention import flash_fwd

    q, k, v = make_qkv(2, 40, 61, 5, 5, 32, dtype=torch.float16, device=device, seed=5)
    dout = torch.randn_like(q)
    results = []
    for group in (0, 3):
        monkeypatch.setattr(flash_fwd, "LAUNCH_GROUP", group)
        results.append(kernel_grads(q, k, v, dout, blocks=((16, 32), (32, 16)), causal=True, dropout_p=0.3, seed=11))
    (out0, lse0, grads0), (out1, lse1, grads1) = results
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    for a, b in zip(grads0, grads1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_softcap_alibi(dtype, device):
    q, k, v = make_qkv(2, 40, 56, 4, 2, 64, dtype=dtype, device=device, seed=3)
    q = q * 3  # large scores, so the cap actually bends them
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)).to(device) * 0.5
    check_grads(q, k, v, causal=True, softcap=5.0)
    check_grads(q, k, v, alibi_slopes=slopes, window_size=(13, 7))
    check_grads(q, k, v, causal=True, alibi_slopes=slopes[0].contiguous(), softcap=2.0, softmax_scale=0.3)


@pytest.mark.parametrize("atomic_dq", [False, True], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("headdim", [8, 24, 72, 160, 256])
def test_grads_head_dims(headdim, atomic_dq, device):
    q, k, v = make_qkv(1, 33, 41, 2, 1, headdim, dtype=torch.bfloat16, device=device, seed=headdim)
    check_grads(q, k, v, causal=True, atomic_dq=atomic_dq)


def test_rows_that_see_no_key_get_zero_grads(device):
    q, k, v = make_qkv(1, 50, 20, 2, 2, 64, dtype=torch.float16, device=device)
    check_grads(q, k, v, causal=True)
    dout = torch.randn_like(q)
    _, _, (dq, _, _) = kernel_grads(q, k, v, dout, causal=True)
    assert torch.equal(dq[:, :30], torch.zeros_like(dq[:, :30]))


@pytest.mark.parametrize("causal,window_size,softcap", [(True, (-1, -1), 0.0), (False, (9, 5), 3.0),
                                                        (True, (20, -1), 0.0)])
@pytest.mark.parametrize("dq_tma", [False, True], ids=["atomics", "tma_reduce"])
def test_atomic_dq_matches_reference(causal, window_size, softcap, dq_tma, device):
    """The atomic-dQ strategy (deterministic=False on a GPU) over masks, GQA and softcap, its
    tiles added by the threads' atomics or by a TMA reduce (head dim 48: the box is wider
    than the head, and the rows run past the sequence)."""
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(1)).to(device) * 0.3
    for shape, blocks in [((2, 45, 77, 4, 1, 64), ((16, 32), (32, 16))), ((1, 77, 45, 4, 4, 48), ((32, 16), (16, 32)))]:
        q, k, v = make_qkv(*shape, dtype=torch.bfloat16, device=device, seed=sum(shape))
        check_grads(q, k, v, blocks=blocks, atomic_dq=True, dq_tma=dq_tma, causal=causal, window_size=window_size,
                    softcap=softcap, alibi_slopes=slopes if softcap else None)


@pytest.mark.parametrize("dq_tma", [False, True], ids=["atomics", "tma_reduce"])
def test_atomic_dq_with_dropout_and_varlen(dq_tma, device):
    """Dropout, and a packed batch, where a TMA reduce box reaches into the next sequence's
    rows (adding exact zeros there)."""
    q, k, v = make_qkv(2, 40, 56, 4, 2, 64, dtype=torch.float16, device=device, seed=5)
    dout = randn(q.shape, q.dtype, device, torch.Generator().manual_seed(3))
    _, _, grads = kernel_grads(q, k, v, dout, atomic_dq=True, dq_tma=dq_tma, causal=True, dropout_p=0.3, seed=77)
    keep = dropout_keep_mask(2, 4, 40, 56, 0.3, 77, device)
    _, _, ref_grads = reference_grads(q, k, v, dout, causal=True, dropout_p=0.3, dropout_mask=keep.cpu())
    assert_grads_close(grads, ref_grads, q.dtype)

    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [5, 0, 17, 33, 1], [9, 3, 17, 20, 0]
    (q, cu_q), (k, cu_k), (v, _) = (packed(lens, h, 64, torch.float16, device, gen)
                                    for lens, h in ((lens_q, 4), (lens_k, 2), (lens_k, 2)))
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=33, max_seqlen_k=20)
    out, lse = flash_attn_forward(q, k, v, 0.125, causal=True, **varlen)
    dout = randn(q.shape, q.dtype, device, gen)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_attn_backward(dout, q, k, v, out, lse, 0.125, causal=True, atomic_dq=True, dq_tma=dq_tma, grads=grads,
                        **varlen)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = varlen_attention_ref(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), softmax_scale=0.125, causal=True)
    ref_out.backward(dout.cpu().double())
    assert_grads_close(grads, (q64.grad, k64.grad, v64.grad), q.dtype)


@pytest.mark.parametrize("headdim", [40, 128])
def test_delta_kernel_zeroes_the_dq_accumulator(headdim, device):
    """The atomic strategy's dQ accumulator comes from torch.empty; the delta kernel writes
    its zeros (every element, head dims narrower than the tile included) next to delta."""
    gen = torch.Generator().manual_seed(2)
    out, dout = (randn((2, 70, 3, headdim), torch.bfloat16, device, gen) for _ in range(2))
    lse_like = torch.empty(2, 3, 70, device=device)
    delta = torch.full_like(lse_like, float("nan"))
    dq_acc = torch.full((2, 70, 3, headdim), float("nan"), device=device)
    _launch_delta(out, dout, delta, (lse_like.stride(0), lse_like.stride(1)), 3, 70, dq_acc=dq_acc)
    assert torch.equal(dq_acc, torch.zeros_like(dq_acc))
    ref = (out.float() * dout.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)


def test_public_api_autograd_and_determinism(device):
    q, k, v = make_qkv(2, 29, 31, 4, 2, 64, dtype=torch.bfloat16, device=device, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)
    runs = []
    for _ in range(2):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = modelaccel.flash_attn_func(qg, kg, vg, causal=True, deterministic=True)
        out.backward(dout)
        runs.append((qg.grad, kg.grad, vg.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # no atomics: bit-identical
    _, _, ref_grads = reference_grads(q, k, v, dout, causal=True)
    assert_grads_close(runs[0], ref_grads, q.dtype)


def test_backward_keeps_only_inputs_out_and_lse(device):
    """Nothing of size seqlen_q x seqlen_k is saved for backward."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 128, 128, 1, 1, 16, dtype=torch.float16, device=device))
    out = modelaccel.flash_attn_func(q, k, v, causal=True)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert saved and max(t.numel() for t in saved) < 128 * 128
    assert {tuple(t.shape) for t in saved} <= {tuple(q.shape), (1, 1, 128)}


# ---- variable-length batches ------------------------------------------------------------

def packed(lengths, nheads, headdim, dtype, device, gen):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return randn((sum(lengths), nheads, headdim), dtype, device, gen), cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 3))])
def test_varlen_forward_backward(dtype, causal, window_size, device):
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [5, 0, 17, 33, 1], [9, 3, 17, 20, 0]  # empty sequences on both sides
    q, cu_q = packed(lens_q, 4, 64, dtype, device, gen)
    k, cu_k = packed(lens_k, 2, 64, dtype, device, gen)
    v, _ = packed(lens_k, 2, 64, dtype, device, gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse, _ = modelaccel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 20, causal=causal,
                                                    window_size=window_size, return_attn_probs=True)
    assert lse.shape == (4, sum(lens_q))
    dout = randn(out.shape, dtype, device, gen)
    out.backward(dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_ref(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), causal=causal,
                                            window_size=window_size)
    ref_out.backward(dout.cpu().double())
    assert_attention_close(out, lse, ref_out.detach(), ref_lse, dtype)
    assert_grads_close((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), dtype)


def test_varlen_matches_padded_dense(device):
    """Sequences of one length packed: the same numbers as the dense call."""
    q, k, v = make_qkv(3, 24, 24, 2, 2, 32, dtype=torch.float16, device=device)
    dense = modelaccel.flash_attn_func(q, k, v, causal=True)
    cu = torch.arange(0, 73, 24, dtype=torch.int32, device=device)
    flat = [t.reshape(72, 2, 32) for t in (q, k, v)]
    packed_out = modelaccel.flash_attn_varlen_func(*flat, cu, cu, 24, 24, causal=True)
    torch.testing.assert_close(packed_out, dense.reshape(72, 2, 32), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mutate,match", [
    (lambda cu: cu.long(), "int32"),
    (lambda cu: cu.flip(0), "start at 0"),
    (lambda cu: torch.cat([cu[:-1], cu[-1:] + 1]), "ends at"),
    (lambda cu: cu[:, None], "1-D"),
])
def test_varlen_bad_cu_seqlens(mutate, match, device):
    gen = torch.Generator().manual_seed(0)
    q, cu = packed([4, 6], 2, 32, torch.float16, device, gen)
    with pytest.raises(ValueError, match=match):
        modelaccel.flash_attn_varlen_func(q, q, q, mutate(cu), cu, 6, 6)


def test_varlen_revalidates_edited_cu_seqlens(device):
    """Validation is cached per tensor, but an in-place edit is seen."""
    gen = torch.Generator().manual_seed(0)
    q, cu = packed([4, 6], 2, 32, torch.float16, device, gen)
    modelaccel.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    cu[1] = 8  # lengths 8 and 2: now longer than max_seqlen 6
    with pytest.raises(ValueError, match="smaller than the longest"):
        modelaccel.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    with torch.inference_mode():  # no version counter there: checked every time
        bad = cu.clone()
        for _ in range(2):
            with pytest.raises(ValueError, match="smaller than the longest"):
                modelaccel.flash_attn_varlen_func(q, q, q, bad, bad, 6, 6)


def test_varlen_bad_max_seqlen_and_batch(device):
    gen = torch.Generator().manual_seed(0)
    q, cu = packed([4, 6], 2, 32, torch.float16, device, gen)
    with pytest.raises(ValueError, match="smaller than the longest"):
        modelaccel.flash_attn_varlen_func(q, q, q, cu, cu, 5, 6)
    k, cu_k = packed([4, 3, 3], 2, 32, torch.float16, device, gen)
    with pytest.raises(ValueError, match="different batch sizes"):
        modelaccel.flash_attn_varlen_func(q, k, k, cu, cu_k, 6, 4)
    with pytest.raises(ValueError, match="3 dims"):
        modelaccel.flash_attn_varlen_func(q[None], q[None], q[None], cu, cu, 6, 6)


# ---- dropout ------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keep_rate(dropout_p, device):
    q, k, v = make_qkv(2, 64, 96, 4, 2, 32, dtype=torch.float16, device=device)
    _, _, keep = modelaccel.flash_attn_func(q, k, v, dropout_p=dropout_p, return_attn_probs=True)
    n = keep.numel()
    rate = keep.float().mean().item()
    std = ((1 - dropout_p) * dropout_p / n) ** 0.5
    assert abs(rate - (1 - dropout_p)) < 5 * std, (rate, 1 - dropout_p, std)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_forward_backward_match_reference_with_same_mask(dtype, device):
    q, k, v = make_qkv(2, 40, 56, 4, 2, 64, dtype=dtype, device=device, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.manual_seed(1)
    out, lse, keep = modelaccel.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    out.backward(dout)
    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, dout, causal=True, dropout_p=0.3, dropout_mask=keep.cpu())
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    assert_grads_close((q.grad, k.grad, v.grad), ref_grads, dtype)


def test_dropout_reproducible_under_manual_seed(device):
    q, k, v = make_qkv(1, 32, 32, 2, 2, 32, dtype=torch.float16, device=device)
    torch.manual_seed(123)
    first = modelaccel.flash_attn_func(q, k, v, dropout_p=0.2)
    torch.manual_seed(123)
    again = modelaccel.flash_attn_func(q, k, v, dropout_p=0.2)
    other = modelaccel.flash_attn_func(q, k, v, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_varlen_dropout_matches_dense_statistics(device):
    gen = torch.Generator().manual_seed(2)
    q, cu = packed([30, 20], 2, 32, torch.float16, device, gen)
    q.requires_grad_()
    out = modelaccel.flash_attn_varlen_func(q, q, q, cu, cu, 30, 30, dropout_p=0.5, causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    no_drop = modelaccel.flash_attn_varlen_func(q, q, q, cu, cu, 30, 30, causal=True)
    assert not torch.equal(out, no_drop)

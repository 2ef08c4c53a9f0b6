"""The one-launch KV append (with rotary) against the PyTorch path it replaces, which stays
the reference (reference.append_kv_ref). On CPU it runs in the interpreter."""

import pytest
import torch

from modelaccel.attention.kv_append import append_kv
from modelaccel.attention.reference import append_kv_ref
from modelaccel.testing import random_kv_cache as make_cache


def assert_rotated_equal(got, expect):
    """Equal up to the last bit of the dtype: the rotation's float32 result is rounded once,
    by the Triton interpreter towards zero for bf16 (torch and the GPU round to nearest),
    and a GPU may fuse its multiply-adds."""
    torch.testing.assert_close(got, expect, rtol=torch.finfo(got.dtype).eps, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "rows_leftpad", "paged"])
@pytest.mark.parametrize("rotary", [None, "interleaved", "neox"])
@pytest.mark.parametrize("q_steps,seqlen_q,seqlen_new", [(True, 3, 2), (False, 3, 2), (True, 1, 3)])
def test_append_matches_pytorch_path(layout, rotary, q_steps, seqlen_q, seqlen_new, device, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    batch, headdim = 3, 48
    k_cache, v_cache, table = make_cache(4, 64, 2, headdim, torch.bfloat16, device, gen,
                                         16 if layout == "paged" else None)
    if layout != "paged":
        table = None
    rows = torch.tensor([3, 0, 2], dtype=torch.int32, device=device) if layout == "rows_leftpad" else None
    leftpad = torch.tensor([5, 0, 20], dtype=torch.int32, device=device) if layout == "rows_leftpad" else None
    seqlens = torch.tensor([40, 0, 61], dtype=torch.int32, device=device)  # the last row fills the cache
    q = torch.randn(batch, seqlen_q, 4, headdim, generator=gen).to(device, torch.bfloat16)
    k, v = (torch.randn(batch, seqlen_new, 2, headdim, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    cos = sin = None
    if rotary is not None:  # rotary_dim 32 of 48: the last 16 features pass through
        angles = torch.rand(80, 16, generator=gen) * 6.3
        cos, sin = angles.cos().to(device), angles.sin().to(device)
    interleaved = rotary == "interleaved"
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect_q = append_kv_ref(q, expect_k, expect_v, k, v, seqlens, cos, sin, interleaved, q_steps, leftpad,
                             rows, table)
    empty = torch.empty  # the rotated q is allocated with torch.empty: poison it
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    got_q = append_kv(q, k_cache, v_cache, k, v, seqlens, cos, sin, interleaved, q_steps, leftpad, rows, table)
    assert torch.equal(v_cache, expect_v)
    if rotary is None:
        assert got_q is q and torch.equal(k_cache, expect_k)
    else:
        assert_rotated_equal(k_cache, expect_k)
        assert_rotated_equal(got_q, expect_q)
        assert torch.equal(got_q[..., 32:], q[..., 32:])  # past rotary_dim: copied as is


def test_non_contiguous_new_tokens_and_strided_q(device):
    """Strided views (a slice of the heads, a transposed q) are read through their strides."""
    gen = torch.Generator().manual_seed(8)
    k_cache, v_cache, _ = make_cache(2, 32, 2, 32, torch.float16, device, gen)
    kv = torch.randn(2, 1, 4, 32, generator=gen).to(device, torch.float16)
    k, v = kv[:, :, :2], kv[:, :, 2:]
    q = torch.randn(2, 4, 1, 32, generator=gen).to(device, torch.float16).transpose(1, 2)
    seqlens = torch.tensor([3, 31], dtype=torch.int32, device=device)
    angles = torch.rand(32, 16, generator=gen) * 6.3
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect_q = append_kv_ref(q, expect_k, expect_v, k, v, seqlens, cos, sin, True, True)
    got_q = append_kv(q, k_cache, v_cache, k, v, seqlens, cos, sin, True, True)
    assert torch.equal(v_cache, expect_v)
    assert_rotated_equal(k_cache, expect_k)
    assert_rotated_equal(got_q, expect_q)

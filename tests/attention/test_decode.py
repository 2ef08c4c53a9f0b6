"""flash_attn_with_kvcache (split-KV decoding, paged cache, in-place append, rotary) against
the float64 reference. On CPU the Triton kernels run in the interpreter."""

import math

import pytest
import torch

import modelaccel
from modelaccel.attention.decode import _DECODE_CONFIGS, decode_attention
from modelaccel.attention.reference import apply_rotary, kvcache_attention_ref
from modelaccel.testing import assert_attention_close, random_kv_cache as make_cache


def check(q, k_cache, v_cache, cache_seqlens, block_table=None, **kwargs):
    out, lse = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                  block_table=block_table, return_softmax_lse=True, **kwargs)
    kwargs.pop("num_splits", None)
    ref_out, ref_lse = kvcache_attention_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), cache_seqlens.cpu(),
                                             block_table=None if block_table is None else block_table.cpu(),
                                             **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                                for k, v in kwargs.items()})
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
    return out


@pytest.mark.parametrize("page_size", [None, 16, 32], ids=["contiguous", "page16", "page32"])
@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (1, True), (3, True), (5, False)])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_decode_matches_reference(page_size, seqlen_q, causal, num_splits, device):
    gen = torch.Generator().manual_seed(seqlen_q * 10 + num_splits)
    k_cache, v_cache, table = make_cache(3, 90, 2, 64, torch.float16, device, gen, page_size)
    q = torch.randn(3, seqlen_q, 8, 64, generator=gen).to(device, torch.float16)
    seqlens = torch.tensor([37, 90, 5], dtype=torch.int32, device=device)  # varied per row
    check(q, k_cache, v_cache, seqlens, table, causal=causal, num_splits=num_splits)


@pytest.mark.parametrize("split_pages_max", [0, None], ids=["table-in-loop", "table-up-front"])
@pytest.mark.parametrize("page_size", [16, 128])
def test_paged_table_read_up_front_or_in_the_loop(page_size, split_pages_max, device, monkeypatch):
    """A paged split reads its block-table entries once before the loop (SPLIT_PAGES), or,
    for splits over more pages than that holds, in the loop: both agree with the reference,
    with pages larger and smaller than a split, a window that starts a split late, and
    table entries past each sequence that point nowhere (-1: they must never be used)."""
    from modelaccel.attention import decode

    if split_pages_max is not None:
        monkeypatch.setattr(decode, "_SPLIT_PAGES_MAX", split_pages_max)
    gen = torch.Generator().manual_seed(page_size)
    k_cache, v_cache, table = make_cache(2, 256, 2, 64, torch.float16, device, gen, page_size)
    seqlens = torch.tensor([256, 70], dtype=torch.int32, device=device)
    table[1, -(-70 // page_size):] = -1
    q = torch.randn(2, 2, 4, 64, generator=gen).to(device, torch.float16)
    for num_splits in (1, 3, 7):
        check(q, k_cache, v_cache, seqlens, table, causal=True, num_splits=num_splits)
        check(q, k_cache, v_cache, seqlens, table, causal=True, window_size=(40, 0), num_splits=num_splits)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_k_and_v_caches_strided_differently(page_size, device):
    """The kernel shares K's offsets with V when both caches have the same strides
    (SAME_KV_STRIDES); a V cache laid out otherwise (here heads outermost, the last dim
    still contiguous) must take its own offsets."""
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, table = make_cache(2, 64, 2, 32, torch.float16, device, gen, page_size)
    v_other = v_cache.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert v_other.stride() != k_cache.stride() and torch.equal(v_other, v_cache)
    q = torch.randn(2, 1, 4, 32, generator=gen).to(device, torch.float16)
    seqlens = torch.tensor([64, 41], dtype=torch.int32, device=device)
    out = check(q, k_cache, v_other, seqlens, table, num_splits=3)
    same = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                              num_splits=3)
    torch.testing.assert_close(out, same, atol=0, rtol=0)


def test_split_and_unsplit_agree_to_rounding(device):
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, _ = make_cache(2, 200, 1, 64, torch.bfloat16, device, gen)
    q = torch.randn(2, 1, 4, 64, generator=gen).to(device, torch.bfloat16)
    seqlens = torch.tensor([200, 131], dtype=torch.int32, device=device)
    outs = [modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=n)
            for n in (1, 2, 5, 13)]
    for out in outs[1:]:
        torch.testing.assert_close(out.float(), outs[0].float(), atol=2e-2, rtol=0)
    check(q, k_cache, v_cache, seqlens, num_splits=13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masks_softcap_alibi_gqa(dtype, device):
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, table = make_cache(2, 80, 2, 32, dtype, device, gen, 16)
    q = torch.randn(2, 2, 8, 32, generator=gen).to(device, dtype) * 3
    seqlens = torch.tensor([80, 47], dtype=torch.int32, device=device)
    slopes = torch.rand(2, 8, generator=gen).to(device) * 0.3
    check(q, k_cache, v_cache, seqlens, table, causal=True, window_size=(20, 0), num_splits=3)
    check(q, k_cache, v_cache, seqlens, table, softcap=4.0, alibi_slopes=slopes, num_splits=2)
    k_flat, v_flat, _ = make_cache(2, 80, 2, 32, dtype, device, gen)
    check(q, k_flat, v_flat, seqlens, None, window_size=(10, 3), alibi_slopes=slopes[0].contiguous(),
          softmax_scale=0.2)


def test_cache_batch_idx_and_leftpad(device):
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, _ = make_cache(4, 64, 2, 64, torch.float16, device, gen)
    q = torch.randn(2, 1, 4, 64, generator=gen).to(device, torch.float16)
    rows = torch.tensor([3, 1], dtype=torch.int32, device=device)
    seqlens = torch.tensor([50, 64], dtype=torch.int32, device=device)
    leftpad = torch.tensor([7, 0], dtype=torch.int32, device=device)
    check(q, k_cache, v_cache, seqlens, cache_batch_idx=rows, cache_leftpad=leftpad, causal=True, num_splits=3)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_append_new_tokens_with_rotary(page_size, interleaved, device):
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, table = make_cache(2, 64, 2, 64, torch.float16, device, gen, page_size)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(2, 2, 4, 64, generator=gen).to(device, torch.float16)
    k_new = torch.randn(2, 2, 2, 64, generator=gen).to(device, torch.float16)
    v_new = torch.randn(2, 2, 2, 64, generator=gen).to(device, torch.float16)
    seqlens = torch.tensor([10, 30], dtype=torch.int32, device=device)
    angles = torch.arange(64)[:, None] * (1e-2 ** (torch.arange(16) / 16))[None, :]  # rotary_dim 32
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    out = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=seqlens,
                                             block_table=table, causal=True, rotary_interleaved=interleaved,
                                             num_splits=2)
    # The reference: rotate by hand, write into a copy of the old cache, attend.
    positions = seqlens.long()[:, None].cpu() + torch.arange(2)
    k_rot = apply_rotary(k_new.cpu(), cos.cpu(), sin.cpu(), positions, interleaved)
    q_rot = apply_rotary(q.cpu(), cos.cpu(), sin.cpu(), positions, interleaved)
    ref_k, ref_v = before_k.cpu().clone(), before_v.cpu().clone()
    for b in range(2):
        for t in range(2):
            pos = int(seqlens[b]) + t
            if table is None:
                ref_k[b, pos], ref_v[b, pos] = k_rot[b, t], v_new[b, t].cpu()
            else:
                page = int(table[b, pos // page_size])
                ref_k[page, pos % page_size], ref_v[page, pos % page_size] = k_rot[b, t], v_new[b, t].cpu()
    assert torch.equal(k_cache.cpu(), ref_k) and torch.equal(v_cache.cpu(), ref_v)  # written in place
    ref_out, _ = kvcache_attention_ref(q_rot, ref_k, ref_v, seqlens.cpu() + 2, causal=True,
                                       block_table=None if table is None else table.cpu())
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=1e-2, rtol=0)


def test_rotary_rotates_pairs():
    """A 2-feature vector (1, 0) at angle pi/2 becomes (0, 1) in both pairings."""
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0
    cos = torch.tensor([[0.0] * 8])
    sin = torch.tensor([[1.0] * 8])
    pos = torch.zeros(1, 1, dtype=torch.long)
    assert apply_rotary(x, cos, sin, pos, True)[0, 0, 0, :2].tolist() == [0.0, 1.0]
    assert apply_rotary(x, cos, sin, pos, False)[0, 0, 0, [0, 8]].tolist() == [0.0, 1.0]


def test_int_cache_seqlens_and_direct_launcher(device):
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, _ = make_cache(2, 40, 1, 32, torch.float16, device, gen)
    q = torch.randn(2, 1, 2, 32, generator=gen).to(device, torch.float16)
    out = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=33)
    seqlens = torch.full((2,), 33, dtype=torch.int32, device=device)
    direct, _ = decode_attention(q, k_cache, v_cache, seqlens, 32 ** -0.5, num_splits=1)
    torch.testing.assert_close(out.float(), direct.float(), atol=2e-3, rtol=0)


BAD = [
    ("past capacity", dict(seqlens=[60, 63]), ValueError, "cache length"),
    ("pages outside pool", dict(table_value=999), ValueError, "outside the pool"),
    ("float seqlens", dict(seqlens_dtype=torch.float32), ValueError, "int32"),
    ("k without v", dict(only_k=True), ValueError, "together"),
    ("new k dtype", dict(k_dtype=torch.bfloat16), ValueError, "float16"),
]


@pytest.mark.parametrize("name,case,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_cache_unchanged(name, case, exc, match, device):
    gen = torch.Generator().manual_seed(6)
    k_cache, v_cache, table = make_cache(2, 64, 2, 32, torch.float16, device, gen, 16)
    before = (k_cache.clone(), v_cache.clone())
    q = torch.randn(2, 1, 4, 32, generator=gen).to(device, torch.float16)
    k_new = torch.randn(2, 2, 2, 32, generator=gen).to(device, case.get("k_dtype", torch.float16))
    v_new = torch.randn(2, 2, 2, 32, generator=gen).to(device, torch.float16)
    seqlens = torch.tensor(case.get("seqlens", [10, 20]), dtype=case.get("seqlens_dtype", torch.int32), device=device)
    if "table_value" in case:
        table = table.clone()
        table[1, 1] = case["table_value"]
    with pytest.raises(exc, match=match):
        modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, None if case.get("only_k") else v_new,
                                           cache_seqlens=seqlens, block_table=table)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_rotary_table_must_cover_the_positions(device):
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, _ = make_cache(1, 64, 1, 32, torch.float16, device, gen)
    q = torch.randn(1, 1, 2, 32, generator=gen).to(device, torch.float16)
    k_new = torch.randn(1, 1, 1, 32, generator=gen).to(device, torch.float16)
    cos = sin = torch.zeros(20, 8, device=device)
    seqlens = torch.tensor([25], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="reach position 25"):
        modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cos, sin, cache_seqlens=seqlens)
    # Left padding moves the positions back: 25 - 10 = 15 fits in 20.
    leftpad = torch.tensor([10], dtype=torch.int32, device=device)
    modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, k_new, cos, sin, cache_seqlens=seqlens,
                                       cache_leftpad=leftpad)


def test_page_size_must_be_a_power_of_two(device):
    q = torch.randn(1, 1, 2, 32, dtype=torch.float16, device=device)
    pool = torch.randn(4, 24, 2, 32, dtype=torch.float16, device=device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="power of two"):
        modelaccel.flash_attn_with_kvcache(q, pool, pool, cache_seqlens=10, block_table=table)


def test_value_checks_run_once_per_tensor_version(device, monkeypatch):
    """The device-value checks (one host sync) run once for a tensor the layers share, and
    again after an in-place edit, which can make the input bad."""
    import modelaccel.attention.interface as interface
    gen = torch.Generator().manual_seed(8)
    k_cache, v_cache, table = make_cache(2, 64, 2, 32, torch.float16, device, gen, 16)
    q = torch.randn(2, 1, 4, 32, generator=gen).to(device, torch.float16)
    seqlens = torch.tensor([10, 20], dtype=torch.int32, device=device)
    calls = []
    real = interface._check_cache_values
    monkeypatch.setattr(interface, "_check_cache_values", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    assert len(calls) == 1
    seqlens += 60  # in place, past the 64-row capacity
    with pytest.raises(ValueError, match="cache length"):
        modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table)
    assert len(calls) == 2


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("seqlen_q,causal,window_size", [(1, False, (-1, -1)), (3, True, (-1, -1)),
                                                         (2, False, (20, 0))])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("merge_values", [8192, 1024], ids=["one-load", "chunked"])
def test_fused_split_merge(page_size, seqlen_q, causal, window_size, num_splits, merge_values, device, monkeypatch):
    """The fused launch (the last split program of each kv head merges) against the reference,
    with a sequence whose keys all lie in one split and an empty one (every split empty).
    merge_values 1024 makes the merge load its splits in several chunks (the last one partly
    past the splits). Every buffer the launcher allocates with torch.empty starts as NaN: all
    of out and lse must be written."""
    import modelaccel.attention.decode as decode
    monkeypatch.setattr(decode, "_MERGE_VALUES_MAX", merge_values)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: empty(*shape, **kw).fill_(float("nan")))
    gen = torch.Generator().manual_seed(seqlen_q * 10 + num_splits)
    k_cache, v_cache, table = make_cache(4, 96, 2, 64, torch.bfloat16, device, gen, page_size)
    q = torch.randn(4, seqlen_q, 8, 64, generator=gen).to(device, torch.bfloat16)
    seqlens = torch.tensor([96, 9, 0, 50], dtype=torch.int32, device=device)
    out, lse = decode_attention(q, k_cache, v_cache, seqlens, 0.125, causal=causal, window_size=window_size,
                                block_table=table, num_splits=num_splits, config=(16, 4, 3, 2, 4, True))
    ref_out, ref_lse = kvcache_attention_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu(), 0.125,
                                             causal=causal, window_size=window_size,
                                             block_table=None if table is None else table.cpu())
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[2]).all()


@pytest.mark.parametrize("config", _DECODE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_every_gpu_launch_candidate(config, device):
    """Each tuning candidate (key tile, split rule) computes the same attention."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache, table = make_cache(2, 300, 2, 64, torch.bfloat16, device, gen, 32)
    q = torch.randn(2, 1, 8, 64, generator=gen).to(device, torch.bfloat16)
    seqlens = torch.tensor([300, 77], dtype=torch.int32, device=device)
    out, lse = decode_attention(q, k_cache, v_cache, seqlens, 0.125, block_table=table, config=config)
    ref_out, ref_lse = kvcache_attention_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu(), 0.125,
                                             block_table=table.cpu())
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


def test_cache_with_strided_last_dim_is_rejected(device):
    """The caches are written in place, so a copy into the layout the kernels need is no way out."""
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, _ = make_cache(2, 32, 2, 64, torch.float16, device, gen)
    q = torch.randn(2, 1, 2, 32, generator=gen).to(device, torch.float16)
    with pytest.raises(ValueError, match="k_cache must have a contiguous last dimension"):
        modelaccel.flash_attn_with_kvcache(q, k_cache[..., ::2], v_cache[..., :32], cache_seqlens=5)



@pytest.mark.parametrize("seqlen_q,causal,softcap", [(1, False, 0.0), (3, True, 0.0), (1, False, 20.0)])
def test_unfilled_cache_rows_never_reach_the_output(seqlen_q, causal, softcap, device):
    """Rows past a sequence's length may hold anything (an unfilled cache): NaN and inf
    there must not reach out or lse. Lengths end mid-split, on a split boundary, in the
    first tile, and at 0."""
    gen = torch.Generator().manual_seed(21 + seqlen_q)
    k_cache, v_cache, _ = make_cache(4, 96, 2, 64, torch.bfloat16, device, gen)
    seqlens = torch.tensor([45, 32, 3, 0], dtype=torch.int32, device=device)
    for b, n in enumerate(seqlens.tolist()):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:, :, ::2] = float("inf")
        v_cache[b, n:, :, 1::2] = float("nan")
    q = torch.randn(4, seqlen_q, 8, 64, generator=gen).to(device, torch.bfloat16)
    for num_splits in (1, 3, 6):
        out, lse = decode_attention(q, k_cache, v_cache, seqlens, 0.125, causal=causal, softcap=softcap,
                                    num_splits=num_splits)
        ref_out, ref_lse = kvcache_attention_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu(), 0.125,
                                                 causal=causal, softcap=softcap)
        assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
        assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isinf(lse[3]).all()

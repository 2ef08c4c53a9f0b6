"""flash_attn_with_kvcache at real decoding sizes on a GPU, against a float32 reference."""

import pytest
import torch

import modelaccel
from modelaccel.attention.decode import _DECODE_CONFIGS, decode_attention
from modelaccel.attention.reference import apply_rotary, kvcache_attention_ref
from modelaccel.testing import assert_attention_close, fresh_replays, random_kv_cache as make_cache

pytestmark = pytest.mark.gpu


def reference(q, k_cache, v_cache, seqlens, **kwargs):
    return kvcache_attention_ref(q, k_cache, v_cache, seqlens, compute_dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("page_size", [None, 16, 256], ids=["contiguous", "page16", "page256"])
@pytest.mark.parametrize("batch,capacity", [(1, 32768), (4, 8192), (64, 1024)])
def test_llama_sized_decode(batch, capacity, page_size):
    gen = torch.Generator().manual_seed(batch)
    k_cache, v_cache, table = make_cache(batch, capacity, 8, 128, torch.bfloat16, "cuda", gen, page_size)
    q = torch.randn(batch, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    seqlens = torch.randint(1, capacity + 1, (batch,), generator=gen, dtype=torch.int32).cuda()
    seqlens[0] = capacity
    out, lse = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                  return_softmax_lse=True)
    ref_out, ref_lse = reference(q, k_cache, v_cache, seqlens, block_table=table)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("config", _DECODE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_every_launch_candidate(config, page_size):
    """Each tuning candidate, contiguous and paged (a paged launch pipelines deeper)."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache, table = make_cache(2, 20000, 8, 128, torch.bfloat16, "cuda", gen, page_size)
    q = torch.randn(2, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    seqlens = torch.tensor([20000, 4321], dtype=torch.int32, device="cuda")
    out, lse = decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, block_table=table, config=config)
    ref_out, ref_lse = reference(q, k_cache, v_cache, seqlens, block_table=table)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("config", _DECODE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_unfilled_cache_rows_are_never_used(config):
    """NaN and inf in the cache rows past each sequence (an unfilled cache) must not reach
    the output, with every launch candidate."""
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, _ = make_cache(3, 16384, 8, 128, torch.bfloat16, "cuda", gen)
    seqlens = torch.tensor([9000, 16384, 37], dtype=torch.int32, device="cuda")
    for b, n in enumerate(seqlens.tolist()):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("inf")
    q = torch.randn(3, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    out, lse = decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, config=config)
    ref_out, ref_lse = reference(q, k_cache, v_cache, seqlens)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("num_splits", [1, 5, 66, 128])
@pytest.mark.parametrize("page_size", [None, 256], ids=["contiguous", "page256"])
def test_fused_split_merge_eager_and_graph(num_splits, page_size):
    """The fused launch (last program of each kv head merges the splits) at real sizes, many
    times over (an ordering bug shows as an occasional wrong row), and under graph replay."""
    gen = torch.Generator().manual_seed(num_splits)
    k_cache, v_cache, table = make_cache(3, 16384, 8, 128, torch.bfloat16, "cuda", gen, page_size)
    q = torch.randn(3, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
    seqlens = torch.tensor([16384, 1000, 0], dtype=torch.int32, device="cuda")
    ref_out, ref_lse = reference(q, k_cache, v_cache, seqlens, block_table=table)
    config = (64, 4, 3, 2, 4, True)

    def call():
        return decode_attention(q, k_cache, v_cache, seqlens, 128 ** -0.5, block_table=table,
                                num_splits=num_splits, config=config)

    first = call()
    assert_attention_close(*first, ref_out, ref_lse, q.dtype)
    for _ in range(50):
        out, lse = call()
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = call()
    for _ in range(20):
        graph_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(graph_out, first[0]) and torch.equal(graph_lse, first[1])


def test_splits_agree_to_rounding():
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache, _ = make_cache(2, 16384, 8, 128, torch.float16, "cuda", gen)
    q = torch.randn(2, 1, 32, 128, generator=gen).to("cuda", torch.float16)
    outs = [modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=16000, num_splits=n)
            for n in (1, 7, 64, 0)]
    for out in outs[1:]:
        torch.testing.assert_close(out.float(), outs[0].float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("headdim", [64, 96, 256])
def test_head_dims_with_append_rotary_and_speculative_queries(headdim):
    gen = torch.Generator().manual_seed(headdim)
    k_cache, v_cache, table = make_cache(3, 4096, 4, headdim, torch.bfloat16, "cuda", gen, 64)
    q = torch.randn(3, 4, 16, headdim, generator=gen).to("cuda", torch.bfloat16)
    k_new, v_new = (torch.randn(3, 4, 4, headdim, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([4000, 17, 2048], dtype=torch.int32, device="cuda")
    angles = torch.rand(4096, headdim // 2, generator=gen).cuda() * 6.3
    cos, sin = angles.cos(), angles.sin()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out, lse = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=seqlens,
                                                  block_table=table, causal=True, return_softmax_lse=True)
    # The cache now holds the rotated new keys; rebuild them independently.
    pos = seqlens.long()[:, None] + torch.arange(4, device="cuda")
    k_rot = apply_rotary(k_new, cos, sin, pos, True)
    q_rot = apply_rotary(q, cos, sin, pos, True)
    for b in range(3):
        for t in range(4):
            p = int(seqlens[b]) + t
            page = table[b, p // 64].long()
            torch.testing.assert_close(k_cache[page, p % 64].float(), k_rot[b, t].float(), atol=1e-2, rtol=0)
            k_ref[page, p % 64], v_ref[page, p % 64] = k_rot[b, t], v_new[b, t]
    ref_out, ref_lse = reference(q_rot, k_ref, v_ref, seqlens + 4, block_table=table, causal=True)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


def test_decoding_steps_with_append_and_rotary_replay_in_a_graph():
    """A decoding step (append with rotary, then attention) captured once and replayed as the
    cache grows, against the same steps run eagerly on a copy of the cache."""
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache, _ = make_cache(2, 512, 8, 128, torch.bfloat16, "cuda", gen)
    caches = {"graph": (k_cache, v_cache), "eager": (k_cache.clone(), v_cache.clone())}
    lens = {name: torch.tensor([100, 37], dtype=torch.int32, device="cuda") for name in caches}
    q, k_new, v_new = (torch.randn(2, 1, heads, 128, generator=gen).to("cuda", torch.bfloat16) for heads in (32, 8, 8))
    angles = torch.rand(512, 64, generator=gen).cuda() * 6.3
    cos, sin = angles.cos(), angles.sin()

    def step(name):
        k_c, v_c = caches[name]
        return modelaccel.flash_attn_with_kvcache(q, k_c, v_c, k_new, v_new, cos, sin, cache_seqlens=lens[name],
                                                  causal=True)

    scratch = (k_cache.clone(), v_cache.clone())
    modelaccel.flash_attn_with_kvcache(q, *scratch, k_new, v_new, cos, sin, cache_seqlens=lens["eager"].clone(),
                                       causal=True)  # compiles and tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step("graph")
    for _ in range(4):
        for t in (q, k_new, v_new):
            t.copy_(torch.randn(t.shape, generator=gen).to("cuda", torch.bfloat16))
        graph.replay()
        eager_out = step("eager")
        assert torch.equal(graph_out, eager_out)
        for name in caches:
            lens[name] += 1
    assert torch.equal(caches["graph"][0], caches["eager"][0]) and torch.equal(caches["graph"][1], caches["eager"][1])


@pytest.mark.parametrize("layout", ["contiguous", "page16", "int seqlens"])
def test_repeated_decoding_steps_are_replayed_and_correct(layout, monkeypatch):
    """Decoding steps of one shape replay an earlier step's launches (interface._plans): each
    still matches the reference on fresh caches and lengths (outputs start as NaN in the
    allocator's reused blocks), eagerly and captured in a CUDA graph."""
    from modelaccel.attention import decode

    replays = fresh_replays(monkeypatch, decode._tuner)
    page = 16 if layout == "page16" else None

    def step(seed):
        gen = torch.Generator().manual_seed(seed)
        k_cache, v_cache, table = make_cache(2, 4096, 8, 128, torch.bfloat16, "cuda", gen, page)
        q = torch.randn(2, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16)
        seqlens = 3000 + seed if layout == "int seqlens" else \
            torch.randint(1, 4097, (2,), generator=gen, dtype=torch.int32).cuda()
        return q, k_cache, v_cache, table, seqlens

    def check(out, lse, q, k_cache, v_cache, table, seqlens):
        lengths = torch.full((2,), seqlens, dtype=torch.int32) if isinstance(seqlens, int) else seqlens
        ref_out, ref_lse = reference(q, k_cache, v_cache, lengths.cuda(), block_table=table)
        assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)

    for seed in range(4):
        inputs = step(seed)
        q, k_cache, v_cache, table, seqlens = inputs
        torch.empty(2, 1, 32, 128, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))  # poison a block
        out, lse = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                      return_softmax_lse=True)
        check(out, lse, *inputs)
    assert len(replays) >= 2  # the first call (two, in a process whose first launch this is): the full path
    q, k_cache, v_cache, table, seqlens = inputs = step(7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = modelaccel.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                      return_softmax_lse=True)
    out.fill_(float("nan"))
    graph.replay()
    check(out, lse, *inputs)


def test_heads_first_decoding_steps_replay_and_are_correct(monkeypatch):
    """flash_attn_with_kvcache_heads_first (the Transformers integration's decoding call over
    a dynamic cache): the layers of a step after the first replay straight from the [b, h,
    s, d] tensors with one shared lengths tensor; each matches the reference on fresh inputs
    (outputs poisoned), and the next step's length is a class of its own."""
    from modelaccel.attention import decode, interface

    replays = fresh_replays(monkeypatch, decode._tuner)
    monkeypatch.setattr(interface, "_full_lengths", {})
    for length in (700, 700, 700, 700, 701, 701, 701):
        gen = torch.Generator().manual_seed(length)
        query = torch.randn(2, 1, 32, 128, generator=gen).to("cuda", torch.bfloat16).transpose(1, 2)
        key, value = (torch.randn(2, 8, length, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
        torch.empty(2, 1, 32, 128, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))  # poison a block
        out = interface.flash_attn_with_kvcache_heads_first(query, key, value, causal=True)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        ref_out, ref_lse = reference(q, k, v, torch.full((2,), length, dtype=torch.int32, device="cuda"))
        assert_attention_close(out, ref_lse, ref_out, ref_lse, q.dtype)
    # A class's first call takes the full path (its first two, where it is the first launch
    # of a kernel in the process: Triton's own path, not recorded); the rest replay.
    assert len(interface._heads_first_plans) == 2 and len(replays) >= 3

"""The warp-specialized Gluon forward (attention/gluon_fwd.py) on a Hopper GPU, against the
float32 reference: every configuration, causal or not, GQA, ragged lengths, fp16/bf16; and
flash_attn_func (forward and backward) with the tuner sent to it."""

import pytest
import torch

from modelaccel import flash_attn_func
from modelaccel.attention import flash_fwd, gluon_fwd
from modelaccel.attention.gluon_fwd import GLUON_WS_CANDIDATES, GLUON_WS_CONFIGS, flash_attn_forward_gluon_ws
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_attention_close, assert_grads_close, random_qkv, route_tuner_to

pytestmark = pytest.mark.gpu


SHAPES = [(2, 1000, 1000, 8, 8, 128), (1, 300, 1500, 16, 4, 128), (3, 777, 513, 4, 1, 64), (2, 2048, 2048, 8, 2, 128),
          (1, 1500, 300, 4, 4, 128)]


@pytest.mark.parametrize("config", GLUON_WS_CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layouts", [("bshd",) * 3, ("bhsd", "bhsd", "bshd")], ids="-".join)
def test_gluon_forward_matches_reference(config, shape, causal, layouts, monkeypatch):
    # The launcher's outputs start as NaN: every element must be written. Persistent
    # launches get 5 programs, so each runs many tiles (48-256 here).
    monkeypatch.setattr(gluon_fwd, "_sm_count", lambda device_index: 5)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    gen = torch.Generator().manual_seed(seqlen_q + seqlen_k)
    dtype = torch.bfloat16 if headdim == 128 else torch.float16
    q = torch.randn(batch, seqlen_q, nheads, headdim, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to("cuda", dtype) for _ in range(2))
    # "bhsd": Transformers' layout, [batch, heads, seqlen, headdim] contiguous seen as bshd.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bhsd" else t
               for t, layout in zip((q, k, v), layouts))
    out, lse = flash_attn_forward_gluon_ws(q, k, v, headdim ** -0.5, causal, *config)
    ref_out, ref_lse = attention_ref(q.float(), k.float(), v.float(), headdim ** -0.5, causal,
                                     compute_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("candidate", GLUON_WS_CANDIDATES, ids=lambda c: "x".join(map(str, c[1:])))
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_runs_the_gluon_forward_when_tuned_to_it(candidate, causal, monkeypatch):
    # Large enough for the tuner to offer the Gluon candidates (flash_fwd._TMA_MIN_FLOPS).
    batch, seqlen, nheads, nheads_k, headdim = 1, 4096, 16, 4, 128
    assert 4 * batch * nheads * seqlen * seqlen * headdim >= flash_fwd._TMA_MIN_FLOPS
    offered, ran = route_tuner_to(monkeypatch, flash_fwd._tuner, candidate, gluon_fwd, "flash_attn_forward_gluon_ws")
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, seqlen, seqlen, nheads, nheads_k, headdim,
                                                       torch.bfloat16, "cuda", seed=7))
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert offered and ran, "the Gluon candidate was not offered or did not run"
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref_out, ref_lse = attention_ref(q.float(), k.float(), v.float(), headdim ** -0.5, causal,
                                     compute_dtype=torch.float32)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(qf, kf, vf, headdim ** -0.5, causal,
                                                  compute_dtype=torch.float32)[0], (qf, kf, vf), grad.float())
    assert_grads_close((dq, dk, dv), ref_grads, q.dtype)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("launch_group", [0, 1, 3, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_launch_groups_write_every_block(launch_group, causal, persistent, monkeypatch):
    # 5 batches x 4 heads = 20 batch-heads: groups of 3 and 16 leave a partial last group,
    # 64 is more than the grid holds. Persistent: the 120 tiles over 7 programs (17-18
    # each; the SM count would give every tile a program of its own). Outputs start as NaN.
    monkeypatch.setattr(gluon_fwd, "_sm_count", lambda device_index: 7)
    batch, seqlen, nheads, nheads_k, headdim = 5, 700, 4, 2, 128
    q, k, v = random_qkv(batch, seqlen, seqlen, nheads, nheads_k, headdim, torch.bfloat16, "cuda", seed=launch_group)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, nheads, seqlen), float("nan"), device="cuda")
    flash_attn_forward_gluon_ws(q, k, v, headdim ** -0.5, causal, persistent=persistent, out=out, lse=lse,
                                launch_group=launch_group)
    ref_out, ref_lse = attention_ref(q.float(), k.float(), v.float(), headdim ** -0.5, causal,
                                     compute_dtype=torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("persistent", [False, True])
def test_traced_forward_fills_its_trace_and_matches_the_untraced_one(persistent, monkeypatch):
    # Persistent launches get 5 programs (up to 16 tiles each are traced).
    monkeypatch.setattr(gluon_fwd, "_sm_count", lambda device_index: 5)
    batch, seqlen, nheads, nheads_k, headdim = 2, 700, 4, 2, 128
    q, k, v = random_qkv(batch, seqlen, seqlen, nheads, nheads_k, headdim, torch.bfloat16, "cuda", seed=11)
    config = (128, 2, True, True, 8) if persistent else (128, 2, True)
    out, lse = flash_attn_forward_gluon_ws(q, k, v, headdim ** -0.5, True, *config)
    n_mblocks = -(-seqlen // 128)
    tiles = batch * nheads * n_mblocks
    programs = 5 if persistent else tiles
    trace = torch.full((gluon_fwd.trace_size(programs),), -1, dtype=torch.int64, device="cuda")
    traced_out, traced_lse = flash_attn_forward_gluon_ws(q, k, v, headdim ** -0.5, True, *config, trace=trace)
    assert torch.equal(out, traced_out) and torch.equal(lse, traced_lse)
    trace = trace.view(programs, 3, gluon_fwd.TRACE_TILES, gluon_fwd.TRACE_EVENTS).cpu()
    # Program p runs tiles p, p + programs, ...: the first TRACE_TILES of them are traced.
    lengths = {0: [], 1: []}
    for p in range(programs):
        ran = len(range(p, tiles, programs))
        assert ran <= gluon_fwd.TRACE_TILES
        for wg in (0, 1):
            events = trace[p, wg, :ran]
            assert (events[:, :7] >= 0).all() and (events[:, 9] > 0).all()
            assert (events[:, :7].diff(dim=1) >= 0).all(), "consumer events out of order"
            assert (trace[p, wg, ran:, :7] == -1).all()
            lengths[wg] += events[:, 8].tolist()
        assert (trace[p, 2, :ran, :4] >= 0).all()
    # Causal, 128-row tiles: each (batch, head) runs tiles of 1 ... n_mblocks key blocks.
    for wg in (0, 1):
        assert sorted(lengths[wg]) == sorted(list(range(1, n_mblocks + 1)) * (batch * nheads))


def test_trace_of_the_wrong_size_is_refused():
    q, k, v = random_qkv(1, 256, 256, 2, 2, 128, torch.bfloat16, "cuda", seed=1)
    with pytest.raises(ValueError, match="int64 CUDA tensor"):
        flash_attn_forward_gluon_ws(q, k, v, 128 ** -0.5, True, trace=torch.zeros(8, dtype=torch.int64, device="cuda"))

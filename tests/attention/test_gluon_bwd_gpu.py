"""The Gluon backward (attention/gluon_bwd.py) on a Hopper GPU: dq, dk, dv against a float32
reference by autograd, for every (ring depth, query rows per step) of GLUON_BWD_CONFIGS,
causal or not, GQA, ragged lengths, both layouts gluon_fwd._row_view takes."""

import pytest
import torch

from modelaccel import flash_attn_func
from modelaccel.attention import flash_bwd, gluon_bwd
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.gluon_bwd import (GLUON_BWD_CANDIDATES, GLUON_BWD_CONFIGS, GLUON_BWD_PERSISTENT_CONFIGS,
                                            config_name, flash_attn_backward_gluon_ws)
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_grads_close, random_qkv, route_tuner_to

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", sorted(set(c for cs in GLUON_BWD_CONFIGS.values() for c in cs)),
                         ids=config_name)
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 8, 128), (1, 300, 1500, 16, 4, 128), (3, 777, 513, 4, 1, 64),
                                   (2, 2048, 2048, 8, 2, 128), (1, 1500, 300, 4, 4, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gluon_backward_matches_reference(config, shape, causal, layout):
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    if config not in GLUON_BWD_CONFIGS[headdim]:
        pytest.skip(f"not a head dim {headdim} configuration")
    dtype = torch.bfloat16 if headdim == 128 else torch.float16
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, "cuda", seed=seqlen_q)
    if layout == "bhsd":  # Transformers' layout: [batch, heads, seqlen, headdim] seen as bshd
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    scale = headdim ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, causal)
    dout = torch.randn_like(out)
    dq, dk, dv = flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, causal, *config)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, scale, causal, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_grads_close((dq, dk, dv), (q32.grad, k32.grad, v32.grad), dtype)


@pytest.mark.parametrize("candidate", GLUON_BWD_CANDIDATES[128],
                         ids=lambda c: config_name(c[1:]))
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_backward_runs_the_gluon_backward_when_tuned_to_it(candidate, causal, monkeypatch):
    # Large enough for the tuner to offer the Gluon candidates (flash_bwd._GLUON_BWD_MIN_FLOPS).
    batch, seqlen, nheads, nheads_k, headdim = 1, 4096, 16, 4, 128
    assert 4 * batch * nheads * seqlen * seqlen * headdim >= flash_bwd._GLUON_BWD_MIN_FLOPS
    offered, ran = route_tuner_to(monkeypatch, flash_bwd._dkdv_tuner, candidate, gluon_bwd,
                                  "flash_attn_backward_gluon_ws")
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, seqlen, seqlen, nheads, nheads_k, headdim,
                                                       torch.bfloat16, "cuda", seed=11))
    out = flash_attn_func(q, k, v, causal=causal)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert offered and ran, "the Gluon candidate was not offered or did not run"
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(qf, kf, vf, headdim ** -0.5, causal,
                                                  compute_dtype=torch.float32)[0], (qf, kf, vf), grad.float())
    assert_grads_close((dq, dk, dv), ref_grads, q.dtype)


@pytest.mark.parametrize("config", sorted(set(c for cs in GLUON_BWD_PERSISTENT_CONFIGS.values() for c in cs)),
                         ids=config_name)
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 8, 128), (1, 300, 1500, 16, 4, 128), (3, 777, 513, 4, 1, 64),
                                   (2, 2048, 2048, 8, 2, 128), (1, 1500, 300, 4, 4, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_persistent_matches_reference(config, shape, causal, monkeypatch):
    # 5 programs, so each runs many tiles (12-128 here) and the ring, the dS^T buffers and
    # the K/V barriers run on across tiles. The gradients start as NaN.
    monkeypatch.setattr(gluon_bwd, "_sm_count", lambda device_index: 5)
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    if config not in GLUON_BWD_PERSISTENT_CONFIGS[headdim]:
        pytest.skip(f"not a head dim {headdim} configuration")
    dtype = torch.bfloat16 if headdim == 128 else torch.float16
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, "cuda", seed=seqlen_k)
    scale = headdim ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, causal)
    dout = torch.randn_like(out)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    stages, block_q, persistent, *group = config
    dq, dk, dv = flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, causal, stages, block_q, persistent,
                                              *group, grads=grads)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, scale, causal, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_grads_close((dq, dk, dv), (q32.grad, k32.grad, v32.grad), dtype)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("launch_group", [0, 1, 3, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_launch_groups_write_every_block(launch_group, causal, persistent, monkeypatch):
    # 5 batches x 2 kv heads = 10 kv batch-heads: groups of 3 and 16 leave a partial last
    # group, 64 is more than the grid holds. Persistent: the 60 tiles over 7 programs. The
    # gradients start as NaN.
    monkeypatch.setattr(gluon_bwd, "_sm_count", lambda device_index: 7)
    batch, seqlen, nheads, nheads_k, headdim = 5, 700, 4, 2, 128
    q, k, v = random_qkv(batch, seqlen, seqlen, nheads, nheads_k, headdim, torch.bfloat16, "cuda", seed=launch_group)
    scale = headdim ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, causal)
    dout = torch.randn_like(out)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv = flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, causal, persistent=persistent,
                                              grads=grads, launch_group=launch_group)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, scale, causal, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_grads_close((dq, dk, dv), (q32.grad, k32.grad, v32.grad), torch.bfloat16)


def test_gluon_backward_causal_queries_that_see_no_key_get_zero_dq():
    # seqlen_q > seqlen_k under a causal mask: the first queries see no key and no program
    # adds to them; their dq must still be written (0) into a dq that starts as NaN.
    q, k, v = random_qkv(1, 700, 300, 4, 4, 128, torch.bfloat16, "cuda", seed=3)
    scale = 128 ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, True)
    dout = torch.randn_like(out)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, _, _ = flash_attn_backward_gluon_ws(dout, q, k, v, out, lse, scale, True, grads=grads)
    assert torch.equal(dq[:, :400], torch.zeros_like(dq[:, :400]))
    assert torch.isfinite(dq).all()

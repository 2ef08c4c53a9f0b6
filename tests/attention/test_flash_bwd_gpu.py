"""Backward, varlen and dropout at real sizes on a GPU, against a float32 reference by autograd."""

import pytest
import torch
import triton

import modelaccel
from modelaccel.attention.flash_bwd import _DKDV_CONFIGS, _DQ_CONFIGS, flash_attn_backward
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.reference import attention_ref, varlen_attention_ref
from modelaccel.testing import assert_attention_close, assert_grads_close, count_calls

pytestmark = pytest.mark.gpu


def randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def grads_vs_reference(q, k, v, **kwargs):
    """modelaccel's out and grads against attention_ref in float32 on the GPU."""
    dout = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = modelaccel.flash_attn_func(qg, kg, vg, return_attn_probs=True, **kwargs)
    out.backward(dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_ref(q32, k32, v32, compute_dtype=torch.float32, **kwargs)
    ref_out.backward(dout.float())
    assert_attention_close(out, lse, ref_out.detach(), ref_lse, q.dtype)
    assert_grads_close((qg.grad, kg.grad, vg.grad), (q32.grad, k32.grad, v32.grad), q.dtype)


@pytest.mark.parametrize("config", [(2, 16, 16, 1024, 1024), (1, 32, 8, 2048, 2048), (2, 8, 1, 1000, 1500),
                                    (2, 8, 2, 1500, 1000)], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True])
def test_grads_d128_bf16(config, causal):
    b, hq, hk, sq, sk = config
    grads_vs_reference(randn(b, sq, hq, 128, dtype=torch.bfloat16), randn(b, sk, hk, 128, dtype=torch.bfloat16),
                       randn(b, sk, hk, 128, dtype=torch.bfloat16), causal=causal)


@pytest.mark.parametrize("headdim", [40, 64, 80, 96, 160, 256])
def test_grads_head_dims(headdim):
    dtype = torch.float16 if headdim % 32 else torch.bfloat16
    grads_vs_reference(randn(2, 700, 8, headdim, dtype=dtype), randn(2, 900, 4, headdim, dtype=dtype),
                       randn(2, 900, 4, headdim, dtype=dtype), causal=True)


def test_grads_window_softcap_alibi():
    q, k, v = randn(2, 1200, 8, 128, dtype=torch.float16) * 2, randn(2, 1300, 4, 128, dtype=torch.float16), \
        randn(2, 1300, 4, 128, dtype=torch.float16)
    slopes = torch.rand(2, 8, device="cuda") * 0.1
    grads_vs_reference(q, k, v, causal=True, window_size=(256, 0))
    grads_vs_reference(q, k, v, softcap=30.0, alibi_slopes=slopes)
    grads_vs_reference(q, k, v, causal=True, window_size=(300, -1), softcap=20.0, alibi_slopes=slopes[0].contiguous())


def test_deterministic_grads():
    q, k, v = (randn(2, 2048, 16, 128, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = modelaccel.flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dq_tma", [False, True], ids=["atomics", "tma_reduce"])
def test_varlen_grads_atomic_dq(dq_tma):
    """A packed batch through the atomic-dQ backward: a TMA reduce box reaches past a
    sequence's last rows into the next one's."""
    lengths = [700, 0, 37, 130, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (randn(sum(lengths), hk, 128, dtype=torch.bfloat16) for hk in (8, 2, 2))
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    out, lse = flash_attn_forward(q, k, v, 128 ** -0.5, causal=True, **varlen)
    dout = torch.randn_like(q)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_attn_backward(dout, q, k, v, out, lse, 128 ** -0.5, causal=True, atomic_dq=True, dq_tma=dq_tma,
                        grads=grads, **varlen)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = varlen_attention_ref(q32, k32, v32, cu, cu, causal=True, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_grads_close(grads, (q32.grad, k32.grad, v32.grad), q.dtype)


def test_varlen_grads():
    lengths = [1000, 0, 37, 513, 2048, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lengths)
    q, k, v = (randn(total, hk, 128, dtype=torch.bfloat16).requires_grad_() for hk in (16, 4, 4))
    out, lse, _ = modelaccel.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                                    return_attn_probs=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_ref(q32, k32, v32, cu, cu, causal=True, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_attention_close(out, lse, ref_out.detach(), ref_lse, q.dtype)
    assert_grads_close((q.grad, k.grad, v.grad), (q32.grad, k32.grad, v32.grad), q.dtype)


def test_dropout_keep_rate_and_reference():
    q, k, v = (randn(2, 512, 8, 64, dtype=torch.float16).requires_grad_() for _ in range(3))
    torch.manual_seed(0)
    out, _, keep = modelaccel.flash_attn_func(q, k, v, dropout_p=0.17, causal=True, return_attn_probs=True)
    rate = keep.float().mean().item()
    assert abs(rate - 0.83) < 5 * (0.17 * 0.83 / keep.numel()) ** 0.5
    dout = torch.randn_like(out)
    out.backward(dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, causal=True, compute_dtype=torch.float32, dropout_p=0.17,
                               dropout_mask=keep)
    ref_out.backward(dout.float())
    assert_grads_close((q.grad, k.grad, v.grad), (q32.grad, k32.grad, v32.grad), q.dtype)
    assert ((out.float() - ref_out).norm() / ref_out.norm()).item() < 3e-3


@pytest.mark.parametrize("atomic_dq,dq_tma", [(False, False), (True, False), (True, True)],
                         ids=["deterministic", "atomic_dq", "atomic_dq_tma"])
@pytest.mark.parametrize("config", [(2, 16, 4, 1000, 1000, 128, True), (1, 8, 8, 700, 1300, 64, False),
                                    (2, 8, 2, 513, 513, 256, True)], ids=lambda c: "x".join(map(str, c)))
def test_each_strategy_matches_reference(config, atomic_dq, dq_tma):
    """Both backward strategies (atomic dQ by the threads' atomics or a TMA reduce), forced,
    whichever one the tuner would pick by default."""
    b, hq, hk, sq, sk, d, causal = config
    q, k, v = randn(b, sq, hq, d, dtype=torch.bfloat16), randn(b, sk, hk, d, dtype=torch.bfloat16), \
        randn(b, sk, hk, d, dtype=torch.bfloat16)
    scale = d ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, causal=causal)
    dout = torch.randn_like(q)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_attn_backward(dout, q, k, v, out, lse, scale, causal=causal, atomic_dq=atomic_dq, dq_tma=dq_tma, grads=grads)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, causal=causal, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_grads_close(grads, (q32.grad, k32.grad, v32.grad), q.dtype)


def _every_launch():
    """(head dim, dQ launch, dK/dV launch, atomic dQ, TMA reduce): every configuration of
    each head-dim class, paired with the class's first configuration of the other kernel."""
    cases = []
    strategies = ((False, False), (True, False), (True, True))
    for headdim, block_d in ((64, 64), (128, 128), (160, 256)):
        dq, dkdv = _DQ_CONFIGS[block_d], _DKDV_CONFIGS[block_d]
        cases += [(headdim, c, dkdv[0], False, False) for c in dq]
        cases += [(headdim, dq[0], c, *s) for c in dkdv for s in strategies if c != dkdv[0] or s[0]]
    name = "x".join
    return [pytest.param(*c, id=f"d{c[0]}-dq{name(map(str, c[1]))}-dkdv{name(map(str, c[2]))}"
                                + ("-atomic" if c[3] else "") + ("-tma" if c[4] else "")) for c in cases]


@pytest.mark.parametrize("headdim,dq_config,dkdv_config,atomic_dq,dq_tma", _every_launch())
def test_every_launch_configuration(headdim, dq_config, dkdv_config, atomic_dq, dq_tma):
    """Each tuning candidate computes the right gradients, since the other GPU tests run with
    MODELACCEL_TUNING=off (first candidates only): causal GQA with odd lengths."""
    gen = torch.Generator().manual_seed(headdim)
    q = torch.randn(2, 700, 8, headdim, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, 900, 4, headdim, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    scale = headdim ** -0.5
    out, lse = flash_attn_forward(q, k, v, scale, causal=True)
    dout = torch.randn_like(q)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    try:
        flash_attn_backward(dout, q, k, v, out, lse, scale, causal=True, atomic_dq=atomic_dq, dq_tma=dq_tma,
                            blocks=(dq_config, dkdv_config), grads=grads)
    except triton.runtime.errors.OutOfResources:
        # The TMA reduce's staging tile can take a launch past the shared memory a program
        # may have; the tuner skips such candidates the same way.
        assert dq_tma
        pytest.skip("does not fit in shared memory")
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q32, k32, v32, causal=True, compute_dtype=torch.float32)
    ref_out.backward(dout.float())
    assert_grads_close(grads, (q32.grad, k32.grad, v32.grad), q.dtype)


# dK/dV launches the tuner may settle on, each replayed by repeated training calls: the
# Triton kernels with dQ by its own kernel and with dQ by TMA reduces into a float32
# accumulator, and the Gluon kernel per tile (dQ by TMA reduces) and persistent with its
# host-dealt tile table.
_REPLAYED_DKDV = {"triton": (64, 128, 8, 2, False, False), "triton_atomic_tma": (64, 128, 8, 3, True, True),
                  "gluon_dq_tma": ("gluon_ws", 2, 64, False, 8, 1, False, False, True),
                  "gluon_scheduled": ("gluon_ws", 2, 32, True, 8, 1, True, True)}


@pytest.mark.parametrize("launch", list(_REPLAYED_DKDV))
def test_repeated_training_calls_are_replayed_and_correct(launch, monkeypatch):
    """The later calls of a class replay an earlier one's launches in both passes
    (interface._replayed): each call's output and gradients still match the reference on
    its own fresh inputs, with every buffer taken from allocator blocks poisoned with NaN."""
    from modelaccel.attention import flash_bwd, flash_fwd, replay
    from modelaccel.attention.launch import gluon_kernels

    if launch.startswith("gluon") and gluon_kernels("gluon_bwd") is None:
        pytest.skip("no Gluon backward on this triton")
    choice = _REPLAYED_DKDV[launch]
    # Settled choices, as a tuned class has (MODELACCEL_TUNING=off alone leaves classes
    # unsettled, and those are not replayed).
    monkeypatch.setattr(flash_bwd._dkdv_tuner, "choose", lambda key, candidates, launch: choice)
    monkeypatch.setattr(flash_bwd._dq_tuner, "choose", lambda key, candidates, launch: candidates[0])
    monkeypatch.setattr(flash_fwd._tuner, "choose", lambda key, candidates, launch: candidates[0])
    from modelaccel.attention import interface
    monkeypatch.setattr(interface, "_plans", {})
    monkeypatch.setattr(interface, "_plan_attempts", {})
    replays = count_calls(monkeypatch, replay.Plan, "run")
    full_backwards = count_calls(monkeypatch, interface, "flash_attn_backward")
    for round in range(3):
        q, k, v = (randn(2, 1024, h, 128, dtype=torch.bfloat16) for h in (16, 4, 4))
        dout = torch.randn_like(q)
        for shape in ((2, 1024, 16, 128), (2, 1024, 4, 128), (2, 16, 1024)):  # poison the blocks to come
            torch.empty(shape, dtype=torch.float32, device="cuda").fill_(float("nan"))
            torch.empty(shape, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        replayed, full = len(replays), len(full_backwards)
        out = modelaccel.flash_attn_func(qg, kg, vg, causal=True)
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
        # The first call records; in a process whose first launch it is, the second may too.
        if round == 2:
            assert len(replays) == replayed + 2 and len(full_backwards) == full  # both passes replayed
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = attention_ref(q32, k32, v32, compute_dtype=torch.float32, causal=True)
        ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), dout.float())
        assert_attention_close(out, ref_lse, ref_out.detach(), ref_lse, q.dtype)  # no lse from flash_attn_func
        assert_grads_close(grads, ref_grads, q.dtype)

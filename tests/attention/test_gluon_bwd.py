"""How flash_attn_backward hands a call to the Gluon backward (attention/gluon_bwd.py), on
the CPU: the kernel itself runs only on Hopper (test_gluon_bwd_gpu.py). Here the tuner is
made to choose a Gluon candidate and the Gluon function is replaced by the float64
reference, so what is checked is the plumbing: which calls are offered the candidates,
the tuning key, the arguments, and that the gradients land in the caller's buffers."""

import pytest
import torch

from modelaccel.attention import flash_bwd
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_grads_close, random_qkv

gluon_bwd = pytest.importorskip("modelaccel.attention.gluon_bwd")


def test_cpu_tensors_and_the_interpreter_are_never_offered_the_gluon_backward():
    q, k, v = random_qkv(1, 512, 512, 8, 2, 128, torch.bfloat16, "cpu", seed=1)
    assert flash_bwd._gluon_bwd_candidates(q, k, v, (-1, 0), 0.0, None, 0.0, False) == ()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_a_tuned_gluon_choice_runs_the_gluon_backward_into_the_callers_buffers(causal, deterministic, monkeypatch):
    q, k, v = random_qkv(2, 40, 56, 4, 2, 128, torch.bfloat16, "cpu", seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    scale = 128 ** -0.5
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_ref(q64, k64, v64, scale, causal)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    out, lse = ref_out.detach().to(q.dtype), ref_lse.float()
    candidate = gluon_bwd.GLUON_BWD_CANDIDATES[128][0]
    seen = {}

    def fake_gluon(dout_, q_, k_, v_, out_, lse_, scale_, causal_, *config, grads):
        seen.update(causal=causal_, config=config, same_inputs=all(a is b for a, b in ((q_, q), (k_, k), (v_, v))))
        for buffer, grad in zip(grads, ref_grads):
            buffer.copy_(grad)
        return grads

    def choose(key, candidates, launch):
        seen["key"], seen["offered"] = key, candidate in candidates
        config = candidate if candidate in candidates else candidates[0]
        if config == candidate:
            launch(config)  # as the tuner times it, then the call launches it again
        return config

    class FakeModule:
        GLUON_BWD_CANDIDATES = gluon_bwd.GLUON_BWD_CANDIDATES
        flash_attn_backward_gluon_ws = staticmethod(fake_gluon)

    monkeypatch.setattr(flash_bwd, "interpreting", lambda: False)
    monkeypatch.setattr(flash_bwd, "launch_kernel", lambda *args: None)  # the Triton kernels: not what is tested
    monkeypatch.setattr(flash_bwd, "_gluon_bwd_module", lambda: FakeModule)
    monkeypatch.setattr(flash_bwd, "_gluon_bwd_candidates", lambda *a: FakeModule.GLUON_BWD_CANDIDATES[128])
    monkeypatch.setattr(flash_bwd._dq_tuner, "choose", lambda key, candidates, launch: candidates[0])
    monkeypatch.setattr(flash_bwd._dkdv_tuner, "choose", choose)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    flash_bwd.flash_attn_backward(dout, q, k, v, out, lse, scale, causal, grads=grads,
                                  atomic_dq=False if deterministic else None)
    if deterministic:  # atomics are not bit-reproducible: the Gluon kernel is not offered
        assert not seen["offered"] and "gluon" not in seen["key"]
        return
    assert seen["offered"] and seen["key"][-1] == "gluon"
    assert seen["causal"] == causal and seen["config"] == candidate[1:] and seen["same_inputs"]
    assert_grads_close(grads, ref_grads, q.dtype)

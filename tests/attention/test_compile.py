"""flash_attn_func under torch.compile: one graph (no breaks), same values and gradients."""

import torch

import modelaccel
from modelaccel.testing import random_qkv


def test_compiles_without_graph_breaks_forward_and_backward(device):
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 24, 24, 4, 2, 32, torch.float16, device, seed=1))

    def attention(q, k, v):
        return modelaccel.flash_attn_func(q, k, v, causal=True, window_size=(9, 0), softcap=3.0)

    torch._dynamo.reset()
    # aot_eager traces forward and backward through the ops' fake implementations without
    # generating code; fullgraph=True turns any graph break into an error.
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_inference_under_compile(device):
    q, k, v = random_qkv(1, 17, 30, 4, 1, 64, torch.bfloat16, device, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: modelaccel.flash_attn_func(q, k, v, causal=True) * 2,
                             fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v), modelaccel.flash_attn_func(q, k, v, causal=True) * 2)

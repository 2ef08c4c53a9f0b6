"""The Gluon backward prototype (attention/gluon_bwd.py) on a Hopper GPU: dq, dk, dv against
a float32 reference by autograd, for every (ring depth, query rows per step) of
GLUON_BWD_CONFIGS, causal or not, GQA, ragged lengths, both layouts gluon_fwd._row_view
takes."""

import pytest
import torch

from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.gluon_bwd import GLUON_BWD_CONFIGS, flash_attn_backward_gluon_ws
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_grads_close, random_qkv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", sorted(set(c for cs in GLUON_BWD_CONFIGS.values() for c in cs)),
                         ids=lambda c: f"s{c[0]}q{c[1]}")
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

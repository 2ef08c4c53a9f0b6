"""The Gluon forward prototype (attention/gluon_fwd.py) on a Hopper GPU, against the float32
reference: every configuration, causal or not, GQA, ragged lengths, fp16/bf16."""

import pytest
import torch

from modelaccel.attention.gluon_fwd import GLUON_CONFIGS, flash_attn_forward_gluon
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_attention_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 8, 8, 128), (1, 300, 1500, 16, 4, 128), (3, 777, 513, 4, 1, 64),
                                   (2, 2048, 2048, 8, 2, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_matches_reference(config, shape, causal, monkeypatch):
    # The launcher's outputs start as NaN: every element must be written.
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = shape
    gen = torch.Generator().manual_seed(seqlen_q + seqlen_k)
    dtype = torch.bfloat16 if headdim == 128 else torch.float16
    q = torch.randn(batch, seqlen_q, nheads, headdim, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(batch, seqlen_k, nheads_k, headdim, generator=gen).to("cuda", dtype) for _ in range(2))
    block_m, block_n, stages, warps = config
    out, lse = flash_attn_forward_gluon(q, k, v, headdim ** -0.5, causal=causal, block_m=block_m, block_n=block_n,
                                        stages=stages, num_warps=warps)
    ref_out, ref_lse = attention_ref(q.float(), k.float(), v.float(), headdim ** -0.5, causal,
                                     compute_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)

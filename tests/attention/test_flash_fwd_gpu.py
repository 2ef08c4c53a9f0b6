"""Forward attention at real sizes on a GPU, against a float32 reference computed per head.

The reference runs head by head so that the seqlen_q x seqlen_k score matrix of the largest
configurations (16k x 16k) fits in memory.
"""

import pytest
import torch

import modelaccel
from modelaccel.attention.flash_fwd import _GPU_CONFIGS, flash_attn_forward
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_attention_close, fresh_replays

pytestmark = pytest.mark.gpu

# The benchmark's 18 forward configurations (batch, hq, hk, seqlen_q, seqlen_k).
BENCH_CONFIGS = [
    (16, 16, 16, 1024, 1024), (8, 16, 16, 2048, 2048), (4, 16, 16, 4096, 4096), (2, 16, 16, 8192, 8192),
    (1, 16, 16, 16384, 16384), (2, 48, 48, 1024, 1024), (2, 48, 48, 2048, 1024), (2, 48, 48, 4096, 8192),
    (2, 48, 48, 8192, 4096), (2, 48, 48, 16384, 8192), (8, 16, 16, 1989, 15344), (4, 16, 16, 4097, 163),
    (2, 16, 16, 8122, 2159), (1, 16, 16, 16281, 7), (2, 48, 48, 1021, 1020), (2, 48, 48, 2001, 2048),
    (2, 48, 48, 3996, 9639), (2, 48, 48, 8181, 1021),
]


def reference_per_head(q, k, v, **kwargs):
    """attention_ref in float32 on the GPU, one (batch, kv head) slice at a time."""
    batch, seqlen_q, nheads, _ = q.shape
    nheads_k = k.shape[2]
    group = nheads // nheads_k
    alibi = kwargs.pop("alibi_slopes", None)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    for b in range(batch):
        for hk in range(nheads_k):
            hs = slice(hk * group, (hk + 1) * group)
            slopes = None
            if alibi is not None:
                slopes = (alibi[b] if alibi.dim() == 2 else alibi)[hs].contiguous()
            o, l = attention_ref(q[b:b + 1, :, hs], k[b:b + 1, :, hk:hk + 1], v[b:b + 1, :, hk:hk + 1],
                                 alibi_slopes=slopes, compute_dtype=torch.float32, **kwargs)
            out[b:b + 1, :, hs] = o
            lse[b:b + 1, hs] = l
    return out, lse


def randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def run_and_check(q, k, v, **kwargs):
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device="cuda")
    launch = {key: kwargs.pop(key) for key in ("use_tma", "block_m", "block_n", "num_warps", "num_stages")
              if key in kwargs}
    scale = q.shape[-1] ** -0.5
    flash_attn_forward(q, k, v, scale, out=out, lse=lse, **kwargs, **launch)
    ref_out, ref_lse = reference_per_head(q, k, v, softmax_scale=scale, **kwargs)
    return assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


@pytest.mark.parametrize("config", BENCH_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_benchmark_configs_fp16_d128(config):
    b, hq, hk, sq, sk = config
    q, k, v = randn(b, sq, hq, 128, dtype=torch.float16), randn(b, sk, hk, 128, dtype=torch.float16), randn(b, sk, hk, 128, dtype=torch.float16)
    run_and_check(q, k, v)


@pytest.mark.parametrize("config", [(4, 16, 16, 4096, 4096), (4, 32, 8, 4096, 4096), (1, 64, 8, 16384, 16384),
                                    (2, 16, 16, 3000, 5000), (2, 16, 4, 5000, 3000)],
                         ids=lambda c: "x".join(map(str, c)))
def test_causal_bf16_d128(config):
    b, hq, hk, sq, sk = config
    q, k, v = randn(b, sq, hq, 128, dtype=torch.bfloat16), randn(b, sk, hk, 128, dtype=torch.bfloat16), randn(b, sk, hk, 128, dtype=torch.bfloat16)
    run_and_check(q, k, v, causal=True)


HEAD_DIMS = [40, 64, 80, 96, 128, 160, 256]


@pytest.mark.parametrize("headdim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_head_dims_both_load_paths(headdim, causal, use_tma):
    # Fixed 64x64 blocks (they fit every head dim) keep the compile count down; the dtype
    # alternates with the head dim so both are covered without doubling it.
    dtype = torch.float16 if HEAD_DIMS.index(headdim) % 2 == 0 else torch.bfloat16
    q, k, v = randn(2, 1000, 8, headdim, dtype=dtype), randn(2, 1100, 2, headdim, dtype=dtype), randn(2, 1100, 2, headdim, dtype=dtype)
    run_and_check(q, k, v, causal=causal, use_tma=use_tma, block_m=64, block_n=64, num_warps=4, num_stages=2)


@pytest.mark.parametrize("headdim,config,use_tma", [
    pytest.param(headdim, config, use_tma, id=f"d{headdim}-{'x'.join(map(str, config))}-{'tma' if use_tma else 'ptr'}")
    for headdim, block_d in ((64, 64), (128, 128), (160, 256)) for config in _GPU_CONFIGS[block_d]
    for use_tma in (True, False)])
def test_every_launch_configuration(headdim, config, use_tma):
    """Each tuning candidate, on both load paths: the other tests run with MODELACCEL_TUNING=off
    under scripts/gpu_check.sh (first candidates only). Causal GQA with odd lengths."""
    block_m, block_n, warps, stages = config
    q = randn(2, 1000, 8, headdim, dtype=torch.bfloat16)
    k, v = randn(2, 1100, 2, headdim, dtype=torch.bfloat16), randn(2, 1100, 2, headdim, dtype=torch.bfloat16)
    run_and_check(q, k, v, causal=True, use_tma=use_tma, block_m=block_m, block_n=block_n, num_warps=warps,
                  num_stages=stages)


@pytest.mark.parametrize("headdim", [40, 96, 160, 256])
def test_head_dims_public_launch(headdim):
    """The launch the public path picks: tuned, or the first candidate with MODELACCEL_TUNING=off."""
    q, k, v = randn(2, 1500, 8, headdim, dtype=torch.bfloat16), randn(2, 1500, 8, headdim, dtype=torch.bfloat16), randn(2, 1500, 8, headdim, dtype=torch.bfloat16)
    run_and_check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_softcap_alibi(dtype):
    q, k, v = randn(2, 1500, 8, 128, dtype=dtype) * 2, randn(2, 2100, 4, 128, dtype=dtype), randn(2, 2100, 4, 128, dtype=dtype)
    slopes = torch.rand(2, 8, device="cuda") * 0.1
    run_and_check(q, k, v, causal=True, window_size=(512, 0))
    run_and_check(q, k, v, window_size=(300, 200))
    run_and_check(q, k, v, causal=True, softcap=30.0)
    run_and_check(q, k, v, alibi_slopes=slopes)
    run_and_check(q, k, v, causal=True, window_size=(700, -1), softcap=20.0, alibi_slopes=slopes[0].contiguous())


def test_public_api_on_strided_qkv_matches_sdpa():
    qkv = randn(4, 2048, 3, 16, 128, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out = modelaccel.flash_attn_func(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True).transpose(1, 2)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_seqlen_one_decode_shape():
    q, k, v = randn(8, 1, 32, 128, dtype=torch.bfloat16), randn(8, 4096, 8, 128, dtype=torch.bfloat16), randn(8, 4096, 8, 128, dtype=torch.bfloat16)
    run_and_check(q, k, v, causal=True)


@pytest.mark.parametrize("layout", ["bshd", "transposed"])
def test_repeated_inference_calls_are_replayed_and_correct(layout, monkeypatch):
    """The later calls of a class replay an earlier one's launch (interface._plans):
    each still matches the reference on its own fresh inputs, with outputs that start as NaN
    in the caching allocator's reused blocks."""
    from modelaccel.attention import flash_fwd

    replays = fresh_replays(monkeypatch, flash_fwd._tuner)
    for _ in range(4):
        if layout == "bshd":
            q, k, v = (randn(1, 512, h, 128, dtype=torch.bfloat16) for h in (32, 8, 8))
        else:  # as Transformers hands them over: [b, h, s, d] seen through a transpose
            q, k, v = (randn(1, h, 512, 128, dtype=torch.bfloat16).transpose(1, 2) for h in (32, 8, 8))
        torch.empty(1, 512, 32, 128, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))  # poison a block
        out = modelaccel.flash_attn_func(q, k, v, causal=True)
        ref_out, ref_lse = reference_per_head(q, k, v, softmax_scale=128 ** -0.5, causal=True)
        assert_attention_close(out, ref_lse, ref_out, ref_lse, q.dtype)  # flash_attn_func returns no lse
    # The first call (or two, in a process whose first launch this is) takes the full path.
    assert len(replays) >= 2


def test_heads_first_calls_replay_from_their_own_layout_and_are_correct(monkeypatch):
    """flash_attn_heads_first (the Transformers integration's call) replays a repeated
    inference call straight from the [b, h, s, d] tensors: each call still matches the
    reference on fresh inputs, outputs poisoned, for Transformers' layout and a contiguous
    one (another class, with other strides)."""
    from modelaccel.attention import flash_fwd, interface

    replays = fresh_replays(monkeypatch, flash_fwd._tuner)
    for contiguous in (False, False, False, True, True, True):
        if contiguous:
            query, key, value = (randn(2, h, 300, 128, dtype=torch.bfloat16) for h in (16, 4, 4))
        else:
            query, key, value = (randn(2, 300, h, 128, dtype=torch.bfloat16).transpose(1, 2) for h in (16, 4, 4))
        torch.empty(2, 300, 16, 128, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))  # poison a block
        out = interface.flash_attn_heads_first(query, key, value, causal=True)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        ref_out, ref_lse = reference_per_head(q, k, v, softmax_scale=128 ** -0.5, causal=True)
        assert_attention_close(out, ref_lse, ref_out, ref_lse, q.dtype)
    assert len(interface._heads_first_plans) == 2 and len(replays) >= 4

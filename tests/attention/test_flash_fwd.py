"""Forward attention against the float64 reference.

On a CPU machine these run the real Triton kernel in the interpreter (conftest sets
TRITON_INTERPRET=1); on a GPU machine the same tests run the compiled kernel.
"""

import math

import pytest
import torch

import modelaccel
from modelaccel.attention import interface, launch
from modelaccel.attention.flash_fwd import flash_attn_forward
from modelaccel.attention.reference import attention_ref
from modelaccel.testing import assert_attention_close, count_calls, random_qkv as make_qkv

DTYPES = [torch.float16, torch.bfloat16]


def run_poisoned(q, k, v, **kwargs):
    """Run the kernel into NaN-filled outputs, so an unwritten element cannot pass."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=torch.float32, device=q.device)
    softmax_scale = kwargs.pop("softmax_scale", q.shape[-1] ** -0.5)
    return flash_attn_forward(q, k, v, softmax_scale, out=out, lse=lse, **kwargs)


def check(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, **launch):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = run_poisoned(q, k, v, softmax_scale=scale, causal=causal, window_size=window_size,
                            softcap=softcap, alibi_slopes=alibi_slopes, **launch)
    ref_out, ref_lse = attention_ref(q.cpu(), k.cpu(), v.cpu(), scale, causal, window_size, softcap,
                                     None if alibi_slopes is None else alibi_slopes.cpu())
    return assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim): odd lengths, q longer and shorter
# than k, a single query, GQA 2:1 / 4:1 and MQA, head dims that are not powers of two.
SHAPES = [
    (1, 37, 53, 2, 2, 64),
    (2, 53, 37, 4, 2, 40),
    (1, 1, 70, 4, 1, 128),
    (1, 64, 64, 4, 4, 32),
    (2, 17, 100, 8, 2, 80),
    (1, 100, 17, 2, 1, 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(shape, causal, dtype, device):
    q, k, v = make_qkv(*shape, dtype=dtype, device=device)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=lambda b: f"m{b[0]}n{b[1]}")
@pytest.mark.parametrize("causal,window_size", [(False, (-1, -1)), (True, (-1, -1)), (False, (9, 5)),
                                                (True, (20, -1)), (False, (0, 0)), (False, (-1, 3))])
def test_masks_blocks_and_load_paths(use_tma, blocks, causal, window_size, device):
    """Every block shape and load path over masks whose edges fall inside and across tiles."""
    for shape in [(1, 45, 77, 2, 1, 64), (1, 77, 45, 2, 2, 48)]:
        q, k, v = make_qkv(*shape, dtype=torch.float16, device=device, seed=sum(shape))
        check(q, k, v, causal=causal, window_size=window_size, use_tma=use_tma,
              block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("headdim", [8, 16, 24, 40, 72, 104, 160, 256])
def test_head_dims(headdim, device):
    q, k, v = make_qkv(1, 33, 41, 2, 1, headdim, dtype=torch.bfloat16, device=device, seed=headdim)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_alibi_window(dtype, causal, device):
    q, k, v = make_qkv(2, 40, 56, 4, 2, 64, dtype=dtype, device=device, seed=3)
    q = q * 3  # large scores, so the cap actually bends them
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)).to(device) * 0.5
    check(q, k, v, causal=causal, softcap=5.0)
    check(q, k, v, causal=causal, alibi_slopes=slopes)
    check(q, k, v, causal=causal, alibi_slopes=slopes[0].contiguous(), softcap=2.0, window_size=(13, 7))
    check(q, k, v, causal=causal, softmax_scale=0.3)


def test_rows_that_see_no_key_are_zero(device):
    # Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows precede every key.
    q, k, v = make_qkv(1, 50, 20, 2, 2, 64, dtype=torch.float16, device=device)
    out, lse = run_poisoned(q, k, v, causal=True)
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isposinf(lse[:, :, :30]).all()
    assert torch.isfinite(out).all()
    check(q, k, v, causal=True)
    # A window that excludes everything for some rows.
    check(q, k, v, window_size=(0, 0))


def test_empty_key_sequence(device):
    q, k, v = make_qkv(1, 5, 0, 2, 2, 64, dtype=torch.float16, device=device)
    out, lse, _ = modelaccel.flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


def test_strided_and_misaligned_inputs(device):
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 39, 3, 4, 64, generator=gen).to(device=device, dtype=torch.float16)
    q, k, v = qkv.unbind(2)  # strided views of a packed QKV projection
    assert not q.is_contiguous()
    check(q, k, v, causal=True)
    # A view starting one element in is not 16-byte aligned: TMA cannot take it, pointers can.
    flat = torch.randn(1 + 2 * 39 * 4 * 64, generator=gen).to(device=device, dtype=torch.float16)
    q_odd = flat[1:].view(2, 39, 4, 64)
    assert not launch.tma_usable(q_odd)
    check(q_odd, k, v)


def test_public_api_matches_reference_and_returns_lse(device):
    q, k, v = make_qkv(2, 29, 31, 4, 2, 64, dtype=torch.bfloat16, device=device, seed=11)
    out, lse, probs = modelaccel.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, 29)
    ref_out, ref_lse = attention_ref(q.cpu(), k.cpu(), v.cpu(), causal=True)
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)
    # A non-contiguous last dim is copied, not rejected.
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_t.stride(-1) != 1
    assert torch.equal(modelaccel.flash_attn_func(q_t, k, v, causal=True), out)


def test_cpu_runs_the_triton_kernel_under_the_interpreter(monkeypatch):
    """The CPU suite must exercise the kernel, not the PyTorch fallback."""
    calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    q, k, v = make_qkv(1, 8, 8, 2, 2, 32, dtype=torch.float16, device="cpu")
    if torch.cuda.is_available():
        q, k, v = q.cuda(), k.cuda(), v.cuda()
    modelaccel.flash_attn_func(q, k, v)
    assert calls, "flash_attn_func did not reach the Triton launcher"


def test_cpu_fallback_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the PyTorch reference path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(interface, "flash_attn_forward",
                        lambda *a, **k: pytest.fail("the Triton launcher ran without the interpreter"))
    q, k, v = make_qkv(1, 19, 23, 4, 2, 64, dtype=torch.float16, device="cpu")
    out, lse, _ = modelaccel.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    assert out.dtype == torch.float16
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype)


def test_default_softmax_scale(device):
    q, k, v = make_qkv(1, 16, 16, 2, 2, 64, dtype=torch.float16, device=device)
    explicit = modelaccel.flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(64))
    assert torch.equal(modelaccel.flash_attn_func(q, k, v), explicit)


BAD_INPUTS = [
    ("rank", lambda q, k, v: (q[0], k, v), ValueError, "4 dims"),
    ("float32", lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "float16"),
    ("float64", lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float16"),
    ("mixed dtypes", lambda q, k, v: (q, k.bfloat16(), v.bfloat16()), TypeError, "share a dtype"),
    ("batch", lambda q, k, v: (q, k[:1], v[:1]), ValueError, "batch"),
    ("heads", lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of nheads"),
    ("k/v shapes", lambda q, k, v: (q, k, v[:, :5]), ValueError, "same shape"),
    ("headdim mismatch", lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "head dim"),
    ("headdim not multiple of 8", lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), ValueError, "multiple of 8"),
    ("not a tensor", lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor"),
    ("devices", lambda q, k, v: (q, k.to("meta"), v.to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(name, mutate, exc, match, device):
    q, k, v = make_qkv(2, 8, 8, 4, 2, 32, dtype=torch.float16, device=device)
    with pytest.raises(exc, match=match):
        modelaccel.flash_attn_func(*mutate(q, k, v))


def test_bad_headdim_over_256(device):
    q, k, v = make_qkv(1, 4, 4, 1, 1, 264, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="at most 256|between 8 and 256"):
        modelaccel.flash_attn_func(q, k, v)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"window_size": (-2, 0)}, ValueError, "window_size"),
    ({"window_size": 4}, ValueError, "window_size"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
    ({"alibi_slopes": torch.ones(3)}, ValueError, "alibi_slopes"),
    ({"alibi_slopes": torch.ones(4, dtype=torch.float16)}, TypeError, "float32"),
])
def test_bad_options_raise(kwargs, exc, match, device):
    q, k, v = make_qkv(2, 8, 8, 4, 2, 32, dtype=torch.float16, device=device)
    if isinstance(kwargs.get("alibi_slopes"), torch.Tensor):
        kwargs = {**kwargs, "alibi_slopes": kwargs["alibi_slopes"].to(device)}
    with pytest.raises(exc, match=match):
        modelaccel.flash_attn_func(q, k, v, **kwargs)


def test_launch_tuner_retunes_a_stored_choice_that_is_no_longer_a_candidate(tmp_path, monkeypatch):
    """Choices persist across processes; one whose configuration was dropped is not reused."""
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    timings = {(1,): 3.0, (2,): 1.0, (3,): 2.0}
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, **kw: fn())
    tuner = launch.LaunchTuner("unit")
    assert tuner.choose(("k",), [(1,), (2,), (3,)], lambda c: timings[c]) == (2,)
    reloaded = launch.LaunchTuner("unit")
    calls = []
    assert reloaded.choose(("k",), [(1,), (2,), (3,)], lambda c: calls.append(c) or timings[c]) == (2,)
    assert not calls  # read from the file, not timed again
    assert reloaded.choose(("k",), [(1,), (3,)], lambda c: calls.append(c) or timings[c]) == (3,)
    assert set(calls) == {(1,), (3,)}


def test_launch_tuner_retimes_the_fastest_few_and_ranks_them_by_the_retimings(tmp_path, monkeypatch):
    """A candidate the first pass put ahead by chance loses to one that is faster when the
    finalists are timed again; candidates behind the finalists are not timed again."""
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, **kw: fn())
    # First pass: (1,) looks fastest; timed again it is 2.0 every time, (2,) 1.5.
    sequences = {(1,): [1.0, 2.0, 2.0, 2.0], (2,): [1.6, 1.5, 1.7, 1.5], (3,): [1.8, 2.5, 2.5, 2.5],
                 (4,): [1.9, 3.0, 3.0, 3.0], (5,): [9.0], (6,): [8.0]}
    calls = []

    def timed(config):
        calls.append(config)
        return sequences[config][sum(c == config for c in calls) - 1]

    configs = [(1,), (2,), (3,), (4,), (5,), (6,)]
    assert launch.LaunchTuner("unit").choose(("k",), configs, timed) == (2,)
    assert {c: calls.count(c) for c in configs} == {(1,): 4, (2,): 4, (3,): 4, (4,): 4, (5,): 1, (6,): 1}
    assert calls[6:] == [(1,), (2,), (3,), (4,)] * 3  # round-robin after the first pass


def test_launch_tuner_off_times_nothing(tmp_path, monkeypatch):
    """MODELACCEL_TUNING=off: a stored choice, else the first candidate; nothing timed or saved."""
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, **kw: fn())
    timings = {(1,): 3.0, (2,): 1.0}
    launch.LaunchTuner("unit").choose(("stored",), [(1,), (2,)], lambda c: timings[c])
    monkeypatch.setenv("MODELACCEL_TUNING", "off")
    tuner = launch.LaunchTuner("unit")
    calls = []
    assert tuner.choose(("stored",), [(1,), (2,)], lambda c: calls.append(c) or timings[c]) == (2,)
    assert tuner.choose(("new",), [(1,), (2,)], lambda c: calls.append(c) or timings[c]) == (1,)
    assert not calls
    reloaded = launch.LaunchTuner("unit")
    reloaded._load()
    assert list(reloaded.choices) == ["stored"]  # the untimed fallback was not saved


def test_launch_choices_lists_what_each_tuner_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, **kw: fn())
    tuner = launch.LaunchTuner("listed")
    assert "listed" not in launch.launch_choices()  # nothing chosen yet
    tuner.choose(("a", 1), [(1,), (2,)], lambda c: {(1,): 2.0, (2,): 1.0}[c])
    assert launch.launch_choices()["listed"] == {"a|1": (2,)}


def test_launch_tuner_skips_a_candidate_that_does_not_compile(tmp_path, monkeypatch):
    """A launch the installed compiler cannot build (a Gluon kernel on another triton) costs
    that candidate, with a warning, not the call."""
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch.triton.testing, "do_bench", lambda fn, **kw: fn())

    def timed(config):
        if config == ("gluon",):
            raise launch.CompilationError("src", None, "unsupported layout")
        return {(1,): 3.0, (2,): 2.0}[config]

    with pytest.warns(UserWarning, match="does not compile here"):
        assert launch.LaunchTuner("unit").choose(("k",), [(1,), ("gluon",), (2,)], timed) == (2,)


@pytest.mark.parametrize("version, expected", [("3.6.0", True), ("3.9.1", True), ("3.5.1", False),
                                               ("3.10.0", False), ("4.0.0", False), ("main", False)])
def test_triton_version_between(version, expected, monkeypatch):
    monkeypatch.setattr(launch.triton, "__version__", version)
    assert launch.triton_version_between((3, 6), (3, 9)) is expected

"""flash_attn_func's replay of a repeated inference call (interface._forward_plans): the
replay must hand the compiled kernel's launcher exactly the arguments launch_kernel's direct
path would, and any change that could alter them must take the full path.

The direct path and the replay only run on a GPU (the interpreter has no compiled kernels),
so these tests drive them on CPU tensors with a stand-in forward kernel that records what
its launcher receives (as test_launch.py does); the GPU tests run the real kernel through
both."""

import types

import pytest
import torch

from modelaccel import flash_attn_func
from modelaccel.attention import flash_fwd, interface, launch
from modelaccel.testing import FakeKernel, count_calls


@pytest.fixture
def kernel(monkeypatch):
    """The forward's launches on the direct path with a fake driver (device 0, stream 7),
    CPU tensors taking the kernels' path, pointer (not TMA) launches, no plans or attempts."""
    monkeypatch.setattr(launch, "_fast_launch", True)
    driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(launch.triton.runtime, "driver", types.SimpleNamespace(active=driver))
    monkeypatch.setattr(interface, "_use_triton", lambda q: True)
    monkeypatch.setattr(flash_fwd, "tma_usable", lambda *tensors: False)
    monkeypatch.setattr(interface, "_forward_plans", {})
    monkeypatch.setattr(interface, "_plan_attempts", {})
    fake = FakeKernel(flash_fwd._attn_fwd_kernel.arg_names)
    monkeypatch.setattr(flash_fwd, "_attn_fwd_kernel", fake)
    return fake


def qkv(batch=2, seqlen=48, nheads=4, nheads_k=2, headdim=32, dtype=torch.float16):
    q = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype)
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, dtype=dtype) for _ in range(2))
    return q, k, v


def test_a_replay_passes_what_the_direct_path_passes(kernel, monkeypatch):
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    flash_attn_func(*qkv(), causal=True)  # the first launch: Triton's path, then a plan
    q, k, v = qkv()
    out = flash_attn_func(q, k, v, causal=True)
    assert len(full_calls) == 1 and [entry[0] for entry in kernel.log] == ["triton", "direct"]
    replayed = kernel.log[-1][1]
    out_direct, lse_direct = flash_fwd.flash_attn_forward(q, k, v, 32 ** -0.5, True)
    direct = kernel.log[-1][1]
    assert kernel.compiles == 1 and len(replayed) == len(direct)
    # grid, stream and handles, then every parameter: the same tensors (the outputs are
    # each call's own, alike in shape), the same numbers and constexprs.
    for got, want in zip(replayed, direct):
        if isinstance(want, torch.Tensor):
            if want is out_direct or want is lse_direct:
                assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
            else:
                assert got is want
        else:
            assert got == want and type(got) is type(want)
    # The returned output is the one the kernel wrote.
    assert [i for i, a in enumerate(replayed) if a is out] == [i for i, a in enumerate(direct) if a is out_direct]


@pytest.mark.parametrize("change", ["strides", "alignment", "shape", "dtype", "causal", "scale", "window",
                                    "softcap", "grad", "launch hooks"])
def test_a_change_that_can_alter_the_launch_takes_the_full_path(kernel, monkeypatch, change):
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    q, k, v = qkv()
    options = dict(causal=True)
    flash_attn_func(q, k, v, **options)
    flash_attn_func(*qkv(), **options)
    assert len(full_calls) == 1  # the second call replayed
    if change == "strides":  # Transformers' [b, h, s, d] tensors seen through a transpose
        q = torch.randn(2, 4, 48, 32, dtype=torch.float16).transpose(1, 2)
    elif change == "alignment":  # one element in: q's pointer is not 16-byte aligned
        q = torch.randn(2 * 48 * 4 * 32 + 1, dtype=torch.float16)[1:].view(2, 48, 4, 32)
    elif change == "shape":
        q, k, v = qkv(seqlen=40)
    elif change == "dtype":
        q, k, v = qkv(dtype=torch.bfloat16)
    elif change == "causal":
        options = dict(causal=False)
    elif change == "scale":
        options = dict(options, softmax_scale=0.5)
    elif change == "window":
        options = dict(options, window_size=(8, 0))
    elif change == "softcap":
        options = dict(options, softcap=20.0)
    elif change == "grad":
        q = q.clone().requires_grad_()
    else:
        hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[print]),
                                      launch_exit_hook=types.SimpleNamespace(calls=[]))
        monkeypatch.setattr(launch.triton, "knobs", types.SimpleNamespace(runtime=hooks))
    flash_attn_func(q, k, v, **options)  # with grad: the autograd Function's forward
    assert len(full_calls) == 2


def test_bad_input_is_still_refused_after_a_plan(kernel):
    q, k, v = qkv()
    for _ in range(2):
        flash_attn_func(q, k, v, causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, causal=True, dropout_p=1.5)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, causal=True, window_size=(-2, 0))
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_func(q, k.float(), v, causal=True)


def test_an_unsettled_tuner_makes_no_plan(kernel, monkeypatch):
    # MODELACCEL_TUNING=off with no stored choice: the tuner hands out its first candidate
    # without settling (a later eager call may tune the class), so nothing is replayed.
    monkeypatch.setattr(flash_fwd, "interpreting", lambda: False)
    monkeypatch.setattr(flash_fwd._tuner, "choices", {})
    monkeypatch.setattr(flash_fwd._tuner, "_settled", {})
    monkeypatch.setenv("MODELACCEL_TUNING", "off")
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    recorded = count_calls(monkeypatch, interface, "record_launches")
    for _ in range(5):
        flash_attn_func(*qkv(), causal=True)
    assert len(full_calls) == 5
    # Recorded until the attempts run out, then marked as not replayable.
    assert len(recorded) == interface._PLAN_ATTEMPTS
    assert list(interface._forward_plans.values()) == [interface._NO_PLAN]


def test_a_class_that_settles_after_tuning_is_replayed(kernel, monkeypatch):
    # The first call of a class tunes it (several launches: nothing to replay), the next
    # one launches the settled choice once and makes the plan.
    launches_first = []
    launch_kernel = flash_fwd.launch_kernel

    def tuning_first(*args, **kwargs):
        if not launches_first:
            launches_first.append(1)
            launch_kernel(*args, **kwargs)  # a candidate timed
        launch_kernel(*args, **kwargs)
    monkeypatch.setattr(flash_fwd, "launch_kernel", tuning_first)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    for _ in range(4):
        flash_attn_func(*qkv(), causal=True)
    assert len(full_calls) == 2 and len(interface._forward_plans) == 1


def test_a_launch_with_descriptors_is_never_replayed(kernel, monkeypatch):
    # A TMA launch passes descriptors that hold the call's tensors: marked, not recorded again.
    monkeypatch.setattr(flash_fwd, "tma_usable", lambda *tensors: True)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    for _ in range(3):
        flash_attn_func(*qkv(), causal=True)
    assert len(full_calls) == 3
    assert list(interface._forward_plans.values()) == [interface._NO_PLAN]

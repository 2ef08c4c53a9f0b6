"""flash_attn_func's replays of repeated calls (interface._plans, replay.py): a replay must
hand each compiled kernel's launcher exactly the arguments launch_kernel's direct path
would, over the new call's tensors and fresh buffers, and any change that could alter them
must take the full path.

The direct path and the replay only run on a GPU (the interpreter has no compiled kernels),
so these tests drive them on CPU tensors with stand-in kernels that record what their
launchers receive (as test_launch.py does); the GPU tests run the real kernels through
both."""

import types

import pytest
import torch

from modelaccel import flash_attn_func
from modelaccel.attention import flash_bwd, flash_fwd, interface, launch
from modelaccel.attention.replay import NO_PLAN
from modelaccel.testing import FakeKernel, NoPlans, count_calls

_DQ_ACC_FILL = 0.25  # what the stand-in dK/dV kernels add into a float32 dQ accumulator


@pytest.fixture
def direct_path(monkeypatch):
    """Launches on the direct path with a fake driver (device 0, stream 7), CPU tensors
    taking the kernels' path, pointer (not TMA) forward launches, no plans or attempts."""
    monkeypatch.setattr(launch, "_fast_launch", True)
    driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(launch.triton.runtime, "driver", types.SimpleNamespace(active=driver))
    monkeypatch.setattr(interface, "_use_triton", lambda q: True)
    monkeypatch.setattr(flash_fwd, "tma_usable", lambda *tensors: False)
    monkeypatch.setattr(interface, "_plans", {})
    monkeypatch.setattr(interface, "_plan_attempts", {})


@pytest.fixture
def kernel(direct_path, monkeypatch):
    """The forward kernel, a stand-in."""
    fake = FakeKernel(flash_fwd._attn_fwd_kernel.arg_names)
    monkeypatch.setattr(flash_fwd, "_attn_fwd_kernel", fake)
    return fake


def qkv(batch=2, seqlen=48, nheads=4, nheads_k=2, headdim=32, dtype=torch.float16, grad=False):
    q = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype)
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def roles(args, named):
    """What each launcher argument is to the call: a named tensor of it (`named`: {name:
    tensor}), else the n-th other memory the call's launches touched (by data pointer) with
    its shape, strides and dtype; descriptors as the tensor or memory of their base and
    their fields;
    numbers as themselves. A replay must give the same roles as the direct path."""
    memory = {}

    def role(arg):
        if isinstance(arg, torch.Tensor):
            for name, tensor in named.items():
                if arg is tensor:
                    return name
            number = memory.setdefault(arg.data_ptr(), len(memory))
            return ("other", number, tuple(arg.shape), arg.stride(), arg.dtype)
        if isinstance(arg, launch._DESCRIPTOR_TYPES):
            # The launcher reads its base's data pointer only (the rest is in its fields).
            fields = {name: value for name, value in vars(arg).items() if name != "base"}
            base = next((name for name, t in named.items() if t.data_ptr() == arg.base.data_ptr()), None)
            return ("descriptor", base or memory.setdefault(arg.base.data_ptr(), len(memory)), repr(fields))
        return (type(arg), arg)

    return [[role(arg) for arg in launch_args] for launch_args in args]


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
    assert roles([replayed], dict(q=q, k=k, v=v, out=out)) == roles([direct], dict(q=q, k=k, v=v, out=out_direct))
    for got, want in zip(replayed, direct):
        if not isinstance(want, torch.Tensor):
            assert got == want and type(got) is type(want)


@pytest.mark.parametrize("change", ["strides", "alignment", "shape", "dtype", "causal", "scale", "window",
                                    "softcap", "launch hooks", "q is k"])
def test_a_change_that_can_alter_the_launch_takes_the_full_path(kernel, monkeypatch, change):
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    q, k, v = qkv(nheads=2)
    options = dict(causal=True)
    flash_attn_func(q, k, v, **options)
    flash_attn_func(*qkv(nheads=2), **options)
    assert len(full_calls) == 1  # the second call replayed
    if change == "strides":  # Transformers' [b, h, s, d] tensors seen through a transpose
        q = torch.randn(2, 2, 48, 32, dtype=torch.float16).transpose(1, 2)
    elif change == "alignment":  # one element in: q's pointer is not 16-byte aligned
        q = torch.randn(2 * 48 * 2 * 32 + 1, dtype=torch.float16)[1:].view(2, 48, 2, 32)
    elif change == "shape":
        q, k, v = qkv(seqlen=40, nheads=2)
    elif change == "dtype":
        q, k, v = qkv(nheads=2, dtype=torch.bfloat16)
    elif change == "causal":
        options = dict(causal=False)
    elif change == "scale":
        options = dict(options, softmax_scale=0.5)
    elif change == "window":
        options = dict(options, window_size=(8, 0))
    elif change == "softcap":
        options = dict(options, softcap=20.0)
    elif change == "q is k":  # the same shapes and strides, but one tensor in two roles: not
        k = q                 # recorded either, since a plan could not tell the roles apart
    else:
        hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[print]),
                                      launch_exit_hook=types.SimpleNamespace(calls=[]))
        monkeypatch.setattr(launch.triton, "knobs", types.SimpleNamespace(runtime=hooks))
    flash_attn_func(q, k, v, **options)
    assert len(full_calls) == 2
    if change == "q is k":  # and the replay of the earlier class still passes k as k
        q, k, v = qkv(nheads=2)
        flash_attn_func(q, k, v, **options)
        assert len(full_calls) == 2
        assert kernel.log[-1][1][_position("K")] is k


def _position(name):
    # A parameter's position among the launcher's arguments: grid (3), stream, function,
    # packed metadata and three hooks come first (launch.run_compiled).
    return 9 + flash_fwd._attn_fwd_kernel.arg_names.index(name)


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
    assert list(interface._plans.values()) == [NO_PLAN]


def test_a_class_that_settles_after_tuning_is_replayed(kernel, monkeypatch, tmp_path):
    # The first call of a class tunes it (every candidate timed: nothing to replay, and the
    # timing launches are not recorded), the next one launches the settled choice once and
    # makes the plan.
    monkeypatch.setenv("MODELACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MODELACCEL_TUNING", raising=False)
    monkeypatch.setattr(flash_fwd, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "cuda_available", lambda: False)
    monkeypatch.setattr(launch.torch.cuda, "get_device_name", lambda device=None: "fake")
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(flash_fwd._tuner, "choices", None)
    monkeypatch.setattr(flash_fwd._tuner, "_settled", {})
    timed = []
    def fake_timing(fn, **kwargs):
        timed.append(fn())
        return float(len(timed))
    monkeypatch.setattr(launch.triton.testing, "do_bench", fake_timing)
    monkeypatch.setattr(launch, "_gpu_ms", fake_timing)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    for _ in range(4):
        flash_attn_func(*qkv(), causal=True)
    assert len(timed) > 2  # every candidate, then the finalists again
    assert len(full_calls) == 2 and [type(plan).__name__ for plan in interface._plans.values()] == ["Plan"]


def test_a_tma_launch_is_replayed_with_descriptors_over_the_new_tensors(kernel, monkeypatch):
    monkeypatch.setattr(flash_fwd, "tma_usable", lambda *tensors: True)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_forward")
    flash_attn_func(*qkv(), causal=True)
    q, k, v = qkv()
    out = flash_attn_func(q, k, v, causal=True)
    replayed = kernel.log[-1][1]
    out_direct, _ = flash_fwd.flash_attn_forward(q, k, v, 32 ** -0.5, True)
    direct = kernel.log[-1][1]
    assert len(full_calls) == 1
    got, want = roles([replayed], dict(q=q, k=k, v=v, out=out)), roles([direct], dict(q=q, k=k, v=v, out=out_direct))
    assert got == want and sum(isinstance(r, tuple) and r[0] == "descriptor" for r in got[0]) == 4


# ---------------------------------------------------------------------------------------
# Heads-first calls (Transformers' [b, h, s, d] tensors): replayed from their own layout


def heads_first(nheads=4, nheads_k=2, seqlen=48, dtype=torch.float16, contiguous=False):
    """q/k/v as a Transformers layer hands them over: [b, h, s, d] seen through a transpose
    of the projections' [b, s, h, d] output (or made [b, h, s, d] contiguous)."""
    shapes = [(2, seqlen, h, 32) for h in (nheads, nheads_k, nheads_k)]
    if contiguous:
        return [torch.randn(b, h, s, d, dtype=dtype) for b, s, h, d in shapes]
    return [torch.randn(shape, dtype=dtype).transpose(1, 2) for shape in shapes]


@pytest.mark.parametrize("tma", [False, True])
def test_a_heads_first_replay_passes_what_the_direct_path_passes(kernel, monkeypatch, tma):
    monkeypatch.setattr(interface, "_heads_first_plans", {})
    monkeypatch.setattr(flash_fwd, "tma_usable", lambda *tensors: tma)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_func")
    interface.flash_attn_heads_first(*heads_first(), causal=True)  # Triton's path: a plan, adopted
    query, key, value = heads_first()
    out = interface.flash_attn_heads_first(query, key, value, causal=True)
    assert len(full_calls) == 1 and out.shape == (2, 48, 4, 32)
    assert [entry[0] for entry in kernel.log] == ["triton", "direct"]
    replayed = kernel.log[-1][1]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out_direct, _ = flash_fwd.flash_attn_forward(q, k, v, 32 ** -0.5, True)
    direct = kernel.log[-1][1]
    # The replay hands the launcher the heads-first tensors, the direct path their
    # transposes: one memory each, and the strides the kernel reads are the numbers.
    got = roles([replayed], dict(q=query, k=key, v=value, out=out))
    want = roles([direct], dict(q=q, k=k, v=v, out=out_direct))
    assert got == want
    for got_arg, want_arg in zip(replayed, direct):
        if not isinstance(want_arg, (torch.Tensor, *launch._DESCRIPTOR_TYPES)):
            assert got_arg == want_arg and type(got_arg) is type(want_arg)


@pytest.mark.parametrize("change", ["contiguous", "shape", "dtype", "causal", "window", "grad", "dropout"])
def test_a_heads_first_change_takes_flash_attn_func(kernel, monkeypatch, change):
    monkeypatch.setattr(interface, "_heads_first_plans", {})
    for _ in range(2):
        interface.flash_attn_heads_first(*heads_first(), causal=True)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_func")
    interface.flash_attn_heads_first(*heads_first(), causal=True)
    assert len(full_calls) == 0  # replayed from the heads-first plan
    tensors, options = heads_first(), dict(causal=True)
    if change == "contiguous":  # [b, h, s, d] contiguous: the same shapes, other strides
        tensors = heads_first(contiguous=True)
    elif change == "shape":
        tensors = heads_first(seqlen=40)
    elif change == "dtype":
        tensors = heads_first(dtype=torch.bfloat16)
    elif change == "causal":
        options = dict(causal=False)
    elif change == "window":
        options = dict(options, window_size=(8, 0))
    elif change == "grad":
        tensors = [t.requires_grad_() for t in tensors]
    else:
        options = dict(options, dropout_p=0.1)
    if change in ("grad", "dropout"):  # the training path's kernels are not these stand-ins
        monkeypatch.setattr(interface, "FlashAttnFunc", types.SimpleNamespace(
            apply=lambda q, *args: (torch.zeros(q.shape, dtype=q.dtype), None)))
    out = interface.flash_attn_heads_first(*tensors, **options)
    assert len(full_calls) == 1 and out.shape == (2, tensors[0].shape[2], 4, 32)


# ---------------------------------------------------------------------------------------
# The backward pass of a training call

_BACKWARD_KERNELS = {(flash_bwd, "_attn_bwd_dq_kernel"), (flash_bwd, "_attn_bwd_dkdv_kernel"),
                     (flash_bwd, "_attn_bwd_delta_kernel")}

# dK/dV launches the tuner may choose: the Triton kernels with dQ by its own kernel, with
# dQ added by TMA reduces into a float32 accumulator, and the Gluon kernel per tile (dQ by
# TMA reduces) and persistent with its host-dealt tile table.
_DKDV_CHOICES = {"triton": (16, 16, 4, 2, False, False), "triton atomic tma": (16, 16, 4, 2, True, True),
                 "gluon dq_tma": ("gluon_ws", 2, 64, False, 8, 1, False, False, True),
                 "gluon scheduled": ("gluon_ws", 2, 32, True, 8, 1, True, True)}


@pytest.fixture
def backward_kernels(direct_path, monkeypatch):
    """Every forward and backward kernel a stand-in logging into one list; those given a
    float32 dQ accumulator fill it with _DQ_ACC_FILL, as if every key block had added."""
    log = []

    def fill_dq_acc(args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dtype == torch.float32 and arg.dim() == 4:
                arg.fill_(_DQ_ACC_FILL)

    kernels = _BACKWARD_KERNELS | {(flash_fwd, "_attn_fwd_kernel")}
    gluon_bwd = launch.gluon_kernels("gluon_bwd")
    if gluon_bwd is not None:
        kernels |= {(gluon_bwd, "_attn_bwd_ws_kernel")}
        monkeypatch.setattr(gluon_bwd, "_sm_count", lambda device_index: 3)
        monkeypatch.setattr(gluon_bwd, "_schedules", {})
    for module, name in kernels:
        monkeypatch.setattr(module, name, FakeKernel(getattr(module, name).arg_names, fill_dq_acc, log))
    return log


def _route_backward(monkeypatch, choice):
    # The tuned path as on a GPU (not the interpreter's fixed blocks), settled on `choice`.
    monkeypatch.setattr(flash_bwd, "interpreting", lambda: False)
    monkeypatch.setattr(flash_bwd, "tma_usable", lambda *tensors: True)
    monkeypatch.setattr(flash_bwd._dq_tuner, "choose", lambda key, candidates, launch: (16, 16, 4, 2, False))
    monkeypatch.setattr(flash_bwd._dkdv_tuner, "choose", lambda key, candidates, launch: choice)


@pytest.mark.parametrize("path", list(_DKDV_CHOICES))
def test_a_backward_replay_passes_what_the_full_path_passes(backward_kernels, monkeypatch, path):
    if path.startswith("gluon") and launch.gluon_kernels("gluon_bwd") is None:
        pytest.skip("this triton has no Gluon")
    _route_backward(monkeypatch, _DKDV_CHOICES[path])
    full_calls = count_calls(monkeypatch, interface, "flash_attn_backward")
    headdim = 64 if path.startswith("gluon") else 32
    calls = []
    for round in ("recorded", "replayed", "replayed", "full path"):
        if round == "full path":  # the direct launches without a plan, as the reference
            monkeypatch.setattr(interface, "_plans", NoPlans())
        q, k, v = qkv(headdim=headdim, grad=True)
        dout = torch.randn_like(q)
        out = flash_attn_func(q, k, v, causal=True)
        start = len(backward_kernels)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        assert all(entry[0] == "direct" for entry in backward_kernels[start:]) or round == "recorded"
        launches = [entry[1] for entry in backward_kernels[start:]]
        calls.append(roles(launches, dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv)))
        if path != "triton":  # dQ copied from the float32 accumulator the kernel filled
            assert torch.equal(dq, torch.full_like(dq, _DQ_ACC_FILL))
    assert len(full_calls) == 2  # recorded, replayed twice, then the full path
    assert calls[1] == calls[3] and calls[2] == calls[3]
    assert len(calls[3]) == 2  # the delta (or dQ) launch and the dK/dV one
    if path == "gluon scheduled":  # the host-dealt table is passed itself, not a fresh buffer
        table, = launch.gluon_kernels("gluon_bwd")._schedules.values()
        assert any(arg is table for arg in backward_kernels[-1][1])


def test_a_deterministic_backward_is_its_own_class(backward_kernels, monkeypatch):
    _route_backward(monkeypatch, _DKDV_CHOICES["triton"])
    full_calls = count_calls(monkeypatch, interface, "flash_attn_backward")
    for deterministic in (False, True, False, True):
        q, k, v = qkv(grad=True)
        out = flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(q))
    assert len(full_calls) == 2


def test_a_backward_with_copied_inputs_is_not_replayed(backward_kernels, monkeypatch):
    # dout not contiguous: the backward copies it, and a replay would skip that copy.
    _route_backward(monkeypatch, _DKDV_CHOICES["triton atomic tma"])
    full_calls = count_calls(monkeypatch, interface, "flash_attn_backward")
    for _ in range(3):
        q, k, v = qkv(grad=True)
        out = flash_attn_func(q, k, v, causal=True)
        dout = torch.randn(2, 4, 48, 32, dtype=torch.float16).transpose(1, 2)
        torch.autograd.grad(out, (q, k, v), dout)
    assert len(full_calls) == 3
    assert NO_PLAN in interface._plans.values()


# ---------------------------------------------------------------------------------------
# Decoding steps: flash_attn_with_kvcache without new tokens


@pytest.fixture
def decode_kernels(direct_path, monkeypatch):
    """The split and combine kernels, stand-ins logging into one list; the split one fills
    its partial outputs (float32) with ones, as if it had run."""
    from modelaccel.attention import decode

    log = []

    def fill_partials(args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dtype == torch.float32 and arg.dim() >= 4:
                arg.fill_(1.0)

    monkeypatch.setattr(decode, "_decode_split_kernel", FakeKernel(decode._decode_split_kernel.arg_names,
                                                                   fill_partials, log))
    monkeypatch.setattr(decode, "_decode_combine_kernel", FakeKernel(decode._decode_combine_kernel.arg_names,
                                                                     log=log))
    return log


def decoding_step(layout, capacity=64, batch=2):
    """Fresh inputs of one decoding step: (q, k_cache, v_cache, options) with the cache
    contiguous or paged, and cache_seqlens an int or a tensor."""
    q = torch.randn(batch, 1, 4, 32, dtype=torch.float16)
    if layout.startswith("paged"):
        k_cache, v_cache = (torch.randn(batch * capacity // 16, 16, 2, 32, dtype=torch.float16) for _ in range(2))
        table = torch.randperm(batch * capacity // 16, dtype=torch.int32).view(batch, -1)
        options = dict(block_table=table, cache_seqlens=torch.tensor([capacity, 23], dtype=torch.int32))
    else:
        k_cache, v_cache = (torch.randn(batch + 1, capacity, 2, 32, dtype=torch.float16) for _ in range(2))
        options = dict(cache_seqlens=40 if layout == "int seqlens" else torch.tensor([capacity, 7], dtype=torch.int32))
        if layout == "batch idx and leftpad":
            options.update(cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32),
                           cache_leftpad=torch.tensor([3, 0], dtype=torch.int32))
    return q, k_cache, v_cache, options


@pytest.mark.parametrize("layout", ["int seqlens", "tensor seqlens", "batch idx and leftpad", "paged"])
def test_a_decoding_replay_passes_what_the_full_path_passes(decode_kernels, monkeypatch, layout):
    full_calls = count_calls(monkeypatch, interface, "decode_attention")
    calls = []
    for round in ("recorded", "replayed", "replayed", "full path"):
        if round == "full path":
            monkeypatch.setattr(interface, "_plans", NoPlans())
        q, k_cache, v_cache, options = decoding_step(layout)
        start = len(decode_kernels)
        out, lse = interface.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, return_softmax_lse=True,
                                                     **options)
        assert round == "recorded" or [entry[0] for entry in decode_kernels[start:]] == ["direct", "direct"]
        named = dict(q=q, k_cache=k_cache, v_cache=v_cache, out=out, lse=lse,
                     **{name: t for name, t in options.items() if isinstance(t, torch.Tensor)})
        calls.append(roles([entry[-1] for entry in decode_kernels[start:]], named))
    assert len(full_calls) == 2  # recorded, replayed twice, then the full path
    assert calls[1] == calls[3] and calls[2] == calls[3]


def test_a_decoding_replay_still_checks_the_cache_values(decode_kernels, monkeypatch):
    full_calls = count_calls(monkeypatch, interface, "decode_attention")
    q, k_cache, v_cache, options = decoding_step("tensor seqlens")
    for _ in range(2):
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    assert len(full_calls) == 1
    lengths = options["cache_seqlens"]
    lengths += 60  # in place, past the 64-row capacity
    with pytest.raises(ValueError, match="cache length"):
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    with pytest.raises(ValueError, match="cache length"):
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=65)
    table = torch.full((2, 4), 99, dtype=torch.int32)  # past the pool of 8 pages
    q, k_cache, v_cache, options = decoding_step("paged")
    for _ in range(2):
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, **options)
    with pytest.raises(ValueError, match="outside the pool"):
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=options["cache_seqlens"],
                                          block_table=table)
    assert len(full_calls) == 2


@pytest.mark.parametrize("change", ["capacity", "cache strides", "int to tensor seqlens", "causal", "num_splits",
                                    "k_cache is v_cache", "new tokens"])
def test_a_decoding_change_that_can_alter_the_launch_takes_the_full_path(decode_kernels, monkeypatch, change):
    full_calls = count_calls(monkeypatch, interface, "decode_attention")
    for _ in range(2):
        q, k_cache, v_cache, options = decoding_step("int seqlens")
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, **options)
    assert len(full_calls) == 1
    q, k_cache, v_cache, options = decoding_step("int seqlens")
    extra = dict(causal=True)
    if change == "capacity":
        q, k_cache, v_cache, options = decoding_step("int seqlens", capacity=80)
    elif change == "cache strides":  # [b, h, s, d] caches seen through a transpose, as Transformers keeps them
        k_cache, v_cache = (torch.randn(3, 2, 64, 32, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    elif change == "int to tensor seqlens":
        options = dict(cache_seqlens=torch.tensor([40, 40], dtype=torch.int32))
    elif change == "causal":
        extra = dict(causal=False)
    elif change == "num_splits":
        extra = dict(extra, num_splits=2)
    elif change == "k_cache is v_cache":
        v_cache = k_cache
    else:
        new = torch.randn(2, 1, 2, 32, dtype=torch.float16)
        extra = dict(extra, k=new, v=new.clone())
    interface.flash_attn_with_kvcache(q, k_cache, v_cache, **options, **extra)
    assert len(full_calls) == 2


def heads_first_step(length=40, batch=2, strided_q=False):
    """A decoding step as a Transformers layer hands it over: one query [b, h, 1, d] (the
    projection's [b, 1, h, d] transposed; strided_q: a slice of a wider one) over a dynamic
    cache's full [b, hk, s, d]."""
    if strided_q:
        q = torch.randn(batch, 4, 1, 64, dtype=torch.float16)[..., :32]
    else:
        q = torch.randn(batch, 1, 4, 32, dtype=torch.float16).transpose(1, 2)
    return (q, *(torch.randn(batch, 2, length, 32, dtype=torch.float16) for _ in range(2)))


def test_a_heads_first_decoding_replay_passes_what_the_full_path_passes(decode_kernels, monkeypatch):
    monkeypatch.setattr(interface, "_heads_first_plans", {})
    monkeypatch.setattr(interface, "_full_lengths", {})
    full_calls = count_calls(monkeypatch, interface, "flash_attn_with_kvcache")
    fills = count_calls(monkeypatch, interface.torch, "full")
    calls = []
    for round in ("recorded", "replayed", "replayed"):
        query, key, value = heads_first_step()
        start = len(decode_kernels)
        out = interface.flash_attn_with_kvcache_heads_first(query, key, value, causal=True)
        assert out.shape == (2, 1, 4, 32)
        calls.append([entry[-1] for entry in decode_kernels[start:]])
    assert len(full_calls) == 1
    assert len(fills) == 2  # the full path's lengths, then one shared by the replays
    lengths = calls[1][0][_decode_position("CACHE_SEQLENS")]
    assert lengths.dtype == torch.int32 and lengths.tolist() == [40, 40]
    assert calls[2][0][_decode_position("CACHE_SEQLENS")] is lengths
    # The full path over the transposes, by the same kernels: the same roles and numbers.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    start = len(decode_kernels)
    monkeypatch.setattr(interface, "_plans", NoPlans())
    out_full = interface.flash_attn_with_kvcache(q, k, v, cache_seqlens=40, causal=True)
    direct = [entry[-1] for entry in decode_kernels[start:]]
    # (the lengths are an "other" int32 [2] in both: the shared one, the full path's own)
    assert roles(calls[2], dict(q=query, k_cache=key, v_cache=value, out=out)) \
        == roles(direct, dict(q=q, k_cache=k, v_cache=v, out=out_full))


def _decode_position(name):
    from modelaccel.attention import decode

    return 9 + decode._decode_split_kernel.arg_names.index(name)


@pytest.mark.parametrize("change", ["length", "query strides", "causal", "window"])
def test_a_heads_first_decoding_change_takes_the_full_path(decode_kernels, monkeypatch, change):
    monkeypatch.setattr(interface, "_heads_first_plans", {})
    for _ in range(2):
        interface.flash_attn_with_kvcache_heads_first(*heads_first_step(), causal=True)
    full_calls = count_calls(monkeypatch, interface, "flash_attn_with_kvcache")
    tensors, options = heads_first_step(), dict(causal=True)
    if change == "length":  # the next step of a dynamic cache
        tensors = heads_first_step(length=41)
    elif change == "query strides":
        tensors = heads_first_step(strided_q=True)
    elif change == "causal":
        options = dict(causal=False)
    else:
        options = dict(options, window_size=(8, 0))
    interface.flash_attn_with_kvcache_heads_first(*tensors, **options)
    assert len(full_calls) == 1


def test_a_fused_decoding_replay_zeroes_a_fresh_counter_each_call(direct_path, monkeypatch):
    """The fused launch (the last split program merges) counts finished splits in a zeroed
    int32 buffer: a replay must hand each launch a fresh zeroed one, not the last call's."""
    from modelaccel.attention import decode

    seen = []

    def count_splits(args):  # the stand-in kernel reads the counter, then counts into it
        counters = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int32 and a.shape == (4,)]
        seen.append(counters[0].tolist())
        counters[0] += 3

    monkeypatch.setattr(decode, "_decode_split_kernel", FakeKernel(decode._decode_split_kernel.arg_names,
                                                                   count_splits))
    monkeypatch.setattr(decode, "interpreting", lambda: False)
    monkeypatch.setattr(decode._tuner, "choose", lambda key, candidates, launch: (16, 4, 3, 2, 4, True))
    full_calls = count_calls(monkeypatch, interface, "decode_attention")
    for _ in range(3):
        q, k_cache, v_cache, options = decoding_step("tensor seqlens")
        interface.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=3, **options)
    assert len(full_calls) == 1 and len(seen) == 3
    assert seen == [[0, 0, 0, 0]] * 3

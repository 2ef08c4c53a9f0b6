"""launch_kernel: a repeated signature skips Triton's argument binding and calls the
compiled kernel's launcher with the same arguments Triton would pass.

The direct path only runs on a GPU (the interpreter has no compiled kernels), so these
tests drive it with a stand-in kernel that records what each path receives; the GPU tests
run the real kernels through it."""

import types

import pytest
import torch

from modelaccel.attention import launch
from modelaccel.testing import FakeKernel


def fake_kernel():
    return FakeKernel(["X", "n", "scale", "BLOCK", "FLAG"])


@pytest.fixture
def direct_path(monkeypatch):
    """launch_kernel with the direct path on and a fake driver (device 0, stream 7)."""
    monkeypatch.setattr(launch, "_fast_launch", True)
    driver = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(launch.triton.runtime, "driver", types.SimpleNamespace(active=driver))


def test_repeat_signature_calls_the_launcher_directly(direct_path):
    kernel = fake_kernel()
    x, y = torch.randn(64), torch.randn(64)
    launch.launch_kernel(kernel, (4,), (x, 64, 0.5), dict(BLOCK=32, FLAG=True, num_warps=4))
    assert [entry[0] for entry in kernel.log] == ["triton"]
    launch.launch_kernel(kernel, (4, 2), (y, 64, 0.5), dict(BLOCK=32, FLAG=True, num_warps=4))
    kind, args = kernel.log[-1]
    assert kind == "direct" and kernel.compiles == 1
    # grid padded to 3D, the stream, the compiled function, no launch metadata or hooks,
    # then every parameter in signature order, constexprs included.
    assert args[:9] == (4, 2, 1, 7, "function handle", "packed metadata", None, None, None)
    assert args[9] is y and args[10:] == (64, 0.5, 32, True)


@pytest.mark.parametrize("change", ["constexpr", "option", "int value", "dtype", "alignment", "device"])
def test_anything_that_can_change_the_specialization_goes_through_triton(direct_path, monkeypatch, change):
    kernel = fake_kernel()
    x = torch.randn(64)
    args, kwargs = (x, 64, 0.5), dict(BLOCK=32, FLAG=True, num_warps=4)
    launch.launch_kernel(kernel, (1,), args, kwargs)
    if change == "constexpr":
        kwargs = dict(kwargs, BLOCK=64)
    elif change == "option":
        kwargs = dict(kwargs, num_warps=8)
    elif change == "int value":  # Triton specializes ints on divisibility by 16
        args = (x, 65, 0.5)
    elif change == "dtype":
        args = (x.half(), 64, 0.5)
    elif change == "alignment":  # a view one element in: its pointer is not 16-byte aligned
        args = (x[1:], 64, 0.5)
    else:
        monkeypatch.setattr(launch.triton.runtime.driver.active, "get_current_device", lambda: 1)
    launch.launch_kernel(kernel, (1,), args, kwargs)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_launch_hooks_keep_tritons_path(direct_path, monkeypatch):
    kernel = fake_kernel()
    x = torch.randn(64)
    hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[print]),
                                  launch_exit_hook=types.SimpleNamespace(calls=[]))
    monkeypatch.setattr(launch.triton, "knobs", types.SimpleNamespace(runtime=hooks))
    for _ in range(2):
        launch.launch_kernel(kernel, (1,), (x, 64, 0.5), dict(BLOCK=32, FLAG=True))
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_a_constexpr_left_to_its_default_is_never_repeated_directly(direct_path):
    kernel = fake_kernel()
    x = torch.randn(64)
    for _ in range(2):
        launch.launch_kernel(kernel, (1,), (x, 64, 0.5), dict(BLOCK=32))  # FLAG not passed
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_interpreter_uses_tritons_path():
    """Under TRITON_INTERPRET (the CPU suite) the direct path is off."""
    if not launch.interpreting():
        pytest.skip("the CPU suite runs under the Triton interpreter")
    assert not launch._fast_launch_supported()


def test_a_recording_holds_only_its_own_threads_notes():
    # Autograd runs a backward on its own thread: another thread's buffers and launches
    # must not land in the notes a call is recording (a replay would repeat them).
    import threading

    def call():
        other = threading.Thread(target=lambda: launch.empty_buffer((2,), torch.float32, "cpu"))
        other.start()
        other.join()
        launch.empty_buffer((3,), torch.float32, "cpu")

    _, notes = launch.record_launches(call)
    assert [(kind, tuple(tensor.shape)) for kind, tensor in notes] == [("empty", (3,))]

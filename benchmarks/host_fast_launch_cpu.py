"""Host time of a repeated inference call through launch_kernel's direct path, on a CPU.

host_overhead_cpu.py stubs Triton's `run` under the interpreter, so it never reaches the
path the GPU takes once a signature has launched: launch_kernel's key, its cache lookup and
the compiled kernel's launcher. Here the interpreter is off, the fast path is forced on, the
driver is a stand-in (device 0, stream 0) and every lookup finds a compiled kernel whose
launcher does nothing: what is timed is all of our Python on the way to Triton's C launcher
(plus the two output allocations), which the GPU machine's host runs several times slower.
flash_attn_func's and flash_attn_with_kvcache's calls are timed twice: replayed (a
repeated call's launches, interface._plans) and on the full path; so is a training call's backward through autograd
(the dK/dV tuner settled on its first candidate: the dQ and the dK/dV launches).
Usage: python benchmarks/host_fast_launch_cpu.py [--profile [CALL]]   (us per call, best of 3;
--profile: cProfile of CALL's full path, default "prefill Transformers layer")
"""

import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

import modelaccel  # noqa: E402
from modelaccel.attention import decode, flash_bwd, flash_fwd, interface, launch  # noqa: E402
from modelaccel.testing import NoPlans  # noqa: E402


class _Compiled:
    packed_metadata = None
    function = 0

    @staticmethod
    def run(*args):
        return None


class _AlwaysLaunched(dict):
    """A launch cache that has seen every signature."""

    def get(self, key, default=None):
        return _Compiled, ()


class _Driver:
    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device):
        return 0


def per_call_us(fn, n=2000):
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main():
    choose = launch.LaunchTuner.choose

    def settled_on_first(self, key, candidates, fn):
        # As after tuning: each class settled, one dict lookup a call.
        self._settled.setdefault(key, candidates[0])
        return choose(self, key, candidates, fn)

    launch.LaunchTuner.choose = settled_on_first
    interface._use_triton = lambda q: True  # the kernels' path, not the CPU reference
    launch._fast_launch = True
    triton.runtime.driver.set_active(_Driver())
    for module in (flash_fwd, flash_bwd, decode):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel") and hasattr(kernel, "run"):
                kernel.__dict__["_modelaccel_launches"] = _AlwaysLaunched()
    # A Llama-3-8B prefill layer at 512 tokens, q/k/v as Transformers hands them over
    # ([b, h, s, d] seen through a transpose).
    q, k, v = (torch.randn(1, h, 512, 128, dtype=torch.bfloat16).transpose(1, 2) for h in (32, 8, 8))
    lens = torch.tensor([300], dtype=torch.int32)
    cache, cache_v = (torch.randn(1, 1024, 8, 128, dtype=torch.bfloat16) for _ in range(2))
    q1 = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16)
    from modelaccel.integrations.transformers import attention_forward

    class Layer:  # what attention_forward reads of a Transformers attention module
        is_causal = True
        training = False

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # as Transformers passes them: [b, h, s, d]
    kd, vd = (torch.randn(1, 8, 300, 128, dtype=torch.bfloat16) for _ in range(2))  # a dynamic cache's at one step
    # A backward of the 48-head benchmark row's kind, at a size whose CPU allocations cost
    # nothing: torch's autograd engine and our Function's backward.
    qg, kg, vg = (torch.randn(2, 16, 48, 128, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 16, 48, 128, dtype=torch.bfloat16)
    calls = {
        "prefill flash_attn_forward": lambda: flash_fwd.flash_attn_forward(q, k, v, 128 ** -0.5, True),
        "prefill flash_attn_func": lambda: modelaccel.flash_attn_func(q, k, v, causal=True),
        "prefill Transformers layer": lambda: attention_forward(Layer(), qt, kt, vt, None, scaling=128 ** -0.5),
        "decode_attention": lambda: decode.decode_attention(q1, cache, cache, lens, 128 ** -0.5, True),
        "flash_attn_with_kvcache": lambda: modelaccel.flash_attn_with_kvcache(q1, cache, cache_v, cache_seqlens=lens,
                                                                              causal=True),
        # At one length: a dynamic cache grows a token a step, and each length is its own class.
        "decode Transformers layer": lambda: attention_forward(Layer(), q1.transpose(1, 2), kd, vd, None,
                                                               scaling=128 ** -0.5),
    }
    # flash_attn_func replays a repeated call (interface._plans); the same calls again, each
    # marked as not replayable, show the full path. The backward's graph is made under each.
    for plans in ("replayed", "full path"):
        if plans == "full path":
            interface._plans = interface._heads_first_plans = NoPlans()
        out = modelaccel.flash_attn_func(qg, kg, vg, causal=True)
        calls["training forward"] = lambda: modelaccel.flash_attn_func(qg, kg, vg, causal=True)
        calls["backward through autograd"] = lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)
        for name, fn in calls.items():
            if plans == "full path" and name in ("prefill flash_attn_forward", "decode_attention"):
                continue  # no replay on these paths
            tag = f"  ({plans})" if name.startswith(("prefill flash_attn_func", "prefill Transformers", "training",
                                                     "backward", "flash_attn_with_kvcache", "decode Transformers")) \
                else ""
            print(f"{name:28s} {per_call_us(fn):7.1f} us{tag}", flush=True)
    if "--profile" in sys.argv[1:]:  # the full path (the loop's last setting) of one call
        args = sys.argv[sys.argv.index("--profile") + 1:]
        name = args[0] if args else "prefill Transformers layer"
        prof = cProfile.Profile()
        prof.runcall(lambda: [calls[name]() for _ in range(2000)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""What the attention launchers share: device checks, the per-problem-class launch tuner,
and a kernel launch that skips Triton's per-call argument binding when it can."""

import functools
import importlib
import json
import os
import statistics
import threading
import warnings

import torch
import triton
from triton.compiler.errors import CompilationError

try:  # triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer path only
    TensorDescriptor = None


def interpreting():
    """True when the Triton interpreter runs the kernels (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_descriptor_reduce(builder, kind, desc, value, indices):
    """A tensor descriptor's atomic_add (TMA reduce) for the interpreter, which lacks it
    (triton 3.9): an atomic add over the descriptor's in-bounds elements."""
    from triton._C.libtriton import ir
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"descriptor reduce {kind} in the interpreter")
    ptrs, mask = desc.materialize_pointers(indices)
    op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
    builder.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


if interpreting():
    from triton.runtime import interpreter as _interpreter
    if not hasattr(_interpreter.InterpreterBuilder, "create_descriptor_reduce"):
        _interpreter.InterpreterBuilder.create_descriptor_reduce = _interpreter_descriptor_reduce


@functools.lru_cache(maxsize=None)
def cuda_available():
    # torch.cuda.is_available() asks NVML each call: ~10 us on the GPU machine's host, paid
    # per launch before this was cached.
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def tma_usable(*tensors):
    """TMA needs Hopper or newer (or the interpreter), 16-byte aligned pointers and strides."""
    if TensorDescriptor is None:
        return False
    if tensors[0].is_cuda:
        if capability(tensors[0].device.index)[0] < 9:
            return False
    elif not interpreting():
        return False
    for t in tensors:
        esize = t.element_size()
        if t.data_ptr() % 16 or any((s * esize) % 16 for s in t.stride()[:-1]):
            return False
    return True


# Host-side integer helpers for the launchers. triton.cdiv / triton.next_power_of_2 go
# through Triton's constexpr-function wrapper on recent versions, ~4 us a call on our CPUs:
# a decoding step called them seven times.
def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def size_bucket(n):
    """Sizes tune by power-of-two class, so a new prompt length does not retune."""
    return next_power_of_2(n)


_flush_buffer = None


def read_flush_ms(fn, warmup_ms=5, rep_ms=20, keep_buffer=False):
    """Median ms of fn(), with L2 emptied before every call by *reading* 256 MB.

    triton's do_bench empties L2 by zeroing a 256 MB buffer: the ~50 MB of dirty lines
    that leaves must then be written back to HBM while the next call runs, and that
    write-back (~17 us at 3 TB/s) was charged to the call. For a decoding step of 16-128
    MiB it was a third of the time, for every candidate alike, and buried the differences
    between them. A read leaves clean lines, which L2 drops for free, so the call reads
    its inputs from HBM and pays nothing else.
    CUDA events around each call, as do_bench: GPU time, or host time where that is longer.
    keep_buffer keeps the 256 MB flush buffer for later calls (benchmarks); the tuner,
    which runs inside users' processes, lets it go.
    """
    global _flush_buffer
    flush = _flush_buffer
    if flush is None:
        flush = torch.empty(128 * 2**20, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
        if keep_buffer:
            _flush_buffer = flush
    fn()
    torch.cuda.synchronize()
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for _ in range(5):
        flush.sum()
        fn()
    probe_end.record()
    torch.cuda.synchronize()
    per_call = max(probe_start.elapsed_time(probe_end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / per_call))):
        fn()
    reps = max(5, int(rep_ms / per_call))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def _gpu_ms(fn):
    """Median ms of fn() on the GPU alone, replayed from a CUDA graph, L2 emptied by a read
    before each replay (read_flush_ms: do_bench's zeroing flush charged every candidate of
    a decoding step the same write-back, and the choice among them came out at random).

    Timing direct launches would rank small problems by host time, the same for every
    candidate, and pick at random. Where a launch cannot be captured, direct launches.
    """
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return read_flush_ms(fn)
    ms = read_flush_ms(graph.replay)
    del graph
    return ms


# One timing per candidate ranks near ties by chance: at (1, 32768) the decode benchmark's
# tuner (f5c66d5) chose a launch 4% slower than tune_decode.py's best (e6bc285), and so
# missed 80% of read bandwidth by 1%. The fastest few of the first pass are timed again,
# round-robin so that a drift of clocks or of the machine is shared, and the least of
# each one's re-timed medians decides.
_REFINE_FINALISTS = 4
_REFINE_ROUNDS = 3


def _refine(timings, time_one):
    """The fastest config of timings {config: first-pass ms}: the _REFINE_FINALISTS fastest
    timed again _REFINE_ROUNDS times round-robin, each ranked by the least of those."""
    finalists = sorted(timings, key=timings.get)[:_REFINE_FINALISTS]
    if len(finalists) < 2:
        return finalists[0]
    retimed = {config: [] for config in finalists}
    for _ in range(_REFINE_ROUNDS):
        for config in finalists:
            retimed[config].append(time_one(config))
    return min(finalists, key=lambda config: min(retimed[config]))


class LaunchTuner:
    """Chooses a kernel's launch configuration per problem class, once.

    Each candidate is timed with do_bench on the real launch the first time a class is
    seen, and the fastest few again (_refine); with graph_timing, on a CUDA graph of it (GPU
    time alone), for launches whose host time exceeds the GPU time of the 256 MB L2 flush
    do_bench puts between calls.
    Choices persist in a JSON file per kernel, device and triton version
    ($MODELACCEL_CACHE_DIR, default ~/.cache/modelaccel), so tuning happens once per machine.
    MODELACCEL_TUNING=off times nothing: stored choices, else the first candidate.
    """

    instances = []  # every tuner, for launch_choices()

    def __init__(self, name, graph_timing=False):
        self.name = name
        self.graph_timing = graph_timing
        self.choices = None
        self.path = None
        # key -> settled choice (tuned or stored), so a known class costs one dict lookup:
        # the per-call path below (string key, capture and environment checks) measured
        # tens of microseconds a launch on the GPU machine's host.
        self._settled = {}
        LaunchTuner.instances.append(self)

    def _load(self):
        device = torch.cuda.get_device_name(torch.cuda.current_device()).replace(" ", "-")
        folder = os.environ.get("MODELACCEL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "modelaccel"))
        self.path = os.path.join(folder, f"{self.name}_{device}_triton-{triton.__version__}.json")
        try:
            with open(self.path) as f:
                self.choices = {k: tuple(v) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            self.choices = {}

    def _save(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.choices, f, indent=0)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home only costs re-tuning in the next process
            pass

    def choose(self, key, candidates, launch):
        """The fastest of `candidates` for `key` (a tuple); `launch(config)` runs one."""
        settled = self._settled.get(key)
        if settled is not None and settled in candidates:
            return settled
        if self.choices is None:
            self._load()
        raw_key, key = key, "|".join(map(str, key))
        if (cuda_available() and torch.cuda.is_current_stream_capturing()) \
                or os.environ.get("MODELACCEL_TUNING") == "off":
            # Timing inside a CUDA graph capture would break it: take the stored choice, or
            # the first candidate until an eager call tunes this class. MODELACCEL_TUNING=off
            # does the same everywhere: the GPU tests, where compiling and timing every
            # candidate for every problem class would take most of the run (each launch
            # configuration has its own test instead).
            if self.choices.get(key) in candidates:
                self._settled[raw_key] = self.choices[key]
                return self.choices[key]
            _record(None)  # not settled, so not a launch to replay (record_launches)
            return candidates[0]  # not settled: an eager call may still tune this class
        # A stored choice that is no longer a candidate (a configuration dropped since, say
        # for computing wrong results on some compiler) is tuned again.
        if self.choices.get(key) not in candidates:
            def time_one(config):
                if self.graph_timing:
                    return _gpu_ms(lambda: launch(config))
                return triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)

            self.choices[key] = _unrecorded(lambda: _refine(self._time_candidates(key, candidates, time_one),
                                                            time_one))
            self._save()
        self._settled[raw_key] = self.choices[key]
        return self.choices[key]

    def _time_candidates(self, key, candidates, time_one):
        """{config: ms} of the candidates that build and fit on this GPU."""
        timings = {}
        for config in candidates:
            try:
                timings[config] = time_one(config)
            except triton.runtime.errors.OutOfResources:  # too much shared memory here
                continue
            except CompilationError as exc:
                # A compiler that cannot build one candidate (a Gluon kernel on a triton it
                # was not written for, say) costs that candidate, not the call.
                warnings.warn(f"{self.name}: launch {config} does not compile here and is skipped: "
                              f"{str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else exc!r}")
                continue
        if not timings:
            raise RuntimeError(f"no {self.name} kernel configuration fits this GPU for {key}")
        return timings


# ---------------------------------------------------------------------------------------
# Launching a compiled kernel directly
#
# kernel[grid](*args) binds and specializes every argument, builds a cache key from them and
# looks the compiled kernel up, on every call: 70-100 us for our 40-argument kernels on the
# GPU machine's host (profile_host.py breakdown), for GPU work of 20-200 us in a decoding
# step, a short prefill or a small training layer. launch_kernel keys the compiled kernel
# by what can change its specialization (the constexprs and launch options, each tensor's
# dtype and 16-byte alignment, every other argument's exact value: finer than Triton's own
# key, so a hit is always the kernel Triton would pick) and calls its launcher directly.

def triton_version_between(low, high):
    """Whether the installed triton's (major, minor) lies in [low, high]; False if unreadable."""
    try:
        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return low <= version <= high


@functools.lru_cache(maxsize=None)
def gluon_kernels(name):
    """modelaccel.attention.<name> ("gluon_fwd" or "gluon_bwd"), or None where its Gluon
    kernel is not offered: MODELACCEL_<NAME>=0 (MODELACCEL_GLUON_FWD, MODELACCEL_GLUON_BWD),
    or a triton outside 3.6-3.9 (Gluon is experimental and its API moves between releases:
    the kernels were compiled on 3.6 on the GPU and 3.9 on the CPU box), or one without
    Gluon. Decided once per name."""
    if os.environ.get(f"MODELACCEL_{name.upper()}", "1") == "0" or not triton_version_between((3, 6), (3, 9)):
        return None
    try:
        return importlib.import_module(f".{name}", __package__)
    except ImportError:  # a triton without triton.experimental.gluon
        return None


def _fast_launch_supported():
    # The calling convention of CompiledKernel.run used below was read in triton 3.6 and 3.9.
    if interpreting() or os.environ.get("MODELACCEL_FAST_LAUNCH", "1") == "0":
        return False
    return triton_version_between((3, 6), (3, 9))


_fast_launch = None  # decided on the first launch: interpreting() must be settled by then
_COMPILED_LAUNCHES_MAX = 512  # per kernel; a workload that keeps missing starts afresh


try:  # Gluon's host-side descriptor (attention/gluon_fwd.py), where triton has Gluon
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:
    GluonTensorDescriptor = None
# Triton's and Gluon's host-side tensor descriptors, where this triton has them.
_DESCRIPTOR_TYPES = tuple(t for t in (TensorDescriptor, GluonTensorDescriptor) if t is not None)


_SCALAR_TYPES = frozenset((int, float, bool, type(None)))


def _args_key(args):
    """What of each positional argument can change the compiled kernel. Scalars, most of a
    launch's arguments, are keyed by exact type and value without a call per argument
    (1 and True hash alike; Triton types them apart)."""
    scalar = _SCALAR_TYPES
    return tuple([(type(a), a) if type(a) in scalar else _arg_key(a) for a in args])


def _arg_key(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, _DESCRIPTOR_TYPES):
        # Gluon's descriptors also carry their shared-memory layout.
        base = arg.base
        return (base.dtype, base.data_ptr() % 16 == 0, tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape),
                getattr(arg, "layout", None), getattr(arg, "padding", None))
    return type(arg), arg  # 1 and True hash alike; Triton types them apart


def _no_launch_hooks():
    # Profilers (proton) add launch hooks; those launches keep Triton's own path.
    runtime = triton.knobs.runtime
    return not any(getattr(hook, "calls", hook) for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


class _Recording(threading.local):
    # Per thread: a backward runs on autograd's device thread while another thread may be
    # recording a forward, and one call's notes must not land in another's.
    notes = None  # the list record_launches is filling, else None


_recording = _Recording()


def _record(entry):
    notes = _recording.notes
    if notes is not None:
        notes.append(entry)


def _unrecorded(fn):
    """fn() outside any recording, which notes the call as not settled instead: a tuner's
    timing launches are no part of the call (a replay would repeat every candidate)."""
    outer, _recording.notes = _recording.notes, None
    try:
        return fn()
    finally:
        _recording.notes = outer
        _record(None)


def record_launches(fn):
    """fn()'s result and what it did that a replay must repeat (attention/replay.py), in
    order: ("launch", compiled kernel, constexprs, grid, args) per launch_kernel call on the
    direct path, ("empty", tensor) per empty_buffer, ("zeros", tensor) per zeroed_buffer,
    ("copy", dst, src) per copy_into and
    ("cached", tensor) per cached_buffer; None for a launch on Triton's own path or one
    whose tuner had not settled, so a caller can tell a call it may replay from one it may
    not. Notes are kept per thread."""
    outer, _recording.notes = _recording.notes, []
    try:
        return fn(), _recording.notes
    finally:
        _recording.notes = outer


def empty_buffer(shape, dtype, device):
    """torch.empty for a launcher's output or scratch buffer. Only kernels (and copy_into)
    may write it: a replay allocates it afresh and repeats only those."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    _record(("empty", buffer))
    return buffer


def zeroed_buffer(shape, dtype, device):
    """torch.zeros for a launcher's scratch buffer (counters); a replay zeroes a fresh one."""
    buffer = torch.zeros(shape, dtype=dtype, device=device)
    _record(("zeros", buffer))
    return buffer


def copy_into(dst, src):
    """dst.copy_(src), repeated by a replay; dst and src: tensors of the call (inputs,
    empty_buffer buffers or views of them)."""
    dst.copy_(src)
    _record(("copy", dst, src))
    return dst


def cached_buffer(tensor):
    """A tensor kept for later calls (a host-made table): a replay passes this very tensor."""
    _record(("cached", tensor))
    return tensor


def run_compiled(compiled, grid, device, args, tail):
    """The compiled kernel's launcher on `device`'s current stream, with every parameter in
    signature order: args, then tail (the constexprs of a launch_kernel cache entry, or
    whatever follows a replayed call's tensors)."""
    grid_x, grid_y, grid_z = (tuple(grid) + (1, 1))[:3]
    compiled.run(grid_x, grid_y, grid_z, triton.runtime.driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)


def launch_kernel(kernel, grid, args, kwargs):
    """kernel[grid](*args, **kwargs), the compiled kernel's launcher called directly when
    this signature has launched before (GPU only; MODELACCEL_FAST_LAUNCH=0 turns it off).

    args: the positional arguments (tensors, TensorDescriptors, numbers, None); kwargs: every
    constexpr by name, plus launch options (num_warps, num_stages).
    """
    global _fast_launch
    if _fast_launch is None:
        _fast_launch = _fast_launch_supported()
    if not _fast_launch or not _no_launch_hooks():
        _record(None)
        kernel[grid](*args, **kwargs)
        return
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = (device, tuple(kwargs.items()), _args_key(args))
    cache = kernel.__dict__.setdefault("_modelaccel_launches", {})
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)  # compiles, or finds the compiled kernel, and launches
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        names = kernel.arg_names[len(args):]
        if not all(name in kwargs for name in names) or not hasattr(compiled, "packed_metadata"):
            _record(None)
            return  # not a call this path can repeat: Triton's path every time
        if len(cache) >= _COMPILED_LAUNCHES_MAX:
            cache.clear()
        # The launcher takes every parameter in signature order, constexprs included.
        cache[key] = entry = (compiled, tuple(kwargs[name] for name in names))
        _record(("launch", *entry, grid, args))
        return
    compiled, constexprs = entry
    _record(("launch", compiled, constexprs, grid, args))
    run_compiled(compiled, grid, device, args, constexprs)


def launch_choices():
    """{tuner name: {problem class: chosen launch}} of every tuner that has chosen in this
    process (benchmarks record it next to their numbers)."""
    return {t.name: dict(t.choices) for t in LaunchTuner.instances if t.choices}

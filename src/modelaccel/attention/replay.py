"""Replaying a call's kernel launches on new tensors.

A call that repeats an earlier call's shapes, strides, 16-byte alignment, dtypes, device
and options makes the same launches with the same numbers: only its tensors differ. Our
Python on the way there (checks, tuner lookups, argument lists, descriptors) costs tens of
microseconds a call on the CPU box and several times that on the GPU machine's host,
where short prefill layers, small backward passes and training steps are host-bound.

launch.record_launches notes what a call did; make_plan turns the notes into a Plan, whose
run() allocates the call's buffers afresh and repeats its launches and copies with the new
tensors in the same argument positions. A plan is made only from what can be resolved: every
tensor a launch or copy touched must be an input of the call, a buffer it allocated with
launch.empty_buffer or launch.zeroed_buffer (written only by its kernels and copies), a view of one of those
(descriptor bases and copy sources, matched by data pointer and dtype), or a
launch.cached_buffer table. Anything else (a copy made by .contiguous(), a torch.zeros, a
launch on Triton's own path) makes the call unreplayable, so an unnoticed torch op cannot
be skipped silently.
"""

import torch
import triton

from .launch import _DESCRIPTOR_TYPES, _SCALAR_TYPES, run_compiled

NO_PLAN = ()  # a call that cannot be replayed; falsy, unlike a Plan


class Plan:
    """The launches and copies of one recorded call, over tensor slots: the call's inputs
    first, then the buffers it allocated."""

    __slots__ = ("buffers", "steps", "results", "device")

    def __init__(self, buffers, steps, results, device):
        self.buffers = buffers  # (shape, dtype, zeroed) of each allocated buffer, in order
        self.steps = steps  # ("launch", ...) and ("copy", dst slot, src slot, src view shape)
        self.results = results  # slots of the call's results
        self.device = device  # the device index whose stream the launches go to

    def reads_inputs_in_launches_only(self, n_inputs):
        """Whether the first n_inputs slots reach only launches (their data pointers), never a
        copy (which would read them by shape): then tensors of another layout over the same
        memory, seen through the strides the launches were recorded with, can be the inputs."""
        return all(step[0] != "copy" or step[2] >= n_inputs for step in self.steps)

    def run(self, inputs):
        """The recorded call's results for new `inputs` (same shapes, strides, alignment and
        dtypes as the recorded call's, on the same device)."""
        first = inputs[0]
        tensors = list(inputs)
        for shape, dtype, zeroed in self.buffers:
            # new_empty skips parsing a device: ~1 us a buffer on the CPU box
            tensors.append((first.new_zeros if zeroed else first.new_empty)(shape, dtype=dtype))
        for step in self.steps:
            if step[0] == "copy":
                _, dst, src, src_shape = step
                tensors[dst].copy_(tensors[src].view(src_shape))
                continue
            _, compiled, grid, template, tensor_args, descriptor_args, tail = step
            args = list(template)
            for position, slot in tensor_args:
                args[position] = tensors[slot]
            for position, slot, cls, fields in descriptor_args:
                # Validated when recorded, for the same shapes, strides and alignment: the
                # launcher reads the base's data pointer and the recorded fields only.
                descriptor = object.__new__(cls)
                descriptor.__dict__.update(fields)
                descriptor.base = tensors[slot]
                args[position] = descriptor
            run_compiled(compiled, grid, self.device, args, tail)
        return [tensors[slot] for slot in self.results]


def make_plan(recording, inputs, results):
    """The Plan that replays `recording` (launch.record_launches' notes of a call over
    `inputs`, which returned the tensors `results`) on the current device, where it was
    recorded (callers key plans by it); NO_PLAN where the call cannot be replayed; None
    where it may become replayable (a tuner still timing, no launch yet, or tensors of the
    call that share memory, so their roles are ambiguous)."""
    if not recording or None in recording or not any(entry[0] == "launch" for entry in recording):
        return None
    by_id = {}  # id(tensor) -> slot
    by_memory = {}  # (data pointer, dtype) -> slot, for views of the call's tensors
    buffers = []
    cached = {}

    def add(tensor, slot):
        memory = (tensor.data_ptr(), tensor.dtype)
        if id(tensor) in by_id or memory in by_memory:
            return False
        by_id[id(tensor)] = by_memory[memory] = slot
        return True

    def memory_slot(tensor):
        return by_memory.get((tensor.data_ptr(), tensor.dtype))

    for slot, tensor in enumerate(inputs):
        if not add(tensor, slot):
            return None
    steps = []
    for entry in recording:
        kind = entry[0]
        if kind in ("empty", "zeros"):
            tensor = entry[1]
            if not tensor.is_contiguous() or not add(tensor, len(inputs) + len(buffers)):
                return None
            buffers.append((tuple(tensor.shape), tensor.dtype, kind == "zeros"))
        elif kind == "cached":
            cached[id(entry[1])] = entry[1]
        elif kind == "copy":
            dst, src = entry[1], entry[2]
            dst_slot, src_slot = by_id.get(id(dst)), memory_slot(src)
            if dst_slot is None or src_slot is None or not src.is_contiguous():
                return NO_PLAN
            steps.append(("copy", dst_slot, src_slot, tuple(src.shape)))
        else:
            step = _launch_step(entry, by_id, memory_slot, cached)
            if step is None:
                return NO_PLAN
            steps.append(step)
    result_slots = [by_id.get(id(tensor)) for tensor in results]
    if None in result_slots:
        return NO_PLAN
    return Plan(tuple(buffers), tuple(steps), tuple(result_slots), triton.runtime.driver.active.get_current_device())


def _launch_step(entry, by_id, memory_slot, cached):
    """A launch's step of a Plan, or None where one of its arguments cannot be resolved."""
    _, compiled, constexprs, grid, args = entry
    template = list(args)
    tensor_args, descriptor_args = [], []
    for position, arg in enumerate(args):
        if type(arg) in _SCALAR_TYPES:
            continue
        if isinstance(arg, torch.Tensor):
            slot = by_id.get(id(arg))
            if slot is None:
                if cached.get(id(arg)) is not arg:
                    return None
                continue  # the cached table itself stays in the template
            tensor_args.append((position, slot))
        elif isinstance(arg, _DESCRIPTOR_TYPES):
            slot = memory_slot(arg.base)
            if slot is None:
                return None
            fields = {name: value for name, value in arg.__dict__.items() if name != "base"}
            descriptor_args.append((position, slot, type(arg), fields))
        else:
            return None
        template[position] = None  # no reference to the recorded call's tensors is kept
    return ("launch", compiled, tuple(grid), tuple(template), tuple(tensor_args), tuple(descriptor_args),
            tuple(constexprs))

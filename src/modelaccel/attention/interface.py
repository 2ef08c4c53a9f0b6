"""The public attention entry points, with flash-attn 2.x names and semantics."""

import math
import numbers
import weakref
from typing import Optional

import torch
import triton

from .decode import decode_attention
from .flash_bwd import flash_attn_backward
from .flash_fwd import dropout_keep_mask, flash_attn_forward
from .kv_append import append_kv
from . import launch
from .launch import _SCALAR_TYPES, interpreting, record_launches
from .replay import NO_PLAN, make_plan
from .reference import append_kv_ref, attention_ref, kvcache_attention_ref, varlen_attention_ref

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEADDIM = 256


def _check_qkv(q, k, v, layout, same_batch=True):
    """Raise TypeError/ValueError naming what is wrong with q, k, v.

    layout: "[batch, seqlen, nheads, headdim]" (rank 4) or "[total, nheads, headdim]" (rank 3).
    same_batch: k/v share q's batch dim (not so for a KV cache's rows or pages).
    """
    rank = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash attention supports torch.float16 and torch.bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if rank == 4 and same_batch and k.shape[0] != q.shape[0]:
        raise ValueError(f"batch size of k/v ({k.shape[0]}) differs from q's ({q.shape[0]})")
    nheads, headdim = q.shape[-2], q.shape[-1]
    if k.shape[-1] != headdim:
        raise ValueError(f"head dim of k/v ({k.shape[-1]}) differs from q's ({headdim})")
    if headdim % 8 != 0 or headdim > MAX_HEADDIM or headdim == 0:
        raise ValueError(f"head dim must be a multiple of 8 between 8 and {MAX_HEADDIM}, got {headdim}")
    nheads_k = k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})")


def _is_real(x):
    # float/int first: isinstance against the numbers ABCs costs ~1 us a check, paid per
    # attention call.
    return type(x) in (float, int) or isinstance(x, numbers.Real)


def _check_options(q, batch, dropout_p, softmax_scale, window_size, softcap, alibi_slopes):
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and (not _is_real(softmax_scale) or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all((type(w) is int or isinstance(w, numbers.Integral)) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), got {window_size}")
    if not _is_real(softcap) or softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if alibi_slopes is not None:
        nheads = q.shape[-2]
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError("alibi_slopes must be a torch.Tensor")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")


# Value checks already passed: (context, (id, version) per tensor) -> (weak references,
# result). A model passes the same cu_seqlens / cache_seqlens / block_table to every layer;
# checking them once saves a device-to-host sync per layer (one per decoding step, not one
# per layer). The weak references and torch's version counters catch a new tensor at a
# reused id and in-place edits.
_checked_values = {}


def _version_counter(t):
    # Inference-mode tensors keep no version counter; those are checked on every call.
    try:
        return t._version
    except RuntimeError:
        return None


def _value_check_key(context, tensors):
    """Memo key for a check over `tensors` (None entries allowed), or None if not memoizable."""
    parts = []
    for t in tensors:
        version = None if t is None else _version_counter(t)
        if t is not None and version is None:
            return None
        parts.append(None if t is None else (id(t), version))
    return context, tuple(parts)


def _checked_before(key, tensors):
    """(True, result) when the check under `key` passed for these very tensors."""
    entry = _checked_values.get(key) if key is not None else None
    if entry is not None and all((r is None) if t is None else (r is not None and r() is t)
                                 for r, t in zip(entry[0], tensors)):
        return True, entry[1]
    return False, None


def _remember_check(key, tensors, result=None):
    if key is None:
        return
    if len(_checked_values) > 256:
        _checked_values.clear()
    _checked_values[key] = ([None if t is None else weakref.ref(t) for t in tensors], result)


def _check_cu_seqlens(name, cu_seqlens, total, max_seqlen, device):
    """Validate a cumulative-lengths vector against its packed tensor; returns the batch size.

    Reading the lengths costs one small device-to-host copy (once per tensor and version);
    a wrong vector would otherwise make the kernels read and write other sequences' rows.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, q on {device}")
    if not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be an int >= 0, got {max_seqlen}")
    key = _value_check_key(("cu_seqlens", total, max_seqlen), (cu_seqlens,))
    seen, batch = _checked_before(key, (cu_seqlens,))
    if seen:
        return batch
    values = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but the packed tensor has {total} rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})")
    _remember_check(key, (cu_seqlens,), len(lengths))
    return len(lengths)


def _use_triton(q):
    # On CPU tensors the kernel can only run in the Triton interpreter, which must have been
    # switched on before the kernels were defined (TRITON_INTERPRET=1 at import time).
    return q.is_cuda or interpreting()


def _grad_needed(q, k, v):
    # Training calls take FlashAttnFunc (autograd); inference calls the launcher alone.
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _new_dropout_seed(batch, nheads):
    # From torch's default CPU generator, so torch.manual_seed makes a run reproducible;
    # the kernels add batch * nheads + head to it, which must stay within int32.
    return int(torch.randint(0, 2**31 - 1 - batch * nheads, (1,)).item())


# The dense kernels as PyTorch custom ops, so torch.compile sees one opaque node (no graph
# break) and autograd reaches the backward kernels. Eager calls skip them (the launcher
# directly for inference, FlashAttnFunc for training): the op dispatch costs host time
# that small problems feel.
@torch.library.custom_op("modelaccel::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                       window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
                       dropout_p: float, seed: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward pass; it is an input so that autograd's
    # setup_context sees it.
    return flash_attn_forward(q, k, v, softmax_scale, causal, (window_left, window_right), softcap, alibi_slopes,
                              dropout_p, seed)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
      deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("modelaccel::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, softmax_scale: float, causal: bool, window_left: int, window_right: int,
                       softcap: float, alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                       seed: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, (window_left, window_right), softcap,
                               alibi_slopes, dropout_p, seed, atomic_dq=False if deterministic else None)


@_flash_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
      seed, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attn_setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    alibi_slopes = options[5]
    ctx.save_for_backward(q, k, v, output[0], output[1], alibi_slopes)
    ctx.options = options[:5] + options[6:]
    ctx.mark_non_differentiable(output[1])


def _flash_attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    softmax_scale, causal, window_left, window_right, softcap, dropout_p, seed, deterministic = ctx.options
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
                                    softcap, alibi_slopes, dropout_p, seed, deterministic)
    return dq, dk, dv, *([None] * 9)


_flash_attn_fwd_op.register_autograd(_flash_attn_backward, setup_context=_flash_attn_setup_context)


class FlashAttnFunc(torch.autograd.Function):
    """Eager training path, dense (cu_seqlens None) or varlen: a plain autograd.Function
    costs less host time per call than the custom ops' dispatch (~70 us forward, ~60 us
    backward on a CPU, with the launches stubbed out), which short training steps feel.
    torch.compile traces the custom ops instead. replay_key (_replay_key's, or None): both
    passes replay an earlier call's launches where they repeat it (_replayed)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_size, softcap, alibi_slopes, dropout_p, seed, deterministic, replay_key=None):
        ctx.replay_key = replay_key
        if replay_key is not None:
            out, lse = _replayed(replay_key, (q, k, v), lambda: flash_attn_forward(
                q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p, seed))
        else:
            out, lse = flash_attn_forward(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                          dropout_p, seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
        ctx.options = (softmax_scale, causal, window_size, softcap, dropout_p, seed, max_seqlen_q, max_seqlen_k,
                       deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        (softmax_scale, causal, window_size, softcap, dropout_p, seed, max_seqlen_q, max_seqlen_k,
         deterministic) = ctx.options

        def backward_pass():
            return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap,
                                       alibi_slopes, dropout_p, seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, atomic_dq=False if deterministic else None)

        if ctx.replay_key is not None and type(dout) is torch.Tensor and launch._no_launch_hooks():
            # out and lse are the forward's own buffers: the forward's key fixes their layout.
            key = (ctx.replay_key, deterministic, dout.stride(), dout.dtype, dout.data_ptr() % 16)
            dq, dk, dv = _replayed(key, (dout, q, k, v, out, lse), backward_pass)
        else:
            dq, dk, dv = backward_pass()
        return dq, dk, dv, *([None] * 13)


# Calls that repeat a call already made (same shapes, strides, 16-byte alignment, dtypes,
# device and options) replay its launches (replay.py): the compiled kernels' launchers with
# the new tensors, skipping the checks, the tuners and the argument building (~15 us of our
# Python a forward and ~40 a backward on the CPU box, several times that on the GPU
# machine's host, where a 512-token prefill layer, a small backward pass or a training step
# is host-bound). Dense calls without dropout or ALiBi only: flash_attn_func's inference
# calls, and both passes of its training calls. Calls that cannot be replayed (Triton's own
# launch path, a tensor copied on the way) are marked NO_PLAN and keep the full path.
_plans = {}
_PLANS_MAX = 256
# Recording costs ~13 us a call on the CPU box: a class whose tuner never settles
# (MODELACCEL_TUNING=off without a stored choice) stops being recorded after this many calls.
_PLAN_ATTEMPTS = 3
_plan_attempts = {}


def _replay_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """The replay key of a flash_attn_func call, or None where no plan can apply."""
    if (not launch._fast_launch or alibi_slopes is not None or return_attn_probs or dropout_p != 0
            or type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor
            or not _use_triton(q) or type(window_size) is not tuple or type(softmax_scale) not in _SCALAR_TYPES
            or type(softcap) not in _SCALAR_TYPES or type(causal) not in _SCALAR_TYPES
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
            or torch.compiler.is_compiling() or not launch._no_launch_hooks() or _shared_memory((q, k, v))):
        return None
    return (_tensor_key(q), _tensor_key(k), _tensor_key(v), softmax_scale, causal, window_size, softcap,
            type(dropout_p), triton.runtime.driver.active.get_current_device())


def _tensor_key(t):
    """What of a tensor a replay key fixes (None for an absent one)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)


def _shared_memory(tensors):
    """Whether two of a call's tensors start at one address: a plan made from such a call
    could not tell their roles apart."""
    return len({t.data_ptr() for t in tensors}) < len(tensors)


def _replayed(key, inputs, call):
    """call()'s tensors, from the plan recorded for `key` (which fixes the current device)
    where there is one; else call() itself, recorded so that a later call can replay it."""
    plan = _plans.get(key)
    if plan:
        return plan.run(inputs)
    if plan is NO_PLAN:
        return call()
    results, recording = record_launches(call)
    plan = make_plan(recording, inputs, results)
    if plan is None:  # not settled yet
        _plan_attempts[key] = attempts = _plan_attempts.get(key, 0) + 1
        plan = NO_PLAN if attempts >= _PLAN_ATTEMPTS else None
    if plan is not None:
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
            _plan_attempts.clear()
        _plans[key] = plan
    return results


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Scaled dot-product attention, FlashAttention-2 style (a drop-in for `flash_attn.flash_attn_func`).

    Args:
        q: [batch, seqlen_q, nheads, headdim], fp16 or bf16.
        k, v: [batch, seqlen_k, nheads_k, headdim], same dtype and device; nheads must be a
            multiple of nheads_k (MQA/GQA). headdim: a multiple of 8, at most 256.
            Strided tensors are accepted; a non-contiguous last dim is copied.
        dropout_p: dropout on the attention probabilities (training only). The mask comes
            from Philox numbers seeded from torch's default generator, so torch.manual_seed
            makes it reproducible, and the backward pass regenerates it.
        softmax_scale: default 1 / sqrt(headdim).
        causal: mask aligned to the bottom-right corner: query i sees keys
            j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.
        window_size: (left, right) sliding window around that diagonal, -1 = unbounded.
        softcap: if > 0, scores = softcap * tanh(scores / softcap) before masking.
        alibi_slopes: float32 [nheads] or [batch, nheads]; adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: True: the backward pass uses no atomics, so its gradients are
            bit-identical run to run. False (default): on a GPU it may accumulate dQ with
            float32 atomic adds where that measures faster (last bits vary run to run).
        return_attn_probs: also return the softmax log-sum-exp and, with dropout, the keep
            mask (for testing).
    Returns:
        out [batch, seqlen_q, nheads, headdim] in q's dtype; with return_attn_probs,
        (out, softmax_lse [batch, nheads, seqlen_q] float32, keep mask bool
        [batch, nheads, seqlen_q, seqlen_k] if dropout_p > 0 else None).
        Differentiable in q, k and v. On a GPU, a call without dropout, ALiBi or attention
        probabilities that repeats an earlier call's shapes, strides, alignment, dtypes and
        options replays that call's kernel launches, in the forward and in its backward
        pass, for less host time (MODELACCEL_FAST_LAUNCH=0 turns it off).
    """
    replay_key = _replay_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             return_attn_probs)
    plan = _plans.get(replay_key) if replay_key is not None else None
    if plan:  # a call of this key passed the checks below: they read nothing the key does not fix
        if not _grad_needed(q, k, v):
            return plan.run((q, k, v))[0]
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        return FlashAttnFunc.apply(q, k, v, None, None, None, None, scale, bool(causal), window_size, float(softcap),
                                   None, 0.0, 0, bool(deterministic), replay_key)[0]
    _check_qkv(q, k, v, "[batch, seqlen, nheads, headdim]")
    _check_options(q, q.shape[0], dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    batch, seqlen_q, nheads, _ = q.shape
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dropout_p = float(dropout_p)
    seed = _new_dropout_seed(batch, nheads) if dropout_p > 0 else 0
    options = (float(softmax_scale), bool(causal), tuple(window_size), float(softcap))
    if _use_triton(q):
        scale, causal, (left, right), softcap = options
        if torch.compiler.is_compiling():
            out, lse = _flash_attn_fwd_op(q, k, v, scale, causal, left, right, softcap, alibi_slopes, dropout_p, seed,
                                          bool(deterministic))
        elif _grad_needed(q, k, v):
            out, lse = FlashAttnFunc.apply(q, k, v, None, None, None, None, scale, causal, (left, right), softcap,
                                           alibi_slopes, dropout_p, seed, bool(deterministic), replay_key)
        elif replay_key is None:
            out, lse = flash_attn_forward(q, k, v, scale, causal, (left, right), softcap, alibi_slopes, dropout_p,
                                          seed)
        else:
            out, lse = _replayed(replay_key, (q, k, v), lambda: flash_attn_forward(
                q, k, v, scale, causal, (left, right), softcap, alibi_slopes, dropout_p, seed))
        keep = dropout_keep_mask(batch, nheads, seqlen_q, k.shape[1], dropout_p, seed, q.device) \
            if return_attn_probs and dropout_p > 0 else None
    else:
        # CPU without the interpreter: the reference, differentiable through autograd; its
        # dropout mask comes from torch.rand, not the kernels' Philox stream.
        keep = torch.rand(batch, nheads, seqlen_q, k.shape[1]) >= dropout_p if dropout_p > 0 else None
        out, lse = attention_ref(q, k, v, *options, alibi_slopes, compute_dtype=torch.float32,
                                 dropout_p=dropout_p, dropout_mask=keep)
        out, lse = out.to(q.dtype), lse.detach()
    if return_attn_probs:
        return out, lse, keep
    return out


# Plans of flash_attn_func and flash_attn_with_kvcache calls made through the heads-first
# entry points below (the Transformers integration's), by the heads-first tensors' own
# layout: a repeated inference call skips the transposes and the checks of the other keys.
# On the GPU machine's host (benchmarks/host_attention_call.py) our prefill layer call took
# 61.8 us against SDPA's 30.2 before (c07df93), 30.5 against 39.4 with them (ec0db91, another
# machine); a decoding step's 106 against 41 (e02317a), 69 against 29 (ec0db91).
_heads_first_plans = {}


def _heads_first_key(kind, query, key, value, softmax_scale, causal, window_size, softcap):
    """The key of a heads-first call's plan, or None where none can apply: the three
    tensors' layouts, the options and the current device (what flash_attn_func's and
    flash_attn_with_kvcache's keys fix, read off the heads-first tensors)."""
    if (not launch._fast_launch or type(query) is not torch.Tensor or type(key) is not torch.Tensor
            or type(value) is not torch.Tensor or type(window_size) is not tuple
            or type(softmax_scale) not in _SCALAR_TYPES or type(softcap) not in _SCALAR_TYPES
            or type(causal) not in _SCALAR_TYPES or torch.compiler.is_compiling()):
        return None
    return (kind, query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
            key.dtype, value.dtype, query.data_ptr() % 16, key.data_ptr() % 16, value.data_ptr() % 16, softmax_scale,
            causal, window_size, softcap, triton.runtime.driver.active.get_current_device())


def _adopt_heads_first(plan_key, plan, n_inputs):
    """Keep `plan` (made by the call over the transposes) for heads-first calls of plan_key,
    where its inputs reach launches only."""
    if plan and plan.reads_inputs_in_launches_only(n_inputs):
        if len(_heads_first_plans) >= _PLANS_MAX:
            _heads_first_plans.clear()
        _heads_first_plans[plan_key] = plan


def flash_attn_heads_first(query, key, value, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0):
    """flash_attn_func over heads-first tensors, the layout Transformers' attention functions get.

    Args:
        query: [batch, nheads, seqlen_q, headdim]; key, value: [batch, nheads_k, seqlen_k,
            headdim] (any strides with a unit last one), fp16 or bf16.
        dropout_p, softmax_scale, causal, window_size, softcap: as flash_attn_func's.
    Returns:
        out [batch, seqlen_q, nheads, headdim], as flash_attn_func(query.transpose(1, 2),
        key.transpose(1, 2), value.transpose(1, 2), ...) returns it. An inference call that
        repeats an earlier one's shapes, strides, alignment, dtypes, device and options
        replays its launches straight from these tensors (the kernels read the memory
        through strides fixed by that layout).
    """
    # Training calls (autograd) and dropout are never replayed here: no key to build for them.
    plan_key = None if dropout_p or _grad_needed(query, key, value) else _heads_first_key(
        "dense", query, key, value, softmax_scale, causal, window_size, softcap)
    if plan_key is not None:
        plan = _heads_first_plans.get(plan_key)
        if plan and launch._no_launch_hooks():
            return plan.run((query, key, value))[0]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                          window_size=window_size, softcap=softcap)
    if plan_key is not None:
        _adopt_heads_first(plan_key, _plans.get(_replay_key(q, k, v, 0.0, softmax_scale, causal, window_size, softcap,
                                                            None, False)), 3)
    return out


# int32 [batch] lengths of full caches, by (batch, length, device index): the layers of one
# decoding step share one, so a replayed step launches no fill of its own a layer. Only
# kernels read them; never made or kept while a CUDA graph is being captured.
_full_lengths = {}
_FULL_LENGTHS_MAX = 8


def _full_cache_lengths(batch, length, device):
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (batch, length, device.index)
    lengths = None if capturing else _full_lengths.get(key)
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.int32, device=device)
        if not capturing:
            if len(_full_lengths) >= _FULL_LENGTHS_MAX:
                _full_lengths.clear()
            _full_lengths[key] = lengths
    return lengths


def flash_attn_with_kvcache_heads_first(query, key_cache, value_cache, softmax_scale=None, causal=False,
                                        window_size=(-1, -1), softcap=0.0):
    """A decoding step over full heads-first caches (Transformers' dynamic cache): as
    flash_attn_with_kvcache(query.transpose(1, 2), key_cache.transpose(1, 2),
    value_cache.transpose(1, 2), cache_seqlens=key_cache.shape[2], ...).

    Args:
        query: [batch, nheads, seqlen_q, headdim]; key_cache, value_cache: [batch, nheads_k,
            seqlen_k, headdim], every row filled (any strides with a unit last one), fp16
            or bf16.
        softmax_scale, causal, window_size, softcap: as flash_attn_with_kvcache's.
    Returns:
        out [batch, seqlen_q, nheads, headdim]. A call that repeats an earlier one's shapes,
        strides, alignment, dtypes, device and options (the later layers of a decoding step)
        replays its launches straight from these tensors; with every row full, the lengths
        need no check against the cache.
    """
    batch, length = query.shape[0], key_cache.shape[2]
    plan_key = _heads_first_key("kvcache", query, key_cache, value_cache, softmax_scale, causal, window_size, softcap)
    if plan_key is not None:
        plan = _heads_first_plans.get(plan_key)
        if plan and launch._no_launch_hooks():
            return plan.run((query, key_cache, value_cache, _full_cache_lengths(batch, length, query.device)))[0]
    q, k, v = (t.transpose(1, 2) for t in (query, key_cache, value_cache))
    # An int length: checked on the host, never read back from the GPU; the plan's lengths
    # input is then a full-length int32 [batch] tensor, as _full_cache_lengths makes.
    out = flash_attn_with_kvcache(q, k, v, cache_seqlens=length, softmax_scale=softmax_scale, causal=causal,
                                  window_size=window_size, softcap=softcap)
    if plan_key is not None:
        _adopt_heads_first(plan_key, _plans.get(_kvcache_replay_key(q, k, v, None, None, length, None, None, None,
                                                                    softmax_scale, causal, window_size, softcap, None,
                                                                    0)), 4)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over a packed batch of variable-length sequences (flash-attn's varlen API).

    Args:
        q: [total_q, nheads, headdim]; k, v: [total_k, nheads_k, headdim], fp16 or bf16:
            the sequences of a batch concatenated, no padding.
        cu_seqlens_q, cu_seqlens_k: int32 [batch + 1], where each sequence starts, from 0
            to total; a sequence may be empty.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's length.
        Other arguments as flash_attn_func; masks (causal, window, ALiBi) are aligned to the
        bottom-right corner of each sequence pair, alibi_slopes may be [batch, nheads].
    Returns:
        out [total_q, nheads, headdim]; with return_attn_probs, (out, softmax_lse
        [nheads, total_q] float32, None). Differentiable in q, k and v.
    """
    _check_qkv(q, k, v, "[total, nheads, headdim]")
    batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes "
                         f"({cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1})")
    _check_options(q, batch, dropout_p, softmax_scale, window_size, softcap, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dropout_p = float(dropout_p)
    options = (float(softmax_scale), bool(causal), tuple(window_size), float(softcap))
    if _use_triton(q):
        seed = _new_dropout_seed(batch, q.shape[1]) if dropout_p > 0 else 0
        if _grad_needed(q, k, v):
            out, lse = FlashAttnFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                           int(max_seqlen_k), *options, alibi_slopes, dropout_p, seed,
                                           bool(deterministic))
        else:
            # Inference: the launcher alone; autograd.Function.apply costs host time that the
            # small packed batches of serving feel (benchmarks/results/tuning/profile_varlen_*).
            scale, causal, window, softcap = options
            out, lse = flash_attn_forward(q, k, v, scale, causal, window, softcap, alibi_slopes, dropout_p, seed,
                                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                          max_seqlen_q=int(max_seqlen_q), max_seqlen_k=int(max_seqlen_k))
    else:
        if dropout_p > 0:
            raise NotImplementedError("dropout in flash_attn_varlen_func needs the Triton kernels "
                                      "(a CUDA GPU or TRITON_INTERPRET=1)")
        out, lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *options, alibi_slopes,
                                        compute_dtype=torch.float32)
        out, lse = out.to(q.dtype), lse.detach()
    if return_attn_probs:
        return out, lse, None
    return out


def _int32_vector(name, value, batch, device):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(value).__name__}")
    if value.dtype != torch.int32 or tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must be int32 of shape ({batch},), got {value.dtype} {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, q on {device}")
    return value


def _check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table):
    """Validate everything before the cache is touched; returns cache_seqlens as a tensor.

    Checks that need the values of device tensors (capacity, page indices, cache rows) read
    them to the host, except while a CUDA graph is being captured, where reading is not
    allowed: there the kernels' masks keep every access inside the cache instead.
    """
    _check_qkv(q, k_cache, v_cache, "[batch, seqlen, nheads, headdim]", same_batch=False)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        # Written in place, so it cannot be copied into a layout the kernels take.
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                             f"{tuple(cache.stride())}")
    batch, seqlen_q, nheads, headdim = q.shape
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be int32 [batch={batch}, max_blocks_per_seq]")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device}, q on {q.device}")
        page = k_cache.shape[1]
        if page < 16 or page & (page - 1):
            raise ValueError(f"page size (k_cache.shape[1]) must be a power of two >= 16, got {page}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with a paged cache (block_table)")
    elif k_cache.shape[0] < batch and cache_batch_idx is None:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {batch}")
    if cache_batch_idx is not None:
        _int32_vector("cache_batch_idx", cache_batch_idx, batch, q.device)
    if cache_leftpad is not None:
        _int32_vector("cache_leftpad", cache_leftpad, batch, q.device)
    new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v (new tokens) must be given together")
    if k is not None:
        expected = (batch, k.shape[1] if k.dim() == 4 else -1, k_cache.shape[2], headdim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape) != expected or t.dtype != q.dtype:
                raise ValueError(f"{name} must be {q.dtype} of shape {expected}, got "
                                 f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
        new = k.shape[1]
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary embedding applies to new tokens: pass k and v with rotary_cos/rotary_sin")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos/rotary_sin must share a [seqlen_ro, rotary_dim / 2] shape, got "
                             f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if (2 * rotary_cos.shape[1]) % 16 or 2 * rotary_cos.shape[1] > headdim:
            raise ValueError(f"rotary_dim (2 * {rotary_cos.shape[1]}) must be a multiple of 16 and <= headdim {headdim}")
    return _checked_cache_seqlens(q, k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
                                  k is not None, new)


def _checked_cache_seqlens(q, k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
                           appending, new):
    """cache_seqlens as an int32 [batch] tensor, after the checks of the cache's values
    (_check_cache_values) where this call's values have not passed them before: the part of
    _check_kvcache_inputs a replayed call repeats, since the key fixes everything else."""
    batch, seqlen_q = q.shape[:2]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    lengths = None  # known on the host only when given as an int: then nothing is read back
    if isinstance(cache_seqlens, numbers.Integral):
        lengths = [int(cache_seqlens)] * batch
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    elif cache_seqlens is None:
        lengths = [0 if appending else capacity] * batch
        cache_seqlens = torch.full((batch,), lengths[0], dtype=torch.int32, device=q.device)
    _int32_vector("cache_seqlens", cache_seqlens, batch, q.device)
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return cache_seqlens
    value_tensors = (None if lengths is not None else cache_seqlens, cache_leftpad, cache_batch_idx, block_table)
    key = _value_check_key(("kvcache", new, seqlen_q, capacity, k_cache.shape[0],
                            None if rotary_cos is None else rotary_cos.shape[0],
                            None if lengths is None else lengths[0]), value_tensors)
    if _checked_before(key, value_tensors)[0]:
        return cache_seqlens
    _check_cache_values(lengths, new, seqlen_q, capacity, k_cache, cache_seqlens, cache_leftpad, cache_batch_idx,
                        block_table, rotary_cos)
    _remember_check(key, value_tensors)
    return cache_seqlens


def _check_cache_values(lengths, new, seqlen_q, capacity, k_cache, cache_seqlens, cache_leftpad, cache_batch_idx,
                        block_table, rotary_cos):
    """The checks of _check_kvcache_inputs that read device values to the host."""
    batch = cache_seqlens.shape[0]
    paged = block_table is not None
    if lengths is None:
        lengths = cache_seqlens.tolist()
    if min(lengths) < 0 or max(lengths) + new > capacity:
        raise ValueError(f"cache_seqlens + new tokens must lie in [0, {capacity}] (the cache length), got "
                         f"cache_seqlens {lengths} with {new} new tokens")
    if cache_leftpad is not None:
        pads = cache_leftpad.tolist()
        if any(p < 0 or p > n + new for p, n in zip(pads, lengths)):
            raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens + new tokens], got {pads}")
    if cache_batch_idx is not None:
        rows = cache_batch_idx.tolist()
        if min(rows) < 0 or max(rows) >= k_cache.shape[0]:
            raise ValueError(f"cache_batch_idx must index the {k_cache.shape[0]} cache rows, got {rows}")
    if paged:
        # Only the pages a sequence uses must be real: entries past them may hold anything
        # (serving stacks leave them unset), and the kernels never read through them.
        page = k_cache.shape[1]
        used = torch.tensor([(n + new + page - 1) // page for n in lengths], device=block_table.device)
        pages = block_table[used[:, None] > torch.arange(block_table.shape[1], device=block_table.device)]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table points outside the pool of {k_cache.shape[0]} pages")
    if rotary_cos is not None:
        # Token t of sequence b sits at position cache_seqlens[b] - cache_leftpad[b] + t.
        pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * batch
        last = max(n - p for n, p in zip(lengths, pads)) + max(new, seqlen_q) - 1
        if last >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions; the tokens reach position {last}")


def _kvcache_replay_key(q, k_cache, v_cache, k, rotary_cos, cache_seqlens, cache_batch_idx, cache_leftpad,
                        block_table, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits):
    """The replay key of a flash_attn_with_kvcache call that appends nothing (a decoding step
    over a filled cache), or None where no plan can apply. The inputs of its plan are q,
    k_cache, v_cache, cache_seqlens as a tensor, then whichever of block_table,
    cache_batch_idx and cache_leftpad it has (_kvcache_inputs)."""
    tables = (block_table, cache_batch_idx, cache_leftpad)
    if (not launch._fast_launch or k is not None or rotary_cos is not None or alibi_slopes is not None
            or type(q) is not torch.Tensor or type(k_cache) is not torch.Tensor or type(v_cache) is not torch.Tensor
            or any(t is not None and type(t) is not torch.Tensor for t in tables)
            or type(cache_seqlens) not in (int, torch.Tensor) or not _use_triton(q) or q.stride(-1) != 1
            or type(window_size) is not tuple
            or any(type(x) not in _SCALAR_TYPES for x in (softmax_scale, causal, softcap, num_splits))
            or torch.compiler.is_compiling() or not launch._no_launch_hooks()
            or _shared_memory([t for t in (q, k_cache, v_cache, cache_seqlens, *tables) if type(t) is torch.Tensor])):
        return None
    return ("kvcache", _tensor_key(q), _tensor_key(k_cache), _tensor_key(v_cache),
            type(cache_seqlens) is int or _tensor_key(cache_seqlens), *(_tensor_key(t) for t in tables),
            softmax_scale, causal, window_size, softcap, num_splits, triton.runtime.driver.active.get_current_device())


def _kvcache_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad):
    return (q, k_cache, v_cache, cache_seqlens, *(t for t in (block_table, cache_batch_idx, cache_leftpad)
                                                   if t is not None))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of new queries over a KV cache, appending new keys/values first (flash-attn's
    flash_attn_with_kvcache). Inference only: not differentiable.

    Args:
        q: [batch, seqlen_q, nheads, headdim], fp16/bf16; seqlen_q is 1 for plain decoding,
            more for speculative decoding or chunked prefill.
        k_cache, v_cache: [batch_cache, max_seqlen, nheads_k, headdim], or paged
            [num_blocks, page_size, nheads_k, headdim] with block_table int32
            [batch, max_blocks_per_seq] (page_size a power of two >= 16).
        k, v: optional new tokens [batch, seqlen_new, nheads_k, headdim], written into the
            cache in place at cache_seqlens before attending.
        rotary_cos, rotary_sin: [seqlen_ro, rotary_dim / 2]; with k/v, rotary embedding is
            applied to q and the new k at their positions (cache_seqlens - cache_leftpad + t;
            without causal/window every query row takes the first new position).
        cache_seqlens: int or int32 [batch], tokens already in the cache per sequence.
        cache_batch_idx: int32 [batch], the cache row of each sequence (contiguous cache).
        cache_leftpad: int32 [batch], where each sequence starts in its cache row.
        num_splits: how many parts the cache is split into; 0 chooses from batch, heads,
            cache length and the SM count.
        Other arguments as flash_attn_func (masks aligned bottom-right per sequence).
    Returns:
        out [batch, seqlen_q, nheads, headdim]; with return_softmax_lse also lse
        [batch, nheads, seqlen_q] float32. On a GPU, a call that appends nothing and repeats
        an earlier call's shapes, strides, alignment, dtypes and options replays that call's
        kernel launches, for less host time; the checks of the cache's values still run.
    """
    replay_key = _kvcache_replay_key(q, k_cache, v_cache, k, rotary_cos, cache_seqlens, cache_batch_idx,
                                     cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                                     alibi_slopes, num_splits)
    plan = _plans.get(replay_key) if replay_key is not None else None
    if plan:  # a call of this key passed the checks that read no device values
        cache_seqlens = _checked_cache_seqlens(q, k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                                               None, False, 0)
        out, lse = plan.run(_kvcache_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx,
                                            cache_leftpad))
        return (out, lse) if return_softmax_lse else out
    cache_seqlens = _check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                          cache_batch_idx, cache_leftpad, block_table)
    _check_options(q, q.shape[0], 0.0, softmax_scale, window_size, softcap, alibi_slopes)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    batch, seqlen_q = q.shape[:2]
    if k is not None:
        # Query row t takes rotary position start + t under a causal or window mask, else start.
        q_steps = bool(causal) or tuple(window_size) != (-1, -1)
        append = append_kv if _use_triton(q) else append_kv_ref
        q = append(_last_dim_contiguous(q), k_cache, v_cache, _last_dim_contiguous(k), _last_dim_contiguous(v),
                   cache_seqlens, rotary_cos, rotary_sin, rotary_interleaved, q_steps, cache_leftpad,
                   cache_batch_idx, block_table)
        cache_seqlens = cache_seqlens + k.shape[1]
    options = dict(causal=bool(causal), window_size=tuple(window_size), softcap=float(softcap),
                   alibi_slopes=alibi_slopes, block_table=block_table, cache_batch_idx=cache_batch_idx,
                   cache_leftpad=cache_leftpad)
    q = _last_dim_contiguous(q)
    if _use_triton(q) and replay_key is not None:
        inputs = _kvcache_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad)
        out, lse = _replayed(replay_key, inputs, lambda: decode_attention(
            q, k_cache, v_cache, cache_seqlens, float(softmax_scale), num_splits=num_splits, **options))
    elif _use_triton(q):
        out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, float(softmax_scale), num_splits=num_splits,
                                    **options)
    else:
        out, lse = kvcache_attention_ref(q, k_cache, v_cache, cache_seqlens, float(softmax_scale),
                                         compute_dtype=torch.float32, **options)
        out = out.to(q.dtype)
    return (out, lse) if return_softmax_lse else out

"""Comparison helpers shared by the test suite, the GPU checks and the CLI self-check."""

import math

import torch

from .attention.replay import NO_PLAN

# Bounds for fp16/bf16 attention against a float64 (or float32) reference. The kernel rounds
# the softmax probabilities to the input dtype before the second matmul and rounds the
# output once more; bf16 keeps 8 mantissa bits, fp16 11.
ATTENTION_TOLERANCE = {
    torch.float16: {"rel": 3e-3, "abs": 1e-2},
    torch.bfloat16: {"rel": 2e-2, "abs": 6e-2},
}
LSE_ABS_TOLERANCE = 1e-3


def random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, device, seed=0):
    """Fresh normal q [batch, seqlen_q, nheads, headdim] and k, v [batch, seqlen_k, nheads_k,
    headdim], drawn on the CPU from `seed` so every device gets the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seqlen_q, nheads, headdim), (batch, seqlen_k, nheads_k, headdim),
              (batch, seqlen_k, nheads_k, headdim)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def count_calls(monkeypatch, module, name):
    """Replace module.<name> by a pass-through that counts its calls; returns the list that
    gets one entry per call."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def fresh_replays(monkeypatch, tuner):
    """For GPU tests of replays: `tuner` (a LaunchTuner) settles each class on its first
    candidate, as a tuned class is (MODELACCEL_TUNING=off alone leaves classes unsettled,
    and those are not replayed); no replay plans exist yet. Returns a list that gets one
    entry per replayed call (Plan.run)."""
    from .attention import interface, replay

    choose = tuner.choose
    monkeypatch.setattr(tuner, "_settled", dict(tuner._settled))

    def settled_on_first(key, candidates, launch):
        tuner._settled.setdefault(key, candidates[0])
        return choose(key, candidates, launch)
    monkeypatch.setattr(tuner, "choose", settled_on_first)
    monkeypatch.setattr(interface, "_plans", {})
    monkeypatch.setattr(interface, "_plan_attempts", {})
    monkeypatch.setattr(interface, "_heads_first_plans", {})
    return count_calls(monkeypatch, replay.Plan, "run")


def route_tuner_to(monkeypatch, tuner, candidate, module, launcher):
    """Make `tuner` (a LaunchTuner) choose `candidate` for every class that offers it, and
    count the calls of module.<launcher> (the candidate's kernel launcher). Returns (offered,
    ran): lists that fill with the routed problem classes and one entry per launcher call,
    for tests of a tuned dispatch."""
    offered = []
    choose = tuner.choose

    def choose_candidate(key, candidates, launch):
        if candidate in candidates:
            offered.append(key)
            return candidate
        return choose(key, candidates, launch)

    monkeypatch.setattr(tuner, "choose", choose_candidate)
    return offered, count_calls(monkeypatch, module, launcher)


def attention_errors(out, lse, ref_out, ref_lse):
    """Errors of (out, lse) against a reference; compares in float64 on out's device.

    Returns a dict: rel (||out - ref|| / ||ref||), abs (max |out - ref|), lse_abs (max error
    over rows that see keys), nonfinite (count of NaN/inf in out), lse_inf_mismatch (rows
    whose +inf/finite status differs).
    """
    o = out.double()
    r = ref_out.to(o.device).double()
    rl = ref_lse.to(o.device).double()
    errors = {
        "rel": ((o - r).norm() / r.norm().clamp_min(1e-30)).item(),
        "abs": (o - r).abs().max().item() if o.numel() else 0.0,
        "nonfinite": int((~torch.isfinite(o)).sum().item()),
        "lse_abs": 0.0,
        "lse_inf_mismatch": 0,
    }
    if lse is not None:
        l = lse.double()
        finite = torch.isfinite(rl)
        if finite.any():
            errors["lse_abs"] = (l[finite] - rl[finite]).abs().max().item()
        errors["lse_inf_mismatch"] = int((torch.isposinf(l) != torch.isposinf(rl)).sum().item()
                                         + torch.isnan(l).sum().item())
    return errors


def assert_attention_close(out, lse, ref_out, ref_lse, dtype):
    """Raise AssertionError (with the numbers) unless out/lse match the reference for `dtype`."""
    errors = attention_errors(out, lse, ref_out, ref_lse)
    tol = ATTENTION_TOLERANCE[dtype]
    ok = (errors["nonfinite"] == 0 and errors["lse_inf_mismatch"] == 0
          and errors["rel"] <= tol["rel"] and errors["abs"] <= tol["abs"]
          and errors["lse_abs"] <= LSE_ABS_TOLERANCE)
    assert ok, f"attention mismatch for {dtype}: {errors} (tolerance {tol}, lse {LSE_ABS_TOLERANCE})"
    return errors


def assert_grads_close(grads, ref_grads, dtype, names=("dq", "dk", "dv")):
    """Raise AssertionError unless each gradient is finite and matches its reference within
    the attention tolerance for `dtype`: relative norm error, or, for a gradient that is
    zero up to rounding (a one-key window makes dq vanish), max absolute error."""
    tol = ATTENTION_TOLERANCE[dtype]
    report = {}
    for name, g, r in zip(names, grads, ref_grads):
        g64, r64 = g.double(), r.to(g.device).double()
        rel = ((g64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()
        abs_err = (g64 - r64).abs().max().item() if g64.numel() else 0.0
        report[name] = {"rel": rel, "abs": abs_err}
        assert torch.isfinite(g64).all(), f"{name} has NaN/inf entries"
        assert rel <= tol["rel"] or abs_err <= tol["abs"] * 0.1, \
            f"{name} mismatch for {dtype}: {report[name]} (tolerance {tol}; all: {report})"
    return report


def random_kv_cache(batch, capacity, nheads_k, headdim, dtype, device, gen, page_size=None):
    """Random k/v caches [batch, capacity, nheads_k, headdim] and no block table; with
    page_size, the same contents in a shuffled page pool [pages, page_size, nheads_k,
    headdim] and its int32 block table [batch, pages per sequence]."""
    k = torch.randn(batch, capacity, nheads_k, headdim, generator=gen).to(device, dtype)
    v = torch.randn(batch, capacity, nheads_k, headdim, generator=gen).to(device, dtype)
    if page_size is None:
        return k, v, None
    pages = math.ceil(capacity / page_size)
    table = torch.randperm(batch * pages, generator=gen).view(batch, pages).to(device, torch.int32)
    return to_paged(k, table, page_size), to_paged(v, table, page_size), table


def to_paged(cache, block_table, page_size):
    """Copy a contiguous cache [batch, cache_len, nheads_k, headdim] into pages
    [num_blocks, page_size, nheads_k, headdim] (num_blocks = block_table.numel()) so that
    logical page j of sequence b is physical page block_table[b, j]. If cache_len is not a
    whole number of pages, the last page's tail is filled with random values (never read
    when cache_seqlens <= cache_len)."""
    batch, cache_len, nheads_k, headdim = cache.shape
    blocks_per_seq = block_table.shape[1]
    padded_len = blocks_per_seq * page_size
    if block_table.shape[0] != batch or padded_len < cache_len:
        raise ValueError(f"block table {tuple(block_table.shape)} with pages of {page_size} cannot hold a cache "
                         f"of {tuple(cache.shape)}")
    if padded_len > cache_len:
        tail = torch.randn(batch, padded_len - cache_len, nheads_k, headdim, device=cache.device, dtype=cache.dtype)
        cache = torch.cat([cache, tail], dim=1)
    pages = torch.empty(block_table.numel(), page_size, nheads_k, headdim, device=cache.device, dtype=cache.dtype)
    pages[block_table.reshape(-1).long().to(cache.device)] = cache.reshape(batch * blocks_per_seq, page_size,
                                                                           nheads_k, headdim)
    return pages


class FakeCompiled:
    """Stands in for a compiled Triton kernel: its launcher logs ("direct", args) and calls
    on_launch(args) if given."""

    function = "function handle"
    packed_metadata = "packed metadata"

    def __init__(self, log, on_launch=None):
        self.log = log
        self.on_launch = on_launch

    def run(self, *args):
        self.log.append(("direct", args))
        if self.on_launch is not None:
            self.on_launch(args)


class FakeKernel:
    """Stands in for a JITFunction with these parameter names, for tests of the direct launch
    path (launch.launch_kernel) and of replays built on it: kernel[grid](*args, **kwargs)
    'compiles' (counted), logs ("triton", grid, args, kwargs), calls on_launch(args) if
    given (a stand-in for what the kernel writes) and returns a FakeCompiled logging into
    the same list (`log`: one list several fakes share, for their launches in order)."""

    def __init__(self, arg_names, on_launch=None, log=None):
        self.arg_names = list(arg_names)
        self.log = [] if log is None else log
        self.compiles = 0
        self.on_launch = on_launch

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            self.log.append(("triton", grid, args, kwargs))
            if self.on_launch is not None:
                self.on_launch(args)
            return FakeCompiled(self.log, self.on_launch)
        return run


class NoPlans(dict):
    """A replay plan table (attention.interface._plans) that marks every call as not
    replayable, so calls take the full path (tests, benchmarks)."""

    def get(self, key, default=None):
        return NO_PLAN


def assert_greedy_agrees(ref, got_sequences, prompt_len, near_tie):
    """Greedy generations that may part only at a near tie: `ref` is the reference model's
    generate output (return_dict_in_generate, output_scores), got_sequences [batch,
    prompt_len + new] the tested model's tokens. Each row has the same tokens, or its first
    differing one is where the reference's own top-1 logit led its top-2 by less than
    near_tie (after it the two continue different texts)."""
    assert got_sequences.shape == ref.sequences.shape
    for row in range(ref.sequences.shape[0]):
        differ = (ref.sequences[row, prompt_len:] != got_sequences[row, prompt_len:]).nonzero()
        if differ.numel() == 0:
            continue
        step = differ[0].item()
        top2 = ref.scores[step][row].float().topk(2).values
        margin = (top2[0] - top2[1]).item()
        assert margin < near_tie, (f"row {row} differs at new token {step}, where the reference's top-1 leads "
                                   f"top-2 by {margin:.3f} (not a near tie)")

"""Hugging Face Transformers benchmark: a Llama-3-8B-shaped model with each attention.

The model has Llama-3-8B's shape (`LLAMA3_8B`: 32 layers, hidden 4096, 32 query heads over 8
KV heads, head dim 128, vocabulary 128256) with random bf16 weights, built directly on the
GPU (no fp32 CPU copy). One model is built; its attention implementation is switched
between the providers ("modelaccel", "sdpa", "eager"), so every provider runs the same
weights on the same inputs.

Two measurements:

- Time to first token (TTFT): one forward over the prompt producing the first token, i.e.
  `model(ids, logits_to_keep=1).logits[:, -1].argmax(-1)`, the prefill `generate` does
  (it also keeps only the last position's logits and builds the KV cache). Prompts of 512,
  2048 and 8192 tokens at batch 1 and 8.
- Training step: forward with labels + backward (parameter gradients only, no optimizer,
  no gradient checkpointing), sequence 4096, batch 1. If modelaccel or SDPA cannot fit the
  full 32-layer model with its gradients and activations, the step is measured on a model
  with fewer layers (`TRAIN_FALLBACK_LAYERS`), and the result says so.

Times are medians of CUDA-event timings after untimed warm-up calls. modelaccel and SDPA, the
pair the targets compare, are timed in interleaved rounds of their own (`time_rounds`), each
row's ratio with a bootstrap 95% interval; eager, far behind where it fits, is timed after them
with a shorter budget, so no call of the pair follows one of eager's. A
provider that runs out of memory gets no number and its reason (eager attention
materializes the scores and runs out at long prompts); memory is freed between rows.
Before timing, each provider's last-position logits are compared with SDPA's (relative
error, a sanity check: random weights, bf16).

Also, with no target (issue 5 sets none; users of `generate` still see it): greedy
`generate` of GENERATE_NEW_TOKENS tokens after a GENERATE_PROMPT-token prompt at batch 1,
with the dynamic and the static cache, timed as generate(1 + n tokens) - generate(1 token)
over n: the time of a decoding step, prefill left out. How many of each provider's tokens
equal SDPA's is recorded (random bf16 weights: a close logit may flip a greedy choice).

Targets (issue 5): modelaccel's time <= SDPA's at every size, and < SDPA's at >= 2048
tokens, for TTFT and the training step. A target without both numbers fails.

Without a GPU, `python -m modelaccel.bench.transformers_bench` (in a process started with
TRITON_INTERPRET=1) runs a tiny CPU smoke test of the same code paths instead.
"""

import gc
import os
import random
import statistics
import sys
import time

import torch

from . import report

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
PROVIDERS = ("modelaccel", "sdpa", "eager")
BASELINE = "sdpa"
DTYPE = torch.bfloat16

PROMPT_LENS = (512, 2048, 8192)
BATCHES = (1, 8)
TRAIN_SEQLEN = 4096
TRAIN_BATCH = 1
TRAIN_FALLBACK_LAYERS = 8
# generate rows (no target): prompt tokens, decoding steps timed, caches.
GENERATE_PROMPT = 512
GENERATE_NEW_TOKENS = 32
GENERATE_CACHES = ("dynamic", "static")
# suite -> (TTFT (batch, prompt) rows, training layer counts to try in order)
SUITES = {
    "default": ([(b, n) for b in BATCHES for n in PROMPT_LENS], (LLAMA3_8B["num_hidden_layers"], TRAIN_FALLBACK_LAYERS)),
    "quick": ([(1, 512)], (2,)),
}

# Targets: not slower than SDPA everywhere, faster from this many tokens on.
TARGET_BETTER_FROM = 2048

# Timing: WARMUP_CALLS untimed calls, then at least MIN_REPS timed ones, more while the
# timed total stays under BUDGET_MS, at most MAX_REPS; the median counts. The batch-8 rows
# and the training step run at the H200's power cap, where one call moves by +-1% against
# the next (benchmarks/clock_probe.py), more than the 0.5% the attention kernels make: the
# compared pair gets 15 s of calls a row (~30 of the 2048-token batch-8 prefill, 400 of the
# host-bound 512-token batch-1 one), eager CONTEXT_BUDGET_MS. Timed in one set of rounds
# with the pair, eager preceded modelaccel's calls twice as often as SDPA's.
COMPARED = ("modelaccel", BASELINE)
WARMUP_CALLS = 1
MIN_REPS = 3
MAX_REPS = 400
BUDGET_MS = 15000.0
CONTEXT_BUDGET_MS = 2000.0
# generate rows (no target) time two generate calls per provider and cache
GENERATE_BUDGET_MS = 6000.0
CI_RESAMPLES = 2000
SEED = 0
# Above this relative error of the last-position logits against SDPA's, a modelaccel row
# counts as a mismatch (bf16 noise through 32 random layers is far below it).
CHECK_REL_ERR = 0.1

DEVICE = "cuda"


# ---------------------------------------------------------------------------------------
# Model


def llama_config(num_layers=None, **overrides):
    """The Llama-3-8B-shaped LlamaConfig, optionally with fewer layers or other overrides."""
    from transformers import LlamaConfig

    kwargs = dict(LLAMA3_8B, **overrides)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    return LlamaConfig(**kwargs)


def build_model(config, device=None, dtype=DTYPE, seed=SEED):
    """A LlamaForCausalLM with random weights, created directly on `device` in `dtype`
    (an 8B model never exists in fp32 or on the CPU). Registers attn_implementation="modelaccel"."""
    import transformers

    import modelaccel.integrations.transformers  # noqa: F401  (registers "modelaccel")

    device = device or DEVICE
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
        except TypeError:  # a Transformers whose _from_config takes no dtype: the default dtype decides
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                model = transformers.LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
    return model.to(dtype)


def set_attention(model, provider):
    """Switch the model's attention implementation in place (same weights). Uses
    `set_attn_implementation` where Transformers has it, else sets the config attribute the
    attention layers and mask functions read at call time."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(provider)
    else:
        model.config._attn_implementation = provider
    if model.config._attn_implementation != provider:
        raise RuntimeError(f"could not switch attention to {provider!r} "
                           f"(model reports {model.config._attn_implementation!r})")


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Timing and memory


def cuda_clock(fn):
    """ms of one fn() between CUDA events, waited for."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def wall_clock(fn):
    """ms of one fn() by wall clock: the CPU smoke run's clock (numbers mean nothing there)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_rounds(calls, clock=cuda_clock, warmup=WARMUP_CALLS, min_reps=MIN_REPS, max_reps=MAX_REPS,
                budget_ms=BUDGET_MS):
    """Time several providers' calls in rounds: each round times one call of every provider
    still running, in turn, so a drift of the GPU's clocks or of the host's load between
    rounds falls on every provider alike (timed one provider after the other, the same
    model's TTFT moved by 1-2% between runs: more than the differences measured). Each round
    starts one provider further on, so none always follows the same one.

    calls: {name: (switch, fn)}; switch() makes the model use that provider, fn() is the
    call. After `warmup` untimed calls each, a provider takes part until it has min_reps
    timings and either max_reps or budget_ms of timed calls. Returns ({name: [ms of each
    timed call]}, {name: exception}) for the providers whose calls raised."""
    times = {name: [] for name in calls}
    errors = {}

    def call(name, timed):
        switch, fn = calls[name]
        try:
            switch()
            if timed:
                times[name].append(clock(fn))
            else:
                fn()
        except Exception as exc:  # noqa: BLE001 - an OOM or a failing provider costs its number, never the run
            errors[name] = exc
            times.pop(name)

    for name in list(calls):
        for _ in range(warmup):
            if name in times:
                call(name, timed=False)

    def running(name):
        t = times[name]
        return len(t) < min_reps or (len(t) < max_reps and sum(t) < budget_ms)

    names = list(calls)
    turn = 0
    while any(running(name) for name in times):
        # Each round starts one provider further on: the GPU runs these rows at its power
        # cap (~690 W, SM clock 1600-1700 MHz on the H200, benchmarks/clock_probe.py), so a
        # call's clock depends on what ran before it, and no provider keeps one place.
        for name in [n for n in names[turn:] + names[:turn] if n in times and running(n)]:
            call(name, timed=True)
        turn = (turn + 1) % len(names)
    return times, errors


def ratio_interval(times, provider="modelaccel", baseline=BASELINE, resamples=CI_RESAMPLES, seed=SEED):
    """95% percentile-bootstrap interval [low, high] of median(provider's calls) over
    median(baseline's), each provider's calls resampled on their own; None with fewer than
    3 calls of either. times: {name: [ms of each call]}."""
    mine, theirs = times.get(provider), times.get(baseline)
    if not mine or not theirs or min(len(mine), len(theirs)) < 3:
        return None
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(mine, k=len(mine)))
                    / statistics.median(rng.choices(theirs, k=len(theirs))) for _ in range(resamples))
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def _oom_types():
    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(types)


def is_oom(exc):
    """Whether exc is an out-of-memory error (PyTorch's, or a kernel launch failing for memory)."""
    return isinstance(exc, _oom_types()) or "out of memory" in str(exc).lower()


def _first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def failure_reason(exc):
    """One line for the results: "OOM: ..." for out-of-memory, else "<Type>: ..."."""
    return ("OOM: " if is_oom(exc) else f"{type(exc).__name__}: ") + _first_line(exc)[:300]


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device):
    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------
# Rows


def make_ids(batch, seqlen, vocab_size, device=None, seed=SEED):
    gen = torch.Generator().manual_seed(seed + 1000 * batch + seqlen)
    return torch.randint(0, vocab_size, (batch, seqlen), generator=gen).to(device or DEVICE)


def _empty_row(kind, batch, seqlen, layers, providers):
    return {"kind": kind, "batch": batch, "seqlen": seqlen, "tokens": batch * seqlen, "layers": layers,
            "ms": {p: None for p in providers}, "reps": {p: None for p in providers}, "times_ms": {},
            "peak_gib": {p: None for p in providers}, "errors": {},
            "check": {p: None for p in providers if p != BASELINE}}


def _first_call(row, model, provider, run_once, device, log):
    """Switch to `provider` and run run_once() untimed (compiles and tunes; its output is
    returned for the check, its peak memory recorded). A failure (OOM or other) goes to
    row["errors"] and returns None."""
    try:
        set_attention(model, provider)
        free_memory()
        _reset_peak(device)
        out = run_once()
        row["peak_gib"][provider] = _peak_gib(device)
        return out
    except Exception as e:  # noqa: BLE001 - an OOM or a failing provider costs its number, never the run
        row["errors"][provider] = failure_reason(e)
        log(f"  {provider}: {row['errors'][provider]}")
        free_memory()
        return None


def _time_providers(row, model, providers, run_once, clock, timing, log):
    """Time run_once() for `providers` into row["ms"] (median), row["reps"] and
    row["times_ms"] (every call): the COMPARED pair in interleaved rounds of its own
    (time_rounds, with `timing`'s settings), then the others in theirs with
    CONTEXT_BUDGET_MS (or timing's "context_budget_ms"). Failures go to row["errors"]."""
    timing = dict(timing or {})
    context_budget = timing.pop("context_budget_ms", CONTEXT_BUDGET_MS)
    context = dict(timing, budget_ms=context_budget)
    samples, errors = {}, {}
    for group, settings in (([p for p in providers if p in COMPARED], timing),
                            ([p for p in providers if p not in COMPARED], context)):
        if group:
            calls = {p: ((lambda p=p: set_attention(model, p)), run_once) for p in group}
            got, failed = time_rounds(calls, clock, **settings)
            samples.update(got)
            errors.update(failed)
    for p, times in samples.items():
        row["ms"][p], row["reps"][p] = statistics.median(times), len(times)
        row["times_ms"][p] = [round(t, 4) for t in times]
    for p, exc in errors.items():
        row["errors"][p] = failure_reason(exc)
        log(f"  {p}: {row['errors'][p]}")
    free_memory()


def _fill_checks(row, outputs, providers):
    ref = outputs.get(BASELINE)
    for p in providers:
        if p == BASELINE:
            continue
        if ref is None or outputs.get(p) is None:
            row["check"][p] = None
        else:
            err = rel_err(outputs[p], ref)
            row["check"][p] = {"rel_err": err, "status": "ok" if err <= CHECK_REL_ERR else "mismatch"}


def prefill_logits(model, ids):
    """The TTFT call: one forward over the prompt, logits of the last position only (as
    generate's prefill) -> [batch, 1, vocab]."""
    with torch.inference_mode():
        return model(input_ids=ids, logits_to_keep=1).logits


def training_loss(model, ids):
    """The training step's forward: parameter grads cleared, the language-model loss of ids
    as their own labels (the caller runs its backward)."""
    model.zero_grad(set_to_none=True)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def run_ttft_row(model, batch, seqlen, providers=PROVIDERS, clock=cuda_clock, device=None, log=print, timing=None):
    """TTFT of one (batch, prompt length) for every provider on the same ids; see the module doc.
    clock(fn) gives one call's ms (cuda_clock; wall_clock or a stub without a GPU); timing:
    time_rounds' keyword arguments (warmup, min_reps, ...) where the defaults do not fit."""
    device = device or DEVICE
    row = _empty_row("ttft", batch, seqlen, model.config.num_hidden_layers, providers)
    ids = make_ids(batch, seqlen, model.config.vocab_size, device)
    outputs = {}

    def prefill():
        logits = prefill_logits(model, ids)[:, -1]
        return logits, logits.argmax(-1)

    for provider in providers:
        out = _first_call(row, model, provider, prefill, device, log)
        if out is not None:
            outputs[provider] = out[0].float().cpu()
        del out
    _time_providers(row, model, list(outputs), prefill, clock, timing, log)
    _fill_checks(row, outputs, providers)
    row["first_tokens"] = {p: o.argmax(-1).tolist() for p, o in outputs.items()}
    del ids
    free_memory()
    return row


def run_generate_row(model, cache="dynamic", batch=1, prompt=GENERATE_PROMPT, new_tokens=GENERATE_NEW_TOKENS,
                     providers=PROVIDERS, clock=cuda_clock, device=None, log=print, timing=None):
    """Greedy generate's decoding step for every provider (see the module doc): row["ms"] is
    ms per decoding step, (generate(1 + new_tokens) - generate(1)) / new_tokens, from the
    medians of both timed as run_ttft_row times; row["generate_ms"] has both medians and
    row["tokens_match_sdpa"] how many of the 1 + new_tokens generated tokens equal SDPA's."""
    device = device or DEVICE
    row = _empty_row("generate", batch, prompt, model.config.num_hidden_layers, providers)
    row.update(cache=cache, new_tokens=new_tokens, generate_ms={}, tokens_match_sdpa={})
    del row["check"], row["times_ms"]
    ids = make_ids(batch, prompt, model.config.vocab_size, device)
    options = {} if cache == "dynamic" else {"cache_implementation": cache}

    def generate(n):
        def run():
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, **options)[:, prompt:]
        return run

    tokens = {}
    for provider in providers:
        out = _first_call(row, model, provider, generate(1 + new_tokens), device, log)
        if out is not None:
            tokens[provider] = out.cpu()
    medians = {}
    for n in (1, 1 + new_tokens):
        timed = _empty_row("generate", batch, prompt, row["layers"], providers)
        _time_providers(timed, model, list(tokens), generate(n), clock, dict({"budget_ms": GENERATE_BUDGET_MS},
                                                                              **(timing or {})), log)
        row["errors"].update(timed["errors"])
        for p, ms in timed["ms"].items():
            if ms is not None:
                medians.setdefault(p, {})[n] = ms
    for p, by_n in medians.items():
        row["generate_ms"][p] = {str(n): ms for n, ms in by_n.items()}
        if len(by_n) == 2 and p not in row["errors"]:
            row["ms"][p] = (by_n[1 + new_tokens] - by_n[1]) / new_tokens
    ref = tokens.get(BASELINE)
    for p, t in tokens.items():
        row["tokens_match_sdpa"][p] = None if ref is None else int((t == ref).all(0).sum())
    del ids
    free_memory()
    return row


def run_train_row(model, seqlen=TRAIN_SEQLEN, batch=TRAIN_BATCH, providers=PROVIDERS, clock=cuda_clock, device=None,
                  log=print, timing=None):
    """Training step (forward with labels + backward into parameter grads) of every provider,
    timed as run_ttft_row times."""
    device = device or DEVICE
    row = _empty_row("train", batch, seqlen, model.config.num_hidden_layers, providers)
    ids = make_ids(batch, seqlen, model.config.vocab_size, device)
    model.train()
    model.requires_grad_(True)
    outputs = {}

    def step():
        loss = training_loss(model, ids)
        loss.backward()
        return loss.detach()

    for provider in providers:
        loss = _first_call(row, model, provider, step, device, log)
        if loss is not None:
            outputs[provider] = loss.float().cpu().reshape(1)
        del loss
        model.zero_grad(set_to_none=True)
    _time_providers(row, model, list(outputs), step, clock, timing, log)
    model.zero_grad(set_to_none=True)
    row["loss"] = {p: o.item() for p, o in outputs.items()}
    _fill_checks(row, outputs, providers)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.eval()
    del ids
    free_memory()
    return row


# ---------------------------------------------------------------------------------------
# Targets


def ratio(row, provider="modelaccel", baseline=BASELINE):
    """provider's time over baseline's (below 1: provider is faster); None without both."""
    mine, theirs = row["ms"].get(provider), row["ms"].get(baseline)
    return mine / theirs if mine and theirs else None


def evaluate_target(row):
    """{"rule", "value", "pass", "detail"}: modelaccel/SDPA time <= 1 on every row, < 1 on rows
    with seqlen >= TARGET_BETTER_FROM. No number is a fail."""
    strict = row["seqlen"] >= TARGET_BETTER_FROM
    rule = "faster than sdpa" if strict else "not slower than sdpa"
    r = ratio(row)
    if r is None:
        missing = [p for p in ("modelaccel", BASELINE) if row["ms"].get(p) is None]
        return {"rule": rule, "value": None, "pass": False, "detail": "no number for " + ", ".join(missing)}
    passed = r < 1.0 if strict else r <= 1.0
    return {"rule": rule, "value": r, "pass": passed, "detail": f"{r:.3f}x sdpa's time"}


def annotate(row):
    row["ratio_vs_sdpa"] = ratio(row)
    row["ratio_ci95"] = ratio_interval(row["times_ms"])
    row["eager_ratio_vs_sdpa"] = ratio(row, "eager")
    row["target"] = evaluate_target(row)
    return row


def summarize_targets(rows):
    results = [r["target"]["pass"] for r in rows]
    return {"pass": sum(1 for p in results if p), "fail": sum(1 for p in results if not p), "rows": len(results),
            "ok": all(results) if results else None}


def check_failures(result):
    """Lines naming every modelaccel failure that is not a target miss: a logits/loss
    mismatch against SDPA, or an error other than running out of memory."""
    bad = []
    for row in result["ttft"] + result["train"]["rows"] + result.get("generate", []):
        where = f"{row['kind']} (batch {row['batch']}, seqlen {row['seqlen']})"
        check = row.get("check", {}).get("modelaccel")
        if check and check["status"] != "ok":
            bad.append(f"{where}: rel err {check['rel_err']:.2e} against sdpa")
        err = row["errors"].get("modelaccel")
        if err and not err.startswith("OOM"):
            bad.append(f"{where}: {err}")
    return bad


# ---------------------------------------------------------------------------------------
# Runs


def collect_metadata():
    """The attention benchmark's device/software/commit facts, with this benchmark's settings."""
    import transformers

    from modelaccel.bench.attention import collect_metadata as attention_metadata

    meta = attention_metadata()
    meta.pop("do_bench", None)
    meta["transformers"] = transformers.__version__
    meta["timing"] = {"method": "CUDA events, median; modelaccel and sdpa timed in interleaved rounds (one "
                                "call each per round, each round starting one provider further on) after an "
                                "untimed first call, eager apart after them; ratio_ci95: percentile bootstrap "
                                "of the ratio of medians", "warmup_calls": WARMUP_CALLS, "min_reps": MIN_REPS,
                      "max_reps": MAX_REPS, "budget_ms": BUDGET_MS, "context_budget_ms": CONTEXT_BUDGET_MS,
                      "generate_budget_ms": GENERATE_BUDGET_MS, "ci_resamples": CI_RESAMPLES}
    return meta


def run_benchmark(suite="default", providers=PROVIDERS, log=print, generate=True):
    """Build the model, run the suite's TTFT rows, the generate rows (unless generate=False:
    they alone take ~5 minutes on an H200, benchmarks/generate_rows.py runs them apart), then
    the training step; returns the result dict:
    {"metadata", "suite", "providers", "model", "ttft": [rows], "train": {"layers", "note", "attempts",
    "rows"}, "targets": {"ttft", "train", "ok"}}."""
    ttft_shapes, train_layers = SUITES[suite]
    providers = list(providers)
    config = llama_config()
    result = {"metadata": collect_metadata(), "suite": suite, "providers": providers,
              "model": {"shape": "Llama-3-8B", "config": dict(LLAMA3_8B), "dtype": "bf16",
                        "weights": "random (seeded)"}}
    t0 = time.perf_counter()
    model = build_model(config).eval().requires_grad_(False)
    result["model"]["params"] = count_params(model)
    log(f"built the Llama-3-8B-shaped model ({result['model']['params'] / 1e9:.2f}B params, bf16) in "
        f"{time.perf_counter() - t0:.1f} s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")

    log(f"== Time to first token, {config.num_hidden_layers} layers")
    log(format_header(providers))
    result["ttft"] = []
    for batch, seqlen in ttft_shapes:
        row = annotate(run_ttft_row(model, batch, seqlen, providers, log=log))
        log(format_row(row, providers))
        result["ttft"].append(row)

    if generate:
        log(f"== generate: ms per decoding step after a {GENERATE_PROMPT}-token prompt (no target)")
    result["generate"] = []
    for cache in (GENERATE_CACHES if suite == "default" else GENERATE_CACHES[:1]) if generate else ():
        row = run_generate_row(model, cache, providers=providers, log=log)
        log(format_generate_row(row, providers))
        result["generate"].append(row)

    train = {"layers": None, "note": "", "attempts": [], "rows": []}
    for i, layers in enumerate(train_layers):
        if layers != model.config.num_hidden_layers:
            del model
            free_memory()
            model = build_model(llama_config(layers)).eval().requires_grad_(False)
        log(f"== Training step (seq {TRAIN_SEQLEN}, batch {TRAIN_BATCH}), {layers} layers")
        row = annotate(run_train_row(model, providers=providers, log=log))
        fits = all(row["ms"].get(p) is not None or not row["errors"].get(p, "").startswith("OOM")
                   for p in ("modelaccel", BASELINE) if p in providers)
        if not fits and i + 1 < len(train_layers):
            train["attempts"].append({"layers": layers, "errors": row["errors"]})
            log(f"  {layers} layers do not fit for modelaccel or sdpa; trying {train_layers[i + 1]} layers")
            continue
        log(format_row(row, providers))
        train["layers"] = layers
        train["rows"].append(row)
        break
    full = LLAMA3_8B["num_hidden_layers"]
    if train["layers"] is not None and train["layers"] != full:
        train["note"] = (f"training step on {train['layers']} of the model's {full} layers"
                         + (": the full model with gradients and activations did not fit for modelaccel or sdpa"
                            if train["attempts"] else f" (--suite {suite})"))
    result["train"] = train
    del model
    free_memory()
    result["targets"] = {"ttft": summarize_targets(result["ttft"]), "train": summarize_targets(train["rows"])}
    result["targets"]["ok"] = bool(result["targets"]["ttft"]["ok"]) and bool(result["targets"]["train"]["ok"])
    return result


# ---------------------------------------------------------------------------------------
# Reports

_W = 11


def _ms_text(row, provider):
    ms = row["ms"].get(provider)
    if ms is not None:
        return f"{ms:.1f}"
    err = row["errors"].get(provider, "")
    return "OOM" if err.startswith("OOM") else ("error" if err else "-")


def _ratio_text(value):
    return f"{value:.3f}" if value is not None else "-"


def _interval_text(row):
    interval = row.get("ratio_ci95")
    return f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-"


def _target_text(target):
    verdict = "PASS" if target["pass"] else "FAIL"
    return f"{verdict} ({target['rule']})"


def format_header(providers):
    cells = [f"{'kind':>5}", f"{'layers':>6}", f"{'batch':>5}", f"{'seqlen':>6}"]
    cells += [f"{p + ' ms':>{_W}}" for p in providers]
    return " ".join(cells) + f" | {'ma/sdpa':>8} | {'95% interval':>12} | target"


def format_row(row, providers):
    cells = [f"{row['kind']:>5}", f"{row['layers']:>6}", f"{row['batch']:>5}", f"{row['seqlen']:>6}"]
    cells += [f"{_ms_text(row, p):>{_W}}" for p in providers]
    target = _target_text(row["target"]) if "target" in row else ""
    return " ".join(cells) + f" | {_ratio_text(ratio(row)):>8} | {_interval_text(row):>12} | {target}"


def format_generate_row(row, providers):
    """One console line of a generate row: ms per decoding step per provider, ma/sdpa, and
    how many new tokens each provider shares with SDPA."""
    cells = [f"{row['cache']:>8} cache", f"b{row['batch']} x {row['seqlen']}"]
    cells += [f"{p} {row['ms'][p]:.2f} ms" if row["ms"].get(p) is not None else f"{p} {_ms_text(row, p)}"
              for p in providers]
    r = ratio(row)
    match = ", ".join(f"{p} {n}/{1 + row['new_tokens']}" for p, n in row["tokens_match_sdpa"].items()
                      if p != BASELINE and n is not None)
    return "  ".join(cells) + f" | ma/sdpa {_ratio_text(r)} | tokens equal to sdpa's: {match or '-'}"


def format_summary(result):
    """Console lines: the table, missing numbers, the training note and the targets."""
    providers = result["providers"]
    rows = result["ttft"] + result["train"]["rows"]
    lines = ["== Llama-3-8B-shaped model, bf16, random weights: TTFT and training step (ms, median)",
             format_header(providers)]
    lines += [format_row(r, providers) for r in rows]
    lines.append("ma/sdpa: modelaccel's time over SDPA's (below 1: modelaccel is faster)")
    if result.get("generate"):
        lines.append("generate, ms per decoding step (no target):")
        lines += ["  " + format_generate_row(r, providers) for r in result["generate"]]
    if result["train"]["note"]:
        lines.append("note: " + result["train"]["note"])
    for r in rows:
        for p, reason in r["errors"].items():
            lines.append(f"{r['kind']} batch {r['batch']} seqlen {r['seqlen']} {p}: {reason}")
    t = result["targets"]
    for name in ("ttft", "train"):
        s = t[name]
        lines.append(f"target {name}: {s['pass']}/{s['rows']} rows pass"
                     + ("" if s["ok"] is None else (" -> PASS" if s["ok"] else " -> FAIL")))
    lines.append("targets overall: " + ("PASS" if t["ok"] else "FAIL"))
    return lines


def format_markdown(result):
    meta, providers = result["metadata"], result["providers"]
    lines = [f"# Transformers: Llama-3-8B-shaped model, {meta['device_name']}", ""]
    for key in ("device_name", "total_memory_gib", "torch", "triton", "transformers", "cuda", "cudnn", "date",
                "modelaccel_commit", "modelaccel_dirty", "timing"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    model = result["model"]
    lines += [f"- model: {model['shape']} shape, {model.get('params', 0) / 1e9:.2f}B params, {model['dtype']}, "
              f"{model['weights']} weights", f"- suite: {result['suite']}", "",
              "TTFT: one forward over the prompt producing the first token (`logits_to_keep=1`, as `generate`'s "
              "prefill). Training step: forward with labels + backward, parameter gradients only, no optimizer, "
              "no gradient checkpointing. Times in ms (median); ma/sdpa is modelaccel's time over SDPA's "
              "(below 1: modelaccel is faster), with a 95% bootstrap interval; check is the relative error of modelaccel's last-position "
              "logits (TTFT) or loss (training) against SDPA's.", ""]
    header = ["kind", "layers", "batch", "seqlen"] + [f"{p} ms" for p in providers] + ["ma/sdpa", "95% interval",
                                                                                       "check", "target"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    rows = result["ttft"] + result["train"]["rows"]
    notes = []
    for r in rows:
        check = r["check"].get("modelaccel")
        cells = [r["kind"], str(r["layers"]), str(r["batch"]), str(r["seqlen"])]
        cells += [_ms_text(r, p) for p in providers]
        cells += [_ratio_text(r.get("ratio_vs_sdpa")), _interval_text(r), f"{check['rel_err']:.1e}" if check else "-",
                  _target_text(r["target"])]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {r['kind']} (batch {r['batch']}, seqlen {r['seqlen']}) {p}: {why}" for p, why in r["errors"].items()]
    if result["train"]["note"]:
        lines += ["", "Note: " + result["train"]["note"] + "."]
    for attempt in result["train"]["attempts"]:
        notes.append(f"- training step with {attempt['layers']} layers: " +
                     "; ".join(f"{p}: {why}" for p, why in attempt["errors"].items()))
    if result.get("generate"):
        lines += ["", "## generate: ms per decoding step (no target)", "",
                  f"Greedy `generate` at batch 1 after a {GENERATE_PROMPT}-token prompt: (generate of 1 + n new "
                  "tokens - generate of 1) / n, medians, so the prefill is left out. Tokens: how many of the 1 + n "
                  "generated tokens equal SDPA's (random bf16 weights: close logits may flip a greedy choice).",
                  ""]
        header = ["cache", "new tokens"] + [f"{p} ms/step" for p in providers] + ["ma/sdpa"]
        header += [f"{p} tokens = sdpa's" for p in providers if p != BASELINE]
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for r in result["generate"]:
            cells = [r["cache"], str(r["new_tokens"])]
            cells += [f"{r['ms'][p]:.2f}" if r["ms"].get(p) is not None else _ms_text(r, p) for p in providers]
            cells.append(_ratio_text(ratio(r)))
            matches = [r["tokens_match_sdpa"].get(p) for p in providers if p != BASELINE]
            cells += [f"{n}/{1 + r['new_tokens']}" if n is not None else "-" for n in matches]
            lines.append("| " + " | ".join(cells) + " |")
            notes += [f"- generate ({r['cache']} cache) {p}: {why}" for p, why in r["errors"].items()]
    if notes:
        lines += ["", "Missing numbers:", ""] + notes
    t = result["targets"]
    lines += ["", "## Targets", "",
              f"modelaccel at least as fast as SDPA at every size, faster from {TARGET_BETTER_FROM} tokens on.", ""]
    for name in ("ttft", "train"):
        s = t[name]
        lines.append(f"- {name}: {s['pass']}/{s['rows']} rows pass")
    lines.append(f"- overall: {'PASS' if t['ok'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def plot_results(result, path):
    """Bars of ms per provider: TTFT rows, then the training step. None if matplotlib is missing."""
    plt = report.pyplot()
    if plt is None:
        return None
    providers = result["providers"]
    groups = [("Time to first token", result["ttft"]), ("Training step", result["train"]["rows"])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 + 2 * len(result["ttft"]), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [max(1, len(rows)) for _, rows in groups]})
    width = 0.8 / len(providers)
    for ax, (title, rows) in zip(axes[0], groups):
        for i, p in enumerate(providers):
            xs = [x + (i - (len(providers) - 1) / 2) * width for x in range(len(rows))]
            ax.bar(xs, [r["ms"].get(p) or 0.0 for r in rows], width, label=p)
        ax.set_xticks(list(range(len(rows))))
        ax.set_xticklabels([f"b{r['batch']} x {r['seqlen']}\n{r['layers']} layers" for r in rows], fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.legend()
    return report.save_figure(
        fig, f"Llama-3-8B-shaped model, bf16, {result['metadata']['device_name']} (missing bars: OOM or error)", path)


def write_results(result, out_dir, tag=""):
    """Write result as transformers_<device-slug>_<date>[_<tag>].{json,md,png} into out_dir.
    Returns {"json", "md", "png"}, "png" None if the plot was skipped."""
    return report.write_files(result, out_dir, "transformers", tag, format_markdown, plot_results)


def main(suite="default", out_dir=os.path.join("benchmarks", "results"), generate=True):
    """The GPU benchmark: run, print, write; exit code 1 if modelaccel mismatched SDPA or failed
    other than by running out of memory (missed speed targets are reported, not an error)."""
    log = lambda line: print(line, flush=True)  # noqa: E731
    result = run_benchmark(suite, log=log, generate=generate)
    print()
    for line in format_summary(result):
        print(line)
    paths = write_results(result, out_dir, tag="" if suite == "default" else suite)
    for path in paths.values():
        if path:
            print(f"wrote {path}")
    bad = check_failures(result)
    if bad:
        print("FAILED: " + "; ".join(bad))
        return 1
    return 0


# ---------------------------------------------------------------------------------------
# CPU smoke test (no GPU): the same row functions on a tiny Llama

SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, initializer_range=0.3)


def smoke_main():
    """Tiny Llama (fp32 weights; modelaccel computes attention in bf16) on CPU: one TTFT row,
    one training row and one generate row through every provider; fails if modelaccel errs
    or disagrees with SDPA.
    Run in a process with TRITON_INTERPRET=1 so the kernels run in the Triton interpreter."""
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}; tiny Llama on CPU "
          "(times mean nothing here)", flush=True)
    model = build_model(LlamaConfig(**SMOKE_CONFIG), device="cpu", dtype=torch.float32).eval()
    once = dict(warmup=0, min_reps=1, max_reps=1)
    rows = [run_ttft_row(model, 2, 16, clock=wall_clock, device="cpu", timing=once),
            run_train_row(model, seqlen=16, batch=2, clock=wall_clock, device="cpu", timing=once)]
    print(format_header(PROVIDERS))
    failed = False
    for row in rows:
        print(format_row(row, PROVIDERS))
        check = row["check"]["modelaccel"]
        ok = check is not None and check["status"] == "ok" and "modelaccel" not in row["errors"]
        failed |= not ok
        detail = f"rel err {check['rel_err']:.2e}" if check else "no check"
        print(f"  {row['kind']}: modelaccel vs sdpa {detail}: {'PASS' if ok else 'FAIL'}")
        for p, why in row["errors"].items():
            print(f"  {p}: {why}")
    generate = run_generate_row(model, "dynamic", batch=1, prompt=8, new_tokens=2, clock=wall_clock, device="cpu",
                                timing=once)
    print(format_generate_row(generate, PROVIDERS))
    ok = "modelaccel" not in generate["errors"] and generate["ms"]["modelaccel"] is not None
    failed |= not ok
    print(f"  generate: modelaccel {'ran' if ok else 'failed: ' + generate['errors'].get('modelaccel', 'no time')}")
    print(f"smoke test {'FAILED' if failed else 'passed'} in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(smoke_main())

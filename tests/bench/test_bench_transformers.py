"""The GPU-free parts of the Transformers benchmark: suites, targets, rows, reports, CLI."""

import json
import statistics

import pytest
import torch

from modelaccel.bench import transformers_bench as bench
from modelaccel.cli import build_parser

PROVIDERS = list(bench.PROVIDERS)


def make_row(kind="ttft", batch=1, seqlen=2048, ms=None, errors=None, rel_err=1e-3, layers=32):
    row = bench._empty_row(kind, batch, seqlen, layers, PROVIDERS)
    row["ms"].update(ms or {})
    row["errors"].update(errors or {})
    row["check"]["modelaccel"] = {"rel_err": rel_err, "status": "ok" if rel_err <= bench.CHECK_REL_ERR else "mismatch"}
    return bench.annotate(row)


def make_result(train_layers=32, note=""):
    ttft = [make_row(seqlen=512, ms={"modelaccel": 10.0, "sdpa": 10.0, "eager": 12.0}),
            make_row(batch=8, seqlen=8192, ms={"modelaccel": 900.0, "sdpa": 1000.0},
                     errors={"eager": "OOM: CUDA out of memory. Tried to allocate 64.00 GiB"})]
    train = [make_row("train", seqlen=4096, layers=train_layers,
                      ms={"modelaccel": 400.0, "sdpa": 380.0, "eager": 700.0})]
    generate = bench._empty_row("generate", 1, 512, 32, PROVIDERS)
    del generate["check"]
    generate.update(cache="dynamic", new_tokens=32, ms={"modelaccel": 30.0, "sdpa": 25.0, "eager": None},
                    generate_ms={}, tokens_match_sdpa={"modelaccel": 32, "sdpa": 32, "eager": None},
                    errors={"eager": "RuntimeError: boom"})
    result = {"metadata": {"device_name": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T10:00:00+00:00",
                           "torch": "2.11", "transformers": "5.17"},
              "suite": "default", "providers": PROVIDERS,
              "model": {"shape": "Llama-3-8B", "config": dict(bench.LLAMA3_8B), "dtype": "bf16",
                        "weights": "random (seeded)", "params": 8_030_261_248},
              "ttft": ttft, "train": {"layers": train_layers, "note": note, "attempts": [], "rows": train},
              "generate": [generate]}
    result["targets"] = {"ttft": bench.summarize_targets(ttft), "train": bench.summarize_targets(train)}
    result["targets"]["ok"] = bool(result["targets"]["ttft"]["ok"]) and bool(result["targets"]["train"]["ok"])
    return result


def test_suites_and_model_shape():
    ttft, layers = bench.SUITES["default"]
    assert ttft == [(1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048), (8, 8192)]
    assert layers == (32, 8)
    assert bench.SUITES["quick"] == ([(1, 512)], (2,))
    assert bench.LLAMA3_8B == dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    assert bench.PROVIDERS == ("modelaccel", "sdpa", "eager")
    assert (bench.TRAIN_SEQLEN, bench.TRAIN_BATCH) == (4096, 1)


def test_targets():
    # Below 2048 tokens: not slower (a tie passes); from 2048 on: strictly faster.
    assert make_row(seqlen=512, ms={"modelaccel": 10.0, "sdpa": 10.0})["target"]["pass"] is True
    assert make_row(seqlen=512, ms={"modelaccel": 10.1, "sdpa": 10.0})["target"]["pass"] is False
    assert make_row(seqlen=2048, ms={"modelaccel": 10.0, "sdpa": 10.0})["target"]["pass"] is False
    faster = make_row(seqlen=8192, ms={"modelaccel": 9.0, "sdpa": 10.0})
    assert faster["target"]["pass"] is True and faster["ratio_vs_sdpa"] == pytest.approx(0.9)
    missing = make_row(seqlen=512, ms={"sdpa": 10.0}, errors={"modelaccel": "OOM: out of memory"})
    assert missing["target"]["pass"] is False and "modelaccel" in missing["target"]["detail"]
    summary = bench.summarize_targets([faster, missing])
    assert summary == {"pass": 1, "fail": 1, "rows": 2, "ok": False}
    assert bench.summarize_targets([])["ok"] is None


def test_oom_classification():
    assert bench.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert bench.is_oom(RuntimeError("triton: out of memory"))
    assert not bench.is_oom(ValueError("bad shape"))
    assert bench.failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory.\nmore")) == "OOM: CUDA out of memory."
    assert bench.failure_reason(ValueError("bad shape")) == "ValueError: bad shape"


def test_console_table_and_summary():
    result = make_result()
    header = bench.format_header(PROVIDERS)
    assert "modelaccel ms" in header and "sdpa ms" in header and "eager ms" in header and "ma/sdpa" in header
    line = bench.format_row(result["ttft"][1], PROVIDERS)
    assert "900.0" in line and "OOM" in line and "0.900" in line and "PASS" in line
    text = "\n".join(bench.format_summary(result))
    assert "target ttft: 2/2 rows pass -> PASS" in text
    assert "target train: 0/1 rows pass -> FAIL" in text  # 400 ms against 380 ms at 4096 tokens
    assert "targets overall: FAIL" in text
    assert "eager: OOM: CUDA out of memory" in text


def test_markdown_and_json_files(tmp_path):
    result = make_result(train_layers=8, note="training step on 8 of the model's 32 layers")
    paths = bench.write_results(result, str(tmp_path), tag="quick")
    assert paths["json"].endswith("transformers_nvidia-h100-80gb-hbm3_2026-12-01_quick.json")
    assert json.load(open(paths["json"]))["ttft"][1]["ms"]["eager"] is None
    md = open(paths["md"]).read()
    assert "| ttft | 32 | 8 | 8192 | 900.0 | 1000.0 | OOM | 0.900 |" in md
    assert "training step on 8 of the model's 32 layers" in md
    assert "- overall: FAIL" in md
    if paths["png"]:
        assert (tmp_path / paths["png"].split("/")[-1]).stat().st_size > 0


def test_generate_rows_in_the_reports():
    result = make_result()
    md = bench.format_markdown(result)
    assert "## generate: ms per decoding step (no target)" in md
    assert "| dynamic | 32 | 30.00 | 25.00 | error | 1.200 | 32/33 | - |" in md
    assert "- generate (dynamic cache) eager: RuntimeError: boom" in md
    text = "\n".join(bench.format_summary(result))
    assert "modelaccel 30.00 ms" in text and "ma/sdpa 1.200" in text and "modelaccel 32/33" in text


def test_check_failures_ignore_oom_but_not_errors_or_mismatches():
    result = make_result()
    result["generate"] = []
    assert bench.check_failures(result) == []
    result["ttft"][0]["errors"]["modelaccel"] = "OOM: out of memory"
    assert bench.check_failures(result) == []
    result["ttft"][0]["errors"]["modelaccel"] = "RuntimeError: boom"
    result["train"]["rows"][0]["check"]["modelaccel"] = {"rel_err": 0.5, "status": "mismatch"}
    bad = bench.check_failures(result)
    assert len(bad) == 2 and "boom" in bad[0] and "rel err" in bad[1]


def test_rows_on_a_tiny_cpu_model_with_a_stub_timer():
    """The row functions themselves: attention switching on one model, OOM recording, checks."""
    transformers = pytest.importorskip("transformers")
    model = bench.build_model(transformers.LlamaConfig(**bench.SMOKE_CONFIG), device="cpu", dtype=torch.float32)
    model.eval()
    clock = lambda fn: (fn(), 1.0)[1]  # noqa: E731

    def failing_clock(fn):
        if model.config._attn_implementation == "eager":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return clock(fn)

    providers = ["sdpa", "eager"]  # no kernels here: the interpreter is exercised by the smoke test
    once = dict(warmup=0, min_reps=1, max_reps=1)
    row = bench.annotate(bench.run_ttft_row(model, 2, 8, providers=providers, clock=failing_clock, device="cpu",
                                            log=lambda _: None, timing=once))
    assert row["ms"] == {"sdpa": 1.0, "eager": None}
    assert row["errors"]["eager"].startswith("OOM: CUDA out of memory")
    assert row["check"]["eager"]["status"] == "ok"  # eager's untimed call ran before the (stub) OOM
    train = bench.run_train_row(model, seqlen=8, batch=1, providers=providers, clock=clock, device="cpu",
                                log=lambda _: None, timing=once)
    assert train["ms"] == {"sdpa": 1.0, "eager": 1.0} and train["check"]["eager"]["rel_err"] < 1e-4
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.parametrize("cache", bench.GENERATE_CACHES)
def test_generate_row_times_a_decoding_step(cache):
    transformers = pytest.importorskip("transformers")
    model = bench.build_model(transformers.LlamaConfig(**bench.SMOKE_CONFIG), device="cpu", dtype=torch.float32)
    model.eval()
    calls = []

    def tokens_clock(fn):  # "ms" = tokens generated: (5 - 1) / 4 new tokens = 1.0 ms a step
        out = fn()
        calls.append(out.shape)
        return float(out.shape[1])

    row = bench.run_generate_row(model, cache, batch=1, prompt=8, new_tokens=4, providers=["sdpa", "eager"],
                                 clock=tokens_clock, device="cpu", log=lambda _: None,
                                 timing=dict(warmup=0, min_reps=1, max_reps=1))
    assert row["kind"] == "generate" and row["cache"] == cache and row["errors"] == {}
    assert row["ms"] == {"sdpa": 1.0, "eager": 1.0}
    assert row["generate_ms"]["sdpa"] == {"1": 1.0, "5": 5.0}
    assert row["tokens_match_sdpa"] == {"sdpa": 5, "eager": 5}  # fp32: eager's greedy tokens are SDPA's
    assert sorted(calls) == [(1, 1), (1, 1), (1, 5), (1, 5)]


def test_cli_arguments_and_help(capsys):
    args = build_parser().parse_args(["bench", "transformers", "--suite", "quick", "--out", "x"])
    assert (args.suite, args.out) == ("quick", "x")
    assert build_parser().parse_args(["bench", "transformers"]).suite == "default"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "transformers", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--suite" in out and "Llama-3-8B" in out


def test_no_generate_reaches_the_benchmark(monkeypatch):
    from modelaccel import cli
    from modelaccel.bench import transformers_bench

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers_bench, "main", lambda **kwargs: seen.update(kwargs) or 0)
    for argv, generate in ((["bench", "transformers", "--no-generate"], False), (["bench", "transformers"], True)):
        args = build_parser().parse_args(argv)
        assert cli.cmd_bench_transformers(args) == 0
        assert seen["generate"] is generate


def test_time_rounds_interleaves_providers_and_stops_each_on_its_budget():
    order = []
    active = []
    cost = {"fast": 1.0, "slow": 50.0}

    def clock(fn):
        fn()
        return cost[active[-1]]

    calls = {name: ((lambda name=name: active.append(name)), (lambda name=name: order.append(name)))
             for name in ("fast", "slow", "broken")}

    def broken():
        raise RuntimeError("boom")
    calls["broken"] = (calls["broken"][0], broken)
    timings, errors = bench.time_rounds(calls, clock, warmup=1, min_reps=3, max_reps=6, budget_ms=100.0)
    assert set(errors) == {"broken"} and "boom" in str(errors["broken"])
    # One warm-up call each, then rounds that start one provider further on each time
    # (broken's turn to start counts, though it left): slow stops at 100 ms of timed calls
    # (2 calls) but runs to min_reps; fast runs on alone to max_reps.
    assert timings == {"fast": [1.0] * 6, "slow": [50.0] * 3}
    assert order == ["fast", "slow"] + ["fast", "slow", "slow", "fast", "fast", "slow"] + ["fast"] * 3


def test_the_compared_pair_is_timed_apart_from_eager():
    """modelaccel and SDPA alternate in rounds of their own (ABBA); eager comes after them,
    on its shorter budget, so none of the pair's calls follows one of eager's."""
    order, active = [], []
    cost = {"modelaccel": 10.0, "sdpa": 10.0, "eager": 30.0}

    def clock(fn):
        fn()
        order.append(active[-1])
        return cost[active[-1]]

    class Model:
        config = type("Config", (), {"_attn_implementation": None})()

        def set_attn_implementation(self, provider):
            active.append(provider)
            self.config._attn_implementation = provider

    row = bench._empty_row("ttft", 1, 512, 32, PROVIDERS)
    timing = dict(warmup=0, min_reps=2, max_reps=100, budget_ms=40.0, context_budget_ms=60.0)
    bench._time_providers(row, Model(), PROVIDERS, lambda: None, clock, timing, lambda _: None)
    assert order == ["modelaccel", "sdpa", "sdpa", "modelaccel", "modelaccel", "sdpa", "sdpa", "modelaccel",
                     "eager", "eager"]
    assert row["reps"] == {"modelaccel": 4, "sdpa": 4, "eager": 2}
    assert row["times_ms"]["eager"] == [30.0, 30.0] and row["ms"]["sdpa"] == 10.0


def test_ratio_interval_brackets_the_ratio_and_narrows_with_calls():
    import random

    rng = random.Random(1)
    few = {"modelaccel": [99 + rng.random() * 2 for _ in range(5)], "sdpa": [100 + rng.random() * 2 for _ in range(5)]}
    many = {p: [t + rng.random() * 2 for _ in range(80)] for p, t in (("modelaccel", 99), ("sdpa", 100))}
    for times in (few, many):
        low, high = bench.ratio_interval(times)
        r = statistics.median(times["modelaccel"]) / statistics.median(times["sdpa"])
        assert low <= r <= high
    assert bench.ratio_interval(many)[1] - bench.ratio_interval(many)[0] \
        < bench.ratio_interval(few)[1] - bench.ratio_interval(few)[0]
    assert bench.ratio_interval(many)[1] < 1.0  # 1% apart, 80 calls each: resolved
    assert bench.ratio_interval({"modelaccel": [1.0, 2.0], "sdpa": [1.0, 2.0, 3.0]}) is None
    row = make_row(ms={"modelaccel": 1.0, "sdpa": 1.0})
    assert row["ratio_ci95"] is None  # no calls recorded

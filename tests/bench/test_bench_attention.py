"""The GPU-free parts of the attention benchmark: suites, FLOP counting, checks, reports."""

import json
import math
import sys

import pytest
import torch

from modelaccel.bench import attention as bench
from modelaccel.bench import report


def brute_force_causal_pairs(seqlen_q, seqlen_k):
    # Bottom-right alignment: query i sits at key position i + seqlen_k - seqlen_q.
    return sum(1 for i in range(seqlen_q) for j in range(seqlen_k) if j <= i + seqlen_k - seqlen_q)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (1, 7), (7, 1), (5, 5), (37, 53), (53, 37), (64, 64),
                                               (1021, 1020), (163, 4097), (4097, 163), (3, 300)])
def test_causal_visible_pairs_matches_brute_force(seqlen_q, seqlen_k):
    assert bench.causal_visible_pairs(seqlen_q, seqlen_k) == brute_force_causal_pairs(seqlen_q, seqlen_k)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(37, 53), (53, 37), (4097, 163), (2, 9)])
def test_causal_flops_non_square_are_exact(seqlen_q, seqlen_k):
    b, h, d = 2, 3, 64
    expected = 4 * b * h * d * brute_force_causal_pairs(seqlen_q, seqlen_k)
    assert bench.attention_flops(b, h, seqlen_q, seqlen_k, d, causal=True) == expected


def test_flops_non_causal_and_square_causal():
    assert bench.attention_flops(2, 16, 1024, 2048, 128, causal=False) == 4 * 2 * 16 * 1024 * 2048 * 128
    # Square causal uses the published tables' half-of-full convention.
    assert bench.attention_flops(2, 16, 1024, 1024, 128, causal=True) == 4 * 2 * 16 * 1024 * 1024 * 128 // 2


def test_tflops():
    assert bench.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert bench.tflops(1e12, None) is None


def test_default_suite_tables():
    nc128, causal, nc64 = bench.make_tables("default")
    assert (nc128.dtype, nc128.headdim, nc128.causal, len(nc128.shapes)) == ("fp16", 128, False, 18)
    assert (nc64.dtype, nc64.headdim, nc64.causal, nc64.shapes) == ("fp16", 64, False, nc128.shapes)
    assert (causal.dtype, causal.headdim, causal.causal) == ("bf16", 128, True)
    # SDPA's causal mask is top-left aligned: only square shapes compare with flash-attn's.
    assert all(sq == sk for _, _, _, sq, sk in causal.shapes)
    assert (4, 32, 8, 4096, 4096) in causal.shapes and (1, 64, 8, 16384, 16384) in causal.shapes
    assert len(causal.shapes) == 8


def test_quick_suite_is_small_and_causal_rows_square():
    tables = bench.make_tables("quick")
    assert sum(len(t.shapes) for t in tables) <= 10
    assert all(sq == sk for t in tables if t.causal for _, _, _, sq, sk in t.shapes)


def test_make_tables_override_gives_one_table():
    (table,) = bench.make_tables("default", dtype="bf16", headdim=64)
    assert (table.dtype, table.headdim, table.causal, table.shapes) == ("bf16", 64, False, bench.NONCAUSAL_SHAPES)
    (table,) = bench.make_tables("quick", causal=True)
    assert (table.dtype, table.headdim, table.shapes) == ("fp16", 128, bench.QUICK_CAUSAL_SHAPES)


def test_compare_outputs():
    ref = torch.randn(2, 33, 4, 64)
    assert bench.compare_outputs(ref.half(), ref, "fp16")["ok"]
    assert bench.compare_outputs(ref.bfloat16(), ref, "bf16")["ok"]
    wrong = ref.clone()
    wrong[:, 0] += 0.5
    assert not bench.compare_outputs(wrong, ref, "bf16")["ok"]
    # Long rows have small outputs: a 10% scale error must fail although it is < atol.
    small = ref * 1e-2
    cmp = bench.compare_outputs(small * 1.1, small, "fp16")
    assert cmp["max_abs_err"] < bench.CHECK_ATOL["fp16"] and not cmp["ok"]
    nan = ref.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not bench.compare_outputs(nan, ref, "fp16")["ok"]


def make_row(shape, tflops, check_status="ok", errors=None):
    b, hq, hk, sq, sk = shape
    flops = bench.attention_flops(b, hq, sq, sk, 128, False)
    return {"batch": b, "nheads_q": hq, "nheads_k": hk, "seqlen_q": sq, "seqlen_k": sk, "flops": flops,
            "check": {"status": check_status, "reference": "flash", "max_abs_err": 1e-3, "rel_err": 1e-3,
                      "detail": None},
            "ms": {p: (flops / (t * 1e12) * 1e3 if t else None) for p, t in tflops.items()},
            "tflops": tflops, "errors": errors or {}}


def make_result():
    rows = [
        make_row((16, 16, 16, 1024, 1024), {"modelaccel": 400.0, "flash": 200.0, "cudnn": 400.0}),
        make_row((1, 16, 16, 16281, 7), {"modelaccel": 100.0, "flash": 50.0, "cudnn": None},
                 errors={"cudnn": "No available kernel. Aborting execution."}),
        make_row((2, 48, 48, 1021, 1020), {"modelaccel": None, "flash": 300.0, "cudnn": 310.0},
                 check_status="mismatch", errors={"modelaccel": "mismatch"}),
    ]
    geomean = {}
    for baseline in ("flash", "cudnn"):
        value, n = bench.geomean_ratios(rows, "modelaccel", baseline)
        geomean[f"vs_{baseline}"] = {"geomean": value, "rows": n}
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "compute_capability": "9.0",
            "torch": "2.13.0", "triton": "3.9.0", "cuda": "13.0", "cudnn": 91000,
            "date": "2026-11-25T08:00:00+00:00", "modelaccel_commit": "abc123", "modelaccel_dirty": False}
    table = {"title": "fp16, headdim 128, non-causal", "dtype": "fp16", "headdim": 128, "causal": False,
             "rows": rows, "geomean": geomean}
    return {"metadata": meta, "providers": ["modelaccel", "flash", "cudnn"], "tables": [table]}


def test_geomean_ratios_skips_rows_without_both_numbers():
    rows = make_result()["tables"][0]["rows"]
    value, n = bench.geomean_ratios(rows, "modelaccel", "flash")
    assert n == 2 and value == pytest.approx(2.0)
    value, n = bench.geomean_ratios(rows, "modelaccel", "cudnn")
    assert n == 1 and value == pytest.approx(1.0)
    assert bench.geomean_ratios(rows[2:], "modelaccel", "flash") == (None, 0)


def test_format_table():
    result = make_result()
    text = report.format_table(result["tables"][0], result["providers"])
    lines = text.splitlines()
    assert lines[0] == "== fp16, headdim 128, non-causal"
    header = lines[1].split()
    assert header[:5] == ["BATCH", "HQ", "HK", "N_CTX_Q", "N_CTX_K"]
    assert "modelaccel" in header and "(TFLOPS)" in header and "check" in header
    first = lines[2].split()
    assert first[:5] == ["16", "16", "16", "1024", "1024"]
    assert first[6:9] == ["400.0", "200.0", "400.0"]
    assert "2.00x" in first and "1.00x" in first
    assert "MISMATCH" in lines[4] and "mismatch" in lines[4]
    assert "-" in lines[3].split()  # cudnn refused the 7-key row
    assert lines[-1] == ("geomean modelaccel vs flash: 2.000x over 2 rows; "
                         "modelaccel vs cudnn: 1.000x over 1 rows")
    # Columns line up: the last separator (before the check column) sits where the header's does.
    assert all(line.rindex("|") == lines[1].rindex("|") for line in lines[2:5])


def test_format_without_modelaccel_has_no_ratios():
    table = make_result()["tables"][0]
    table["geomean"] = {}  # run_benchmark computes no ratios when modelaccel did not run
    text = report.format_table(table, ["flash", "cudnn"])
    assert "vs flash" not in text and "geomean" not in text and "modelaccel" not in text


def test_device_slug():
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.device_slug("NVIDIA H200") == "nvidia-h200"


def test_write_results(tmp_path):
    result = make_result()
    paths = report.write_results(result, str(tmp_path / "out"))
    stem = "attention_fwd_nvidia-h100-80gb-hbm3_2026-11-25"
    assert paths["json"] == str(tmp_path / "out" / f"{stem}.json")
    assert json.loads((tmp_path / "out" / f"{stem}.json").read_text()) == result
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "| BATCH | HQ | HK | N_CTX_Q | N_CTX_K | modelaccel | flash | cudnn |" in md
    assert "| 16 | 16 | 16 | 1024 | 1024 | 400.0 | 200.0 | 400.0 | 2.00x | 1.00x | ok 1.0e-03 |" in md
    assert "(1, 16, 16, 16281, 7) cudnn: No available kernel" in md
    png = tmp_path / "out" / f"{stem}.png"
    assert paths["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_results_tag_and_no_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = report.write_results(make_result(), str(tmp_path), tag="quick")
    assert paths["png"] is None
    assert paths["json"].endswith("attention_fwd_nvidia-h100-80gb-hbm3_2026-11-25_quick.json")
    assert "skipping the plot" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_row_on_gpu():
    table = bench.Table("bf16", 64, True, ((2, 4, 2, 512, 512),))
    row = bench.run_row(table, table.shapes[0], bench.PROVIDERS)
    assert row["check"]["status"] == "ok", row
    assert row["tflops"]["modelaccel"] > 0
    assert math.isfinite(row["check"]["max_abs_err"])


def test_git_commit_falls_back_to_env_outside_a_checkout(monkeypatch):
    monkeypatch.setattr(bench, "__file__", "/nonexistent/modelaccel/bench/attention.py")
    monkeypatch.setenv("MODELACCEL_COMMIT", "0123abcd")
    assert bench._git_commit() == ("0123abcd", None)


# ---------------------------------------------------------------------------------------
# Backward and varlen modes


def test_bwd_and_varlen_tables():
    (bwd,) = bench.make_tables("default", mode="bwd")
    assert (bwd.mode, bwd.dtype, bwd.headdim, bwd.causal) == ("bwd", "bf16", 128, True)
    assert bwd.shapes == bench.BWD_SHAPES and len(set(bwd.shapes)) == len(bwd.shapes) == 7
    assert all(sq == sk for _, _, _, sq, sk in bwd.shapes) and (2, 32, 8, 8192, 8192) in bwd.shapes
    causal, noncausal = bench.make_tables("default", mode="varlen")
    assert (causal.mode, causal.causal, noncausal.causal) == ("varlen", True, False)
    assert causal.shapes == bench.VARLEN_SHAPES
    (only_causal,) = bench.make_tables("quick", causal=True, mode="varlen")
    assert only_causal.causal and len(only_causal.shapes) <= 2
    assert len(bench.make_tables("quick", mode="bwd")[0].shapes) <= 2
    assert "backward" in bwd.title and "varlen" in causal.title
    with pytest.raises(ValueError):
        bench.make_tables("default", mode="both")


def test_varlen_seqlens():
    for batch, _, _, max_len in bench.VARLEN_SHAPES:
        lens = bench.varlen_seqlens(batch, max_len)
        assert lens == bench.varlen_seqlens(batch, max_len)  # fixed seed
        assert len(lens) == batch and max(lens) == max_len and min(lens) >= max_len // 4
    assert bench.varlen_seqlens(8, 2048) != bench.varlen_seqlens(8, 2048, seed=1)


def test_varlen_flops_count_each_sequence():
    assert bench.varlen_flops([1024, 512], 16, 128, causal=False) == 4 * 16 * 128 * (1024**2 + 512**2)
    assert bench.varlen_flops([1024, 512], 16, 128, causal=True) == 4 * 16 * 128 * (1024**2 + 512**2) // 2


def test_compare_grads():
    ref = tuple(torch.randn(2, 16, 4, 32) for _ in range(3))
    assert bench.compare_grads(tuple(r.bfloat16() for r in ref), ref)["ok"]
    wrong = (ref[0], ref[1] * 1.1, ref[2])
    cmp = bench.compare_grads(wrong, ref)
    assert not cmp["ok"] and cmp["rel_err"]["dk"] == pytest.approx(0.1, rel=1e-3) and cmp["rel_err"]["dq"] == 0


@pytest.fixture
def cpu_bench(monkeypatch):
    """Rows on CPU with a timer stub: exercises checks and bookkeeping, not speed. The
    kernels run in the Triton interpreter (fp16: it cannot do bf16 dots)."""
    import triton.testing

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: (fn(), 1.0)[1])


def _has_training_api():
    import modelaccel

    return hasattr(modelaccel, "flash_attn_varlen_func")


@pytest.mark.skipif(not _has_training_api(), reason="flash_attn_varlen_func has not landed yet")
@pytest.mark.parametrize("causal", [True, False])
def test_run_varlen_row_on_cpu(cpu_bench, causal):
    table = bench.Table("fp16", 32, causal, ((3, 2, 1, 48),), mode="varlen")
    row = bench.run_varlen_row(table, table.shapes[0], bench.VARLEN_PROVIDERS, log=print)
    assert row["check"]["status"] == "ok", row
    assert row["total_tokens"] == sum(row["seqlens"]) and max(row["seqlens"]) == 48
    assert row["ms"]["modelaccel"] == 1.0 and row["tokens_per_s"]["modelaccel"] == pytest.approx(row["total_tokens"] * 1e3)
    if causal:
        # The padded SDPA flash peer, run without a padding mask, is exact on the real rows.
        assert row["peer_check"]["ok"], row["peer_check"]
        assert row["ms"]["flash"] == 1.0
    assert set(row["errors"]) <= {"flash", "cudnn", "flash_varlen"}  # peers CPU torch lacks are recorded


@pytest.mark.parametrize("shape", [(1, 2, 1, 40, 40), (2, 2, 2, 33, 33)])
def test_run_bwd_row_on_cpu(cpu_bench, shape):
    table = bench.Table("fp16", 32, True, (shape,), mode="bwd")
    row = bench.run_bwd_row(table, shape, bench.PROVIDERS, log=print)
    assert row["flops"] == int(2.5 * bench.attention_flops(shape[0], shape[1], shape[3], shape[4], 32, True))
    assert row["ms"]["flash"] == 1.0  # CPU SDPA flash backward ran under the stub timer
    assert "cudnn" in row["errors"]
    assert row["check"]["status"] == "ok", row
    assert set(row["check"]["rel_err"]) == {"dq", "dk", "dv"} and row["ms"]["modelaccel"] == 1.0


def test_write_results_bwd_and_varlen(tmp_path):
    result = make_result()
    result["mode"] = "bwd"
    paths = report.write_results(result, str(tmp_path))
    assert paths["json"].endswith("attention_bwd_nvidia-h100-80gb-hbm3_2026-11-25.json")
    assert "# Attention backward pass, NVIDIA H100" in (tmp_path / "attention_bwd_nvidia-h100-80gb-hbm3_2026-11-25.md").read_text()

    row = {"batch": 2, "nheads_q": 16, "nheads_k": 4, "max_seqlen": 1024, "seqlens": [1024, 300],
           "total_tokens": 1324, "flops": 10**9, "check": {"status": "ok", "reference": "flash per sequence",
                                                           "max_abs_err": 2e-3, "rel_err": 1e-3, "detail": None},
           "peer_check": None, "ms": {"modelaccel": 0.5, "flash": 1.0, "cudnn": None, "flash_varlen": 0.5},
           "tflops": {"modelaccel": 2e-3, "flash": 1e-3, "cudnn": None, "flash_varlen": 2e-3},
           "tokens_per_s": {"modelaccel": 2.648e6, "flash": 1.324e6, "cudnn": None, "flash_varlen": 2.648e6},
           "errors": {"cudnn": "refused"}}
    providers = list(bench.VARLEN_PROVIDERS)
    table = {"title": "varlen, bf16, headdim 128, causal", "mode": "varlen", "dtype": "bf16", "headdim": 128,
             "causal": True, "rows": [row], "geomean": {"vs_flash": {"geomean": 2.0, "rows": 1}}}
    varlen = {"metadata": make_result()["metadata"], "mode": "varlen", "providers": providers, "tables": [table]}
    text = report.format_table(table, providers)
    assert text.splitlines()[1].split()[:5] == ["BATCH", "HQ", "HK", "MAX_LEN", "TOKENS"]
    assert text.splitlines()[2].split()[:5] == ["2", "16", "4", "1024", "1324"]
    paths = report.write_results(varlen, str(tmp_path), tag="quick")
    assert paths["json"].endswith("attention_varlen_nvidia-h100-80gb-hbm3_2026-11-25_quick.json")
    md = open(paths["md"]).read()
    assert "| BATCH | HQ | HK | MAX_LEN | TOKENS |" in md and "modelaccel Mtok/s" in md
    assert "| 2.6 | 1.3 | - | 2.6 |" in md and "sequence lengths: [1024, 300]" in md
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_nested_sdpa_peer_takes_gqa_by_repeating_heads():
    """The non-causal varlen peer runs SDPA on nested jagged tensors, which refuses GQA: its
    K/V heads are repeated first. Checked on the CPU (math backend) against the reference."""
    from torch.nn.attention import SDPBackend

    from modelaccel.attention.reference import varlen_attention_ref

    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 14, 17])
    q, k, v = (torch.randn(17, h, 16, generator=gen) for h in (4, 2, 2))
    call, context = bench._nested_sdpa_call(SDPBackend.MATH, q, k, v, cu)
    with context:
        out = call().transpose(1, 2).values()
    ref, _ = varlen_attention_ref(q.double(), k.double(), v.double(), cu.int(), cu.int())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)

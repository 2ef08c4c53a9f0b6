"""The GPU-free parts of the decoding benchmark: byte counting, paged caches, the reference,
targets, reports, a whole row on CPU with a stand-in API, and the CLI."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import modelaccel
from modelaccel.bench import decode_attention as bench
from modelaccel.cli import build_parser

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(modelaccel.__file__)))


def child_env(**extra):
    path = os.pathsep.join(filter(None, [SRC_DIR, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


# ---------------------------------------------------------------------------------------
# Bytes and shapes


def test_kv_bytes():
    # (1, 4096): 4096 tokens x 8 heads x 128 x 2 bytes, K and V: 16 MiB.
    assert bench.kv_bytes(1, 4096) == 16 * 2**20
    assert bench.kv_bytes(32, 8192) == 2**30
    assert bench.kv_bytes(2, 10, nheads_k=3, headdim=64, bytes_per_elem=4) == 2 * 10 * 3 * 64 * 4 * 2


def test_tbps():
    assert bench.tbps(3e9, 1.0) == pytest.approx(3.0)
    assert bench.tbps(3e9, None) is None


def test_suites_are_the_issues_shapes():
    assert bench.SUITES["default"] == ((1, 4096), (1, 32768), (1, 131072), (8, 4096), (32, 8192), (64, 2048),
                                       (128, 1024))
    assert len(bench.SUITES["quick"]) == 2 and bench.TARGET_CUDNN_SHAPE in bench.SUITES["quick"]
    # The quick suite also holds a row the bandwidth target applies to.
    assert any(bench.kv_bytes(b, n) >= bench.TARGET_MIN_KV_BYTES for b, n in bench.SUITES["quick"])
    assert (bench.NHEADS_Q, bench.NHEADS_K, bench.HEADDIM, bench.DTYPE, bench.PAGE_SIZES) == (32, 8, 128, "bf16",
                                                                                              (16, 256))
    # Whole pages on every row, so the paged layouts read exactly kv_bytes.
    assert all(n % p == 0 for _, n in bench.SHAPES for p in bench.PAGE_SIZES)
    assert bench.variant_names() == ["modelaccel", "modelaccel_paged16", "modelaccel_paged256", "flash", "cudnn"]


# ---------------------------------------------------------------------------------------
# Paged caches


@pytest.mark.parametrize("batch,blocks", [(1, 1), (1, 256), (8, 16), (128, 4)])
def test_block_table_is_a_permutation(batch, blocks):
    table = bench.make_block_table(batch, blocks)
    assert table.shape == (batch, blocks) and table.dtype == torch.int32
    # Every logical page has its own physical page, and every physical page is used once.
    assert sorted(table.flatten().tolist()) == list(range(batch * blocks))
    assert torch.equal(table, bench.make_block_table(batch, blocks))  # seeded: same table every run


def test_block_table_scatters_pages():
    table = bench.make_block_table(4, 64)
    assert not torch.equal(table, torch.arange(256, dtype=torch.int32).view(4, 64))
    # Consecutive logical pages are mostly not physically adjacent.
    adjacent = (table[:, 1:] == table[:, :-1] + 1).sum().item()
    assert adjacent < 10
    assert not torch.equal(bench.make_block_table(4, 64, seed=1), table)


@pytest.mark.parametrize("cache_len,page", [(64, 16), (256, 256), (50, 16), (1, 16)])
def test_paged_cache_holds_the_same_content(cache_len, page):
    torch.manual_seed(1)
    k = torch.randn(3, cache_len, 2, 8, dtype=torch.bfloat16)
    v = torch.randn(3, cache_len, 2, 8, dtype=torch.bfloat16)
    k_pages, v_pages, table = bench.build_paged_cache(k, v, page)
    blocks = -(-cache_len // page)
    assert table.shape == (3, blocks)
    assert k_pages.shape == (3 * blocks, page, 2, 8) and k_pages.dtype == torch.bfloat16
    assert torch.equal(bench.paged_to_contiguous(k_pages, table, cache_len), k)
    assert torch.equal(bench.paged_to_contiguous(v_pages, table, cache_len), v)
    # Page by page, independently of paged_to_contiguous: logical page j of sequence b is
    # physical page table[b, j].
    for b in range(3):
        for j in range(blocks):
            rows = k[b, j * page:(j + 1) * page]
            assert torch.equal(k_pages[table[b, j].item(), :rows.shape[0]], rows)


def test_to_paged_refuses_a_table_too_small():
    with pytest.raises(ValueError):
        bench.to_paged(torch.randn(2, 40, 1, 8), bench.make_block_table(2, 2), 16)


def test_make_inputs_never_zero():
    q, k, v, lens = bench.make_inputs(2, 32, 4, 2, 16, "bf16", device="cpu")
    assert q.shape == (2, 1, 4, 16) and k.shape == v.shape == (2, 32, 2, 16) and k.dtype == torch.bfloat16
    assert lens.dtype == torch.int32 and lens.tolist() == [32, 32]
    assert (k != 0).float().mean() > 0.99 and (v != 0).float().mean() > 0.99


# ---------------------------------------------------------------------------------------
# Reference


def naive_decode(q, k, v, lens):
    group = q.shape[2] // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens):
        for h in range(q.shape[2]):
            kh, vh = k[b, :n, h // group].double(), v[b, :n, h // group].double()
            if n:
                p = torch.softmax(q[b, :, h].double() @ kh.T / math.sqrt(q.shape[-1]), dim=-1)
                out[b, :, h] = p @ vh
    return out


@pytest.mark.parametrize("lens", [None, [40, 7, 0]])
def test_decode_reference(lens):
    q, k, v, full = bench.make_inputs(3, 40, 8, 2, 16, "fp16", device="cpu")
    seqlens = full if lens is None else torch.tensor(lens, dtype=torch.int32)
    out = bench.decode_reference(q, k, v, seqlens)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), naive_decode(q, k, v, seqlens.tolist()), atol=1e-5, rtol=1e-5)
    if lens is not None:
        assert (out[2] == 0).all()


# ---------------------------------------------------------------------------------------
# Targets and annotation


def fake_row(batch, cache_len, ms, errors=None, checks=None):
    """A run_row-shaped dict; ms: {variant: (plain ms, graph ms[, layers ms])}, layers ms
    the graph ms when not given."""
    nbytes = bench.kv_bytes(batch, cache_len)
    variants = bench.variant_names()
    ms_full = {v: dict(zip(bench.TIMINGS, (ms.get(v, (None, None)) + ms.get(v, (None, None))[1:])[:3]))
               for v in variants}
    return {"batch": batch, "cache_len": cache_len, "nheads_q": 32, "nheads_k": 8, "headdim": 128, "dtype": "bf16",
            "kv_bytes": nbytes, "layers": bench.graph_layers(nbytes),
            "checks": checks or {v: {"status": "ok", "max_abs_err": 1e-3, "rel_err": 2e-3, "detail": None}
                                 for v in variants},
            "ms": ms_full, "tbps": {v: {t: bench.tbps(nbytes, x) for t, x in by.items()} for v, by in ms_full.items()},
            "errors": errors or {}}


def ms_for(nbytes, tb_per_s):
    return nbytes / (tb_per_s * 1e12) * 1e3


def test_targets_on_the_cudnn_row():
    n = bench.kv_bytes(1, 4096)
    row = fake_row(1, 4096, {"modelaccel": (0.05, ms_for(n, 1.5)), "modelaccel_paged16": (0.05, ms_for(n, 1.4)),
                             "modelaccel_paged256": (0.05, ms_for(n, 1.5)), "cudnn": (0.06, ms_for(n, 0.7))})
    bench.annotate_row(row, 3.0)
    t = row["targets"]
    assert not t["read_bw"]["applies"] and t["read_bw"]["pass"] is None  # 16 MiB < 64 MiB
    assert t["vs_cudnn"]["applies"] and t["vs_cudnn"]["pass"]
    assert t["vs_cudnn"]["value"] == pytest.approx(1.5 / 0.7)
    assert t["paged"]["pass"] and t["paged"]["value"] == pytest.approx(1.5 / 1.4)
    assert row["fraction_of_read_bw"]["modelaccel"]["graph"] == pytest.approx(0.5)
    assert row["vs_cudnn"]["modelaccel"]["graph"] == pytest.approx(1.5 / 0.7)
    assert row["vs_cudnn"]["modelaccel"]["plain"] == pytest.approx(0.06 / 0.05)
    assert "cudnn" not in row["vs_cudnn"] and row["vs_cudnn"]["flash"] == {"plain": None, "graph": None,
                                                                           "layers": None}


def test_targets_are_read_on_the_layered_graph():
    n = bench.kv_bytes(8, 4096)
    # One-call graphs at 2.3 TB/s (77% of 3.0), the layered graph at 2.5 (83%).
    row = bench.annotate_row(fake_row(8, 4096, {"modelaccel": (1.0, ms_for(n, 2.3), ms_for(n, 2.5))}), 3.0)
    assert row["fraction_of_read_bw"]["modelaccel"]["graph"] == pytest.approx(2.3 / 3.0)
    assert row["targets"]["read_bw"]["pass"] and row["targets"]["read_bw"]["value"] == pytest.approx(2.5 / 3.0)
    row = bench.annotate_row(fake_row(8, 4096, {"modelaccel": (1.0, ms_for(n, 2.5), ms_for(n, 2.3))}), 3.0)
    assert not row["targets"]["read_bw"]["pass"]


def test_graph_layers_fill_well_past_l2():
    for batch, cache_len in bench.SHAPES:
        nbytes = bench.kv_bytes(batch, cache_len)
        layers = bench.graph_layers(nbytes)
        assert bench.MIN_LAYERS <= layers <= bench.MAX_LAYERS
        assert layers * nbytes >= bench.LAYER_GRAPH_BYTES


def test_targets_fail_and_missing_numbers_fail():
    n = bench.kv_bytes(8, 4096)  # 128 MiB: the bandwidth target applies
    row = fake_row(8, 4096, {"modelaccel": (1.0, ms_for(n, 2.3)), "modelaccel_paged16": (1.0, ms_for(n, 2.0)),
                             "modelaccel_paged256": (1.0, None), "cudnn": (1.0, ms_for(n, 2.0))})
    bench.annotate_row(row, 3.0)
    t = row["targets"]
    assert t["read_bw"]["applies"] and not t["read_bw"]["pass"]  # 2.3 / 3.0 = 77%
    assert t["read_bw"]["value"] == pytest.approx(2.3 / 3.0)
    assert not t["vs_cudnn"]["applies"] and t["vs_cudnn"]["pass"] is None
    # paged256 has no graph time: no number is a failure, not a pass.
    assert t["paged"]["applies"] and t["paged"]["pass"] is False and t["paged"]["value"] is None

    row = fake_row(8, 4096, {"modelaccel": (1.0, ms_for(n, 2.5)), "modelaccel_paged16": (1.0, ms_for(n, 2.2)),
                             "modelaccel_paged256": (1.0, ms_for(n, 2.6))})
    t = bench.annotate_row(row, 3.0)["targets"]
    assert t["read_bw"]["pass"]  # 83%
    assert not t["paged"]["pass"] and t["paged"]["value"] == pytest.approx(2.5 / 2.2)  # 13.6% slower
    assert "paged16 1.14x" in t["paged"]["detail"]


def test_vs_cudnn_target_fails_below_two_and_without_cudnn():
    n = bench.kv_bytes(1, 4096)
    ms = {"modelaccel": (0.05, ms_for(n, 1.0)), "cudnn": (0.05, ms_for(n, 0.6))}
    assert not bench.annotate_row(fake_row(1, 4096, ms), 3.0)["targets"]["vs_cudnn"]["pass"]
    ms["cudnn"] = (None, None)
    t = bench.annotate_row(fake_row(1, 4096, ms), 3.0)["targets"]["vs_cudnn"]
    assert t["applies"] and t["pass"] is False and t["value"] is None


def test_summarize_targets():
    n = bench.kv_bytes(8, 4096)
    good = bench.annotate_row(fake_row(8, 4096, {v: (1.0, ms_for(n, 2.9)) for v in bench.variant_names()}), 3.0)
    bad = bench.annotate_row(fake_row(8, 4096, {"modelaccel": (1.0, ms_for(n, 1.0))}), 3.0)
    summary = bench.summarize_targets([good, bad])
    assert summary["read_bw"] == {"pass": 1, "fail": 1, "rows": 2, "ok": False}
    assert summary["vs_cudnn"] == {"pass": 0, "fail": 0, "rows": 0, "ok": None}
    assert summary["paged"]["rows"] == 2 and summary["paged"]["pass"] == 1


# ---------------------------------------------------------------------------------------
# Reports


def make_result():
    n1, n2 = bench.kv_bytes(1, 4096), bench.kv_bytes(8, 4096)
    row1 = fake_row(1, 4096, {"modelaccel": (0.08, ms_for(n1, 1.6)), "modelaccel_paged16": (0.08, ms_for(n1, 1.5)),
                              "modelaccel_paged256": (0.08, ms_for(n1, 1.6)), "flash": (0.03, ms_for(n1, 0.9)),
                              "cudnn": (None, None)},
                    errors={"cudnn": {"plain": "RuntimeError: No available kernel. Aborting execution.",
                                      "graph": "RuntimeError: No available kernel. Aborting execution."}})
    checks = {v: {"status": "ok", "max_abs_err": 1e-3, "rel_err": 2e-3, "detail": None} for v in bench.variant_names()}
    checks["modelaccel_paged256"] = {"status": "mismatch", "max_abs_err": 0.5, "rel_err": 0.3, "detail": None}
    row2 = fake_row(8, 4096, {"modelaccel": (0.2, ms_for(n2, 2.7)), "modelaccel_paged16": (0.2, ms_for(n2, 2.6)),
                              "flash": (0.2, ms_for(n2, 2.0)), "cudnn": (0.2, ms_for(n2, 2.2))},
                    checks=checks, errors={"modelaccel_paged256": {"plain": "not timed: mismatch",
                                                                   "graph": "not timed: mismatch"}})
    rows = [bench.annotate_row(r, 3.0) for r in (row1, row2)]
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "compute_capability": "9.0",
            "torch": "2.13.0", "triton": "3.9.0", "cuda": "13.0", "cudnn": 91000,
            "date": "2026-12-01T08:00:00+00:00", "modelaccel_commit": "abc123", "modelaccel_dirty": False}
    bw = {"bytes": 4 * 2**30, "ms": 1.45, "tbps": 2.96}
    return {"metadata": meta, "variants": bench.variant_names(), "rows": rows,
            "read_bandwidth": {"before": bw, "after": dict(bw, tbps=3.0), "tbps": 3.0},
            "targets": bench.summarize_targets(rows)}


def test_format_row_and_header_line_up():
    result = make_result()
    header = bench.format_header()
    lines = [bench.format_row(r) for r in result["rows"]]
    assert header.split()[:4] == ["BATCH", "CACHE", "KV", "MiB"]
    first = lines[0].split()
    assert first[:3] == ["1", "4096", "16"]
    assert "1.60" in first and "53.3%" in first and "PASS" in first and "n/a" in first
    assert "-" in first  # cuDNN refused
    assert "modelaccel_paged256 mismatch" in lines[1] and "FAIL(-)" in lines[1]
    assert all(line.count("|") == header.count("|") for line in lines)
    assert all([i for i, c in enumerate(line) if c == "|"] == [i for i, c in enumerate(header) if c == "|"]
               for line in lines)


def test_format_summary():
    text = "\n".join(bench.format_summary(make_result()))
    assert "Read bandwidth: 3.00 TB/s" in text and "2.96 before the rows" in text
    assert "rows with K+V >= 64 MiB): PASS, 1/1 rows" in text  # (8, 4096): 2.7 / 3.0 = 90%
    assert "2x cuDNN at (batch, cache_len) = (1, 4096) (contiguous, layered graph replay): FAIL, 0/1 rows" in text
    assert "contiguous, every page size (layered graph replay): FAIL, 1/2 rows" in text


def test_write_results(tmp_path):
    result = make_result()
    paths = bench.write_results(result, str(tmp_path / "out"))
    stem = "decode_attention_nvidia-h100-80gb-hbm3_2026-12-01"
    assert paths["json"] == str(tmp_path / "out" / f"{stem}.json")
    assert json.loads(open(paths["json"]).read()) == result
    md = open(paths["md"]).read()
    assert md.startswith("# Decoding attention (flash_attn_with_kvcache), NVIDIA H100 80GB HBM3")
    assert "- modelaccel_commit: abc123" in md
    assert "| BATCH | CACHE_LEN | K+V MiB | LAYERS | modelaccel plain | modelaccel graph | modelaccel layers |" in md
    assert ("| 1 | 4096 | 16 | 32 | 0.21 | 1.60 | 1.60 | 0.21 | 1.50 | 1.50 | 0.21 | 1.60 | 1.60 | 0.56 | 0.90 | 0.90 "
            "| - | - | - |") in md
    assert "| 8 | 4096 | 53.3% |" not in md and "| 1 | 4096 | 53.3% | 53.3% | 50.0% | 50.0% | 53.3% | 53.3% |" in md
    assert "(1, 4096) cudnn plain: RuntimeError: No available kernel" in md
    assert "(8, 4096) modelaccel_paged256 check mismatch: max abs err 5.000e-01" in md
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_results_tag_and_no_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = bench.write_results(make_result(), str(tmp_path), tag="quick")
    assert paths["png"] is None
    assert paths["json"].endswith("decode_attention_nvidia-h100-80gb-hbm3_2026-12-01_quick.json")
    assert "skipping the plot" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# A whole row on CPU: a stand-in for flash_attn_with_kvcache, stub timers


def standin_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None, causal=False, **kwargs):
    """flash_attn_with_kvcache's semantics for seqlen_q = 1 from the reference (no kernel)."""
    if block_table is not None:
        k_cache = bench.paged_to_contiguous(k_cache, block_table, block_table.shape[1] * k_cache.shape[1])
        v_cache = bench.paged_to_contiguous(v_cache, block_table, block_table.shape[1] * v_cache.shape[1])
    return bench.decode_reference(q, k_cache, v_cache, cache_seqlens).to(q.dtype)


@pytest.fixture
def cpu_row(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "time_plain", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "time_graph", lambda fn: (fn(), 0.5)[1])

    def layered(make, layers):  # every layer's call held at once, as the real timer's graph holds them
        calls = [make(i) for i in range(layers)]
        return ([call() for call in calls], 0.25)[1]
    monkeypatch.setattr(bench, "time_graph_layers", layered)

    def run(api, **kwargs):
        monkeypatch.setattr(bench, "_kvcache_api", api)
        return bench.run_row(3, 48, nheads_q=4, nheads_k=2, headdim=32, page_sizes=(16,), log=print, **kwargs)
    return run


def test_run_row_on_cpu(cpu_row):
    row = cpu_row(lambda: standin_kvcache)
    assert row["kv_bytes"] == bench.kv_bytes(3, 48, 2, 32)
    assert set(row["ms"]) == {"modelaccel", "modelaccel_paged16", "flash", "cudnn"}
    for variant in ("modelaccel", "modelaccel_paged16", "flash"):
        assert row["checks"][variant]["status"] == "ok", row
        assert row["ms"][variant] == {"plain": 1.0, "graph": 0.5, "layers": 0.25}
        assert row["tbps"][variant]["graph"] == pytest.approx(bench.tbps(row["kv_bytes"], 0.5))
    assert row["layers"] == bench.graph_layers(row["kv_bytes"])
    # CPU torch has no cuDNN: its number is null with the reason.
    assert row["ms"]["cudnn"] == {"plain": None, "graph": None, "layers": None}
    assert row["checks"]["cudnn"]["status"] == "error" and row["errors"]["cudnn"]["graph"]
    json.dumps(bench.annotate_row(row, 3.0))


def test_run_row_does_not_time_a_mismatch(cpu_row):
    def wrong(q, k_cache, v_cache, block_table=None, **kwargs):
        out = standin_kvcache(q, k_cache, v_cache, block_table=block_table, **kwargs)
        return out * 1.1 if block_table is not None else out  # only the paged layout is wrong

    row = cpu_row(lambda: wrong)
    assert row["checks"]["modelaccel"]["status"] == "ok" and row["ms"]["modelaccel"]["plain"] == 1.0
    assert row["checks"]["modelaccel_paged16"]["status"] == "mismatch"
    assert row["ms"]["modelaccel_paged16"] == {"plain": None, "graph": None, "layers": None}
    assert row["errors"]["modelaccel_paged16"]["graph"].startswith("not timed: mismatch")


def test_run_row_without_the_api_still_times_the_peers(cpu_row):
    def missing():
        raise ImportError("cannot import name 'flash_attn_with_kvcache'")

    row = cpu_row(missing)
    assert row["checks"]["modelaccel"]["status"] == "error"
    assert "flash_attn_with_kvcache" in row["checks"]["modelaccel"]["detail"]
    assert row["ms"]["modelaccel_paged16"]["graph"] is None and row["ms"]["flash"]["graph"] == 0.5


def test_graph_failure_costs_only_that_number(cpu_row, monkeypatch):
    def no_capture(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "time_graph", no_capture)
    row = cpu_row(lambda: standin_kvcache)
    assert row["ms"]["modelaccel"] == {"plain": 1.0, "graph": None, "layers": 0.25}
    assert "operation not permitted when stream is capturing" in row["errors"]["modelaccel"]["graph"]


def test_each_layer_of_the_layered_graph_reads_its_own_cache(cpu_row):
    seen = []

    def recording(q, k_cache, v_cache, block_table=None, **kwargs):
        seen.append((block_table is not None, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()))
        return standin_kvcache(q, k_cache, v_cache, block_table=block_table, **kwargs)

    row = cpu_row(lambda: recording)
    assert row["checks"]["modelaccel"]["status"] == "ok"
    contiguous = [ptrs for paged, *ptrs in seen if not paged]
    # The check, plain, one-call graph (layer 0's inputs), then every layer once.
    layered = contiguous[-row["layers"]:]
    assert len({ptr for ptrs in layered for ptr in ptrs}) == 3 * row["layers"]
    assert layered[0] == contiguous[0]


# ---------------------------------------------------------------------------------------
# CLI and self-check


def test_cli_help_and_arguments():
    proc = subprocess.run([sys.executable, "-m", "modelaccel", "bench", "decode-attention", "--help"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--suite" in proc.stdout and "paged" in proc.stdout and "CUDA graph" in proc.stdout
    args = build_parser().parse_args(["bench", "decode-attention"])
    assert (args.suite, args.out, args.read_gib) == ("default", os.path.join("benchmarks", "results"), 4)
    args = build_parser().parse_args(["bench", "decode-attention", "--suite", "quick", "--out", "x",
                                      "--read-gib", "2"])
    assert (args.suite, args.out, args.read_gib) == ("quick", "x", 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "decode-attention", "--suite", "huge"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark runs")
def test_cli_without_gpu_or_api_says_so_and_exits_0():
    script = ("import sys, modelaccel\n"
              "if hasattr(modelaccel, 'flash_attn_with_kvcache'):\n"
              "    del modelaccel.flash_attn_with_kvcache\n"
              "from modelaccel.cli import main\n"
              "sys.exit(main(['bench', 'decode-attention']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA GPU found" in proc.stdout and "not available" in proc.stdout


def test_selfcheck_fails_when_no_kernel_runs():
    # Right numbers from the reference must not pass: the check is that a Triton kernel ran.
    script = ("import sys, modelaccel\n"
              "from modelaccel.bench import decode_attention as d\n"
              "def standin(q, k, v, cache_seqlens=None, block_table=None, **kw):\n"
              "    if block_table is not None:\n"
              "        n = block_table.shape[1] * k.shape[1]\n"
              "        k, v = d.paged_to_contiguous(k, block_table, n), d.paged_to_contiguous(v, block_table, n)\n"
              "    return d.decode_reference(q, k, v, cache_seqlens).to(q.dtype)\n"
              "modelaccel.flash_attn_with_kvcache = standin\n"
              "sys.exit(d.selfcheck_main())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=child_env(TRITON_INTERPRET="1"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PASS" not in proc.stdout and "no Triton kernel launched" in proc.stdout
    assert proc.stdout.count("FAIL") == len(bench.SELFCHECK_CASES)


def test_selfcheck_refuses_to_run_without_interpreter():
    proc = subprocess.run([sys.executable, "-m", "modelaccel.bench.decode_attention"], capture_output=True,
                          text=True, env=child_env(TRITON_INTERPRET="0"), timeout=120)
    assert proc.returncode == 1 and "TRITON_INTERPRET=1" in proc.stdout


def test_run_benchmark_on_cpu(cpu_row, monkeypatch):
    monkeypatch.setattr(bench, "_kvcache_api", lambda: standin_kvcache)
    monkeypatch.setattr(bench, "collect_metadata", lambda: make_result()["metadata"])
    bandwidths = iter([2.9, 3.1])
    monkeypatch.setattr(bench, "measure_read_bandwidth",
                        lambda gib: {"bytes": gib * 2**30, "ms": 1.0, "tbps": next(bandwidths)})
    lines = []
    result = bench.run_benchmark(((1, 64), (2, 32)), page_sizes=(16,), read_gib=1, log=lines.append)
    assert result["read_bandwidth"]["tbps"] == 3.1  # the larger of before and after
    assert [(r["batch"], r["cache_len"]) for r in result["rows"]] == [(1, 64), (2, 32)]
    row = result["rows"][0]
    assert row["fraction_of_read_bw"]["modelaccel"]["graph"] == pytest.approx(bench.tbps(row["kv_bytes"], 0.5) / 3.1)
    assert set(result["targets"]) == set(bench.TARGETS) and result["targets"]["paged"]["rows"] == 2
    assert lines[0].startswith("read bandwidth") and lines[1] == bench.format_header((16,))
    json.dumps(result)


def test_cli_writes_results_and_fails_on_a_mismatch(tmp_path, monkeypatch, capsys):
    from modelaccel import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_benchmark", lambda shapes, read_gib, log: make_result())
    args = build_parser().parse_args(["bench", "decode-attention", "--suite", "quick", "--out", str(tmp_path)])
    assert cli.cmd_bench_decode_attention(args) == 1  # make_result's paged256 mismatch
    out = capsys.readouterr().out
    assert "FAILED" in out and "(8, 4096) modelaccel_paged256: mismatch" in out
    assert (tmp_path / "decode_attention_nvidia-h100-80gb-hbm3_2026-12-01_quick.md").exists()

"""The training check at toy size: both attention functions train the same model the same way."""

import math

import pytest
import torch

from modelaccel.bench import train_check

TINY = dict(steps=5, seq=32, batch=2, d_model=64, n_layers=2, n_heads=2, vocab=64, dtype=torch.float16,
            device="cpu", seed=0)


def test_markov_data_is_seeded_and_learnable():
    a, entropy = train_check.markov_batches(3, 2, 16, 64, seed=1, device="cpu")
    b, _ = train_check.markov_batches(3, 2, 16, 64, seed=1, device="cpu")
    c, _ = train_check.markov_batches(3, 2, 16, 64, seed=2, device="cpu")
    assert a.shape == (3, 2, 17) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() < 64
    # A few likely successors per token: the loss floor is far below guessing.
    assert entropy < 0.5 * math.log(64)


def test_attention_functions_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 32, 2, 32, dtype=torch.float16) for _ in range(3))
    ref = train_check.sdpa_attention(q, k, v).float()
    out = train_check.modelaccel_attention(q, k, v).float()
    assert out.shape == (2, 32, 2, 32)
    assert (out - ref).abs().max().item() < 2e-3


def test_tiny_training_matches_sdpa():
    # Runs modelaccel's forward and backward kernels in the Triton interpreter: ~10 s.
    sdpa = train_check.run_training("sdpa", **TINY)
    mine = train_check.run_training("modelaccel", **TINY)
    assert len(sdpa["losses"]) == len(mine["losses"]) == 5
    assert all(math.isfinite(x) for x in sdpa["losses"] + mine["losses"])
    assert sdpa["losses"][0] == pytest.approx(mine["losses"][0], abs=1e-4)  # same init, same data
    summary = train_check.compare_runs(sdpa, mine)
    assert summary["max_abs_loss_diff"] < 1e-2, summary
    for run in (sdpa, mine):
        assert run["losses"][-1] < run["losses"][0] - 0.1  # it learns
    assert mine["mean_step_ms"] > 0 and mine["warmup_steps"] == 1


def test_run_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attn"):
        train_check.run_training("xformers", **TINY)
    with pytest.raises(ValueError, match="multiple"):
        train_check.run_training("sdpa", **dict(TINY, n_heads=3))


def test_main_writes_json_and_png(tmp_path, monkeypatch):
    monkeypatch.setitem(train_check.CPU_CONFIG, "n_layers", 1)
    if torch.cuda.is_available():
        pytest.skip("with a GPU, main runs the full-size check")
    assert train_check.main(steps=2, out_dir=str(tmp_path)) == 0
    (json_path,) = tmp_path.glob("train_check_cpu_*.json")
    import json

    result = json.loads(json_path.read_text())
    assert set(result["runs"]) == {"sdpa", "modelaccel"} and len(result["runs"]["sdpa"]["losses"]) == 2
    assert "max_abs_loss_diff" in result["summary"]
    assert list(tmp_path.glob("train_check_cpu_*.png"))

"""The `modelaccel` command line, run the way a user runs it: in a child process."""

import os
import subprocess
import sys

import pytest
import torch

import modelaccel
from modelaccel.cli import build_parser

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(modelaccel.__file__)))


def run_cli(*args, timeout=300):
    # The child must import the same modelaccel as this process, installed or not.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [SRC_DIR, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "modelaccel", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_info_prints_versions():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert f"torch: {torch.__version__}" in proc.stdout
    for key in ("modelaccel:", "python:", "triton:", "cuDNN:", "TRITON_INTERPRET:", "CUDA available:"):
        assert key in proc.stdout
    if torch.cuda.is_available():
        assert "SM count:" in proc.stdout and "SDPA flash:" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, bench attention runs the full benchmark")
def test_bench_attention_without_gpu_runs_interpreter_selfcheck():
    proc = run_cli("bench", "attention")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No CUDA GPU found" in proc.stdout
    assert "Triton interpreter" in proc.stdout
    assert "FAIL" not in proc.stdout
    # The fp16 cases always run; bf16 ones only where the interpreter supports bf16 dots.
    assert proc.stdout.count("PASS") >= 4


def test_selfcheck_refuses_to_run_without_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [SRC_DIR, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "modelaccel.bench.selfcheck"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1
    assert "TRITON_INTERPRET=1" in proc.stdout


def test_bench_attention_arguments():
    args = build_parser().parse_args(["bench", "attention", "--dtype", "bf16", "--causal", "--headdim", "64",
                                      "--suite", "quick", "--out", "x", "--providers", "modelaccel,cudnn"])
    assert (args.dtype, args.causal, args.headdim, args.suite, args.out) == ("bf16", True, 64, "quick", "x")
    assert args.providers == ["modelaccel", "cudnn"]
    defaults = build_parser().parse_args(["bench", "attention"])
    assert defaults.providers == ["modelaccel", "flash", "cudnn"]
    assert defaults.out == os.path.join("benchmarks", "results")


@pytest.mark.parametrize("argv", [["bench", "attention", "--providers", "modelaccel,xformers"],
                                  ["bench", "attention", "--dtype", "fp32"],
                                  ["bench"], []])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2

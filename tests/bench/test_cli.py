"""The `modelaccel` command line, run the way a user runs it: in a child process."""

import os
import subprocess
import sys

import pytest
import torch

import modelaccel
from modelaccel.cli import _result_tag, build_parser, resolve_providers

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(modelaccel.__file__)))


def child_env(**extra):
    # The child must import the same modelaccel as this process, installed or not.
    path = os.pathsep.join(filter(None, [SRC_DIR, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "modelaccel", *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout)


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
    assert proc.stdout.count("PASS") == 6


def test_selfcheck_refuses_to_run_without_interpreter():
    proc = subprocess.run([sys.executable, "-m", "modelaccel.bench.selfcheck"], capture_output=True, text=True,
                          env=child_env(TRITON_INTERPRET="0"), timeout=120)
    assert proc.returncode == 1
    assert "TRITON_INTERPRET=1" in proc.stdout


def test_bench_attention_arguments():
    args = build_parser().parse_args(["bench", "attention", "--dtype", "bf16", "--causal", "--headdim", "64",
                                      "--suite", "quick", "--out", "x", "--providers", "modelaccel,cudnn"])
    assert (args.dtype, args.causal, args.headdim, args.suite, args.out) == ("bf16", True, 64, "quick", "x")
    assert args.providers == ["modelaccel", "cudnn"]
    defaults = build_parser().parse_args(["bench", "attention"])
    assert resolve_providers(defaults) == ["modelaccel", "flash", "cudnn"]
    assert (defaults.mode, defaults.varlen) == ("fwd", False)
    assert defaults.out == os.path.join("benchmarks", "results")


def test_bench_attention_modes_and_providers():
    bwd = build_parser().parse_args(["bench", "attention", "--mode", "bwd", "--suite", "quick"])
    assert (bwd.mode, bwd.varlen, bwd.suite) == ("bwd", False, "quick")
    assert resolve_providers(bwd) == ["modelaccel", "flash", "cudnn"]
    varlen = build_parser().parse_args(["bench", "attention", "--varlen"])
    assert resolve_providers(varlen) == ["modelaccel", "flash", "cudnn", "flash_varlen"]
    narrowed = build_parser().parse_args(["bench", "attention", "--varlen", "--providers", "modelaccel,flash_varlen"])
    assert resolve_providers(narrowed) == ["modelaccel", "flash_varlen"]
    wrong = build_parser().parse_args(["bench", "attention", "--providers", "flash_varlen"])
    with pytest.raises(ValueError, match="only with --varlen"):
        resolve_providers(wrong)


def test_result_tags_do_not_collide():
    tag = lambda *argv: _result_tag(build_parser().parse_args(["bench", "attention", *argv]))
    assert tag() == "" and tag("--mode", "bwd") == "" and tag("--varlen") == ""
    assert tag("--suite", "quick", "--mode", "bwd") == "quick"
    assert tag("--varlen", "--causal") == "causal"
    assert tag("--mode", "bwd", "--dtype", "fp16") == "fp16_d128"
    assert tag("--causal") == "fp16_d128_causal"


@pytest.mark.parametrize("argv", [["bench", "attention", "--providers", "modelaccel,xformers"],
                                  ["bench", "attention", "--dtype", "fp32"],
                                  ["bench", "attention", "--mode", "both"],
                                  ["bench"], []])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_selfcheck_fails_when_the_pytorch_fallback_answers():
    # Right numbers from the reference must not pass: the check is that the kernel ran.
    script = ("import sys, modelaccel\n"
              "from modelaccel.attention.reference import attention_ref\n"
              "modelaccel.flash_attn_func = lambda q, k, v, causal: attention_ref(q, k, v, causal=causal)[0]\n"
              "from modelaccel.bench import selfcheck\n"
              "sys.exit(selfcheck.main())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=child_env(TRITON_INTERPRET="1"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "PASS" not in proc.stdout
    assert "no Triton kernel launched" in proc.stdout

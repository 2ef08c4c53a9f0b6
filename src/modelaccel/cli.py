"""The `modelaccel` command line (also `python -m modelaccel`).

    modelaccel info                 versions, GPU and SDPA backend facts
    modelaccel bench attention      forward attention benchmark on a GPU; without one, the
                                    Triton-interpreter self-check on CPU
"""

import argparse
import os
import platform
import subprocess
import sys


def _modelaccel_version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelaccel")
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
        return "not installed (source tree)"


def _sdpa_backend_status(backend):
    """Whether SDPA can run `backend` here: a tiny real call says more than the flags alone
    (build options, cuDNN version and device capability all decide it)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        return f"not usable ({str(e).strip().splitlines()[0]})"
    return "usable"


def info_lines():
    """Lines of `modelaccel info`; never needs a GPU and tolerates a missing Triton."""
    import torch

    lines = [
        f"modelaccel: {_modelaccel_version()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__} (CUDA build {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except ImportError as e:
        lines.append(f"triton: not available ({e})")
    lines.append(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}")
    lines.append(f"cuDNN: {torch.backends.cudnn.version()}")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA available: {cuda}")
    if not cuda:
        return lines
    from torch.nn.attention import SDPBackend

    props = torch.cuda.get_device_properties(0)
    lines += [
        f"GPU: {props.name} ({torch.cuda.device_count()} visible)",
        f"SM count: {props.multi_processor_count}",
        f"compute capability: {props.major}.{props.minor}",
        f"GPU memory: {props.total_memory / 2**30:.1f} GiB",
        f"SDPA flash: enabled={torch.backends.cuda.flash_sdp_enabled()}, "
        f"{_sdpa_backend_status(SDPBackend.FLASH_ATTENTION)}",
        f"SDPA cuDNN: enabled={torch.backends.cuda.cudnn_sdp_enabled()}, "
        f"{_sdpa_backend_status(SDPBackend.CUDNN_ATTENTION)}",
    ]
    return lines


def cmd_info(args):
    print("\n".join(info_lines()))
    return 0


def run_selfcheck():
    """Run modelaccel.bench.selfcheck in a child process with TRITON_INTERPRET=1; its exit code.

    A child process because Triton reads TRITON_INTERPRET when kernels are defined, which
    in this process already happened (or not) when modelaccel was imported.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "modelaccel.bench.selfcheck"], env=env).returncode


def _providers(text):
    from modelaccel.bench.attention import PROVIDERS

    providers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise argparse.ArgumentTypeError(f"providers must be a comma list of {', '.join(PROVIDERS)}; got {text!r}")
    return providers


def _result_tag(args):
    """File-name tag so a quick or narrowed run does not overwrite the day's full results."""
    parts = [] if args.suite == "default" else [args.suite]
    if args.dtype or args.causal or args.headdim:
        parts += [args.dtype or "fp16", f"d{args.headdim or 128}", "causal" if args.causal else "noncausal"]
    return "_".join(parts)


def cmd_bench_attention(args):
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU found: skipping the benchmark and running the Triton-interpreter self-check on CPU.",
              flush=True)
        return run_selfcheck()

    from modelaccel.bench.attention import make_tables, run_benchmark
    from modelaccel.bench.report import format_table, write_results

    tables = make_tables(args.suite, args.dtype, args.causal, args.headdim)
    result = run_benchmark(tables, args.providers, log=lambda line: print(line, flush=True))
    print()
    for table in result["tables"]:
        print(format_table(table, result["providers"]))
        print()
    paths = write_results(result, args.out, tag=_result_tag(args))
    for path in paths.values():
        if path:
            print(f"wrote {path}")
    statuses = [row["check"]["status"] for t in result["tables"] for row in t["rows"] if row["check"]]
    if any(s in ("mismatch", "error") for s in statuses):
        print("FAILED: modelaccel disagreed with SDPA or errored on some rows (see 'check' above)")
        return 1
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="modelaccel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print versions, GPU and SDPA backend facts")
    info.set_defaults(func=cmd_info)

    bench = commands.add_parser("bench", help="run a benchmark")
    targets = bench.add_subparsers(dest="target", required=True)
    attn = targets.add_parser(
        "attention", help="forward attention: modelaccel vs SDPA flash/cuDNN (CPU: interpreter self-check)",
        description="Forward attention benchmark on a CUDA GPU. Without --dtype/--causal/--headdim the "
                    "suite's tables run (default: fp16 d128, bf16 d128 causal, fp16 d64); with any of them, "
                    "one table with that setting over the suite's shapes. Without a GPU, runs the "
                    "Triton-interpreter self-check instead.")
    attn.add_argument("--dtype", choices=("fp16", "bf16"), help="one table in this dtype (default fp16)")
    attn.add_argument("--causal", action="store_true", help="one causal table (square and GQA shapes)")
    attn.add_argument("--headdim", type=int, help="one table with this head dim (default 128)")
    attn.add_argument("--suite", choices=("default", "quick"), default="default",
                      help="default: the full tables; quick: a few rows for smoke tests")
    attn.add_argument("--out", default=os.path.join("benchmarks", "results"),
                      help="directory for the JSON, markdown and PNG results (default: benchmarks/results)")
    attn.add_argument("--providers", type=_providers, default=["modelaccel", "flash", "cudnn"],
                      help="comma list of modelaccel, flash, cudnn (default: all three)")
    attn.set_defaults(func=cmd_bench_attention)
    return parser


def main(argv=None):
    """Entry point of the `modelaccel` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)

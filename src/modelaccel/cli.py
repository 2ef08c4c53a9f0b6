"""The `modelaccel` command line (also `python -m modelaccel`).

    modelaccel info                 versions, GPU and SDPA backend facts
    modelaccel bench attention      forward attention benchmark on a GPU; without one, the
                                    Triton-interpreter self-check on CPU
        --mode bwd                  the backward pass instead
        --varlen                    variable-length batches (flash_attn_varlen_func)
    modelaccel bench train          train a small GPT with SDPA and with modelaccel attention,
                                    compare loss curves and step times (CPU: a tiny version)
    modelaccel bench decode-attention
                                    flash_attn_with_kvcache (contiguous and paged caches) vs SDPA,
                                    in TB/s of K+V read against the measured read bandwidth
    modelaccel bench transformers   Llama-3-8B-shaped model (random bf16 weights): time to first
                                    token and training step with modelaccel, SDPA and eager attention
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
    from modelaccel.bench.attention import ALL_PROVIDERS

    providers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in providers if p not in ALL_PROVIDERS]
    if unknown or not providers:
        raise argparse.ArgumentTypeError(f"providers must be a comma list of {', '.join(ALL_PROVIDERS)}; "
                                         f"got {text!r}")
    return providers


def resolve_providers(args):
    """The providers a bench run uses: --providers, else every provider of the mode.

    Raises ValueError for flash_varlen outside --varlen (it has no fixed-length form).
    """
    from modelaccel.bench.attention import PROVIDERS, VARLEN_PROVIDERS

    mode = _bench_mode(args)
    if args.providers is None:
        return list(VARLEN_PROVIDERS if mode == "varlen" else PROVIDERS)
    if mode != "varlen" and "flash_varlen" in args.providers:
        raise ValueError("the flash_varlen provider exists only with --varlen")
    return list(args.providers)


def _result_tag(args):
    """File-name tag so a quick or narrowed run does not overwrite the day's full results."""
    parts = [] if args.suite == "default" else [args.suite]
    mode = _bench_mode(args)
    if mode == "fwd":
        if args.dtype or args.causal or args.headdim:
            parts += [args.dtype or "fp16", f"d{args.headdim or 128}", "causal" if args.causal else "noncausal"]
    else:
        # The backward and varlen files have their own prefix; their default table is bf16 d128.
        if args.dtype or args.headdim:
            parts += [args.dtype or "bf16", f"d{args.headdim or 128}"]
        if mode == "varlen" and args.causal:
            parts.append("causal")
    return "_".join(parts)


def _bench_mode(args):
    """"fwd", "bwd" or "varlen" from --mode and --varlen (namespaces without them: "fwd")."""
    return "varlen" if getattr(args, "varlen", False) else getattr(args, "mode", "fwd")


def cmd_bench_attention(args):
    import torch

    mode = _bench_mode(args)
    if args.varlen and args.mode == "bwd":
        print("--varlen times the forward pass only; run --mode bwd and --varlen separately", flush=True)
        return 2
    try:
        providers = resolve_providers(args)
    except ValueError as e:
        print(e, flush=True)
        return 2
    if mode == "bwd" and args.causal:
        print("--causal has no effect with --mode bwd: the backward tables are always causal", flush=True)
    if not torch.cuda.is_available():
        what = {"fwd": "the benchmark", "bwd": "the backward benchmark", "varlen": "the varlen benchmark"}[mode]
        print(f"No CUDA GPU found: skipping {what} and running the Triton-interpreter self-check on CPU "
              "(it checks the forward kernel).", flush=True)
        return run_selfcheck()

    from modelaccel.bench.attention import make_tables, run_benchmark
    from modelaccel.bench.report import format_table, write_results

    tables = make_tables(args.suite, args.dtype, args.causal, args.headdim, mode=mode)
    result = run_benchmark(tables, providers, log=lambda line: print(line, flush=True))
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


def _kvcache_api_available():
    """Whether modelaccel.flash_attn_with_kvcache exists (it lands with issue 4)."""
    try:
        from modelaccel import flash_attn_with_kvcache  # noqa: F401
    except ImportError:
        return False
    return True


def run_decode_selfcheck():
    """The decode self-check in a child process with TRITON_INTERPRET=1 (see run_selfcheck)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "modelaccel.bench.decode_attention"], env=env).returncode


def cmd_bench_decode_attention(args):
    import torch

    if not torch.cuda.is_available():
        if not _kvcache_api_available():
            print("No CUDA GPU found: skipping the decoding benchmark. modelaccel.flash_attn_with_kvcache is not "
                  "available in this version, so there is no CPU check to run either.", flush=True)
            return 0
        print("No CUDA GPU found: skipping the decoding benchmark and running the decode self-check on CPU "
              "(flash_attn_with_kvcache in the Triton interpreter).", flush=True)
        return run_decode_selfcheck()

    from modelaccel.bench import decode_attention as bench

    log = lambda line: print(line, flush=True)  # noqa: E731
    result = bench.run_benchmark(bench.SUITES[args.suite], read_gib=args.read_gib, log=log)
    print()
    for line in bench.format_summary(result):
        print(line)
    paths = bench.write_results(result, args.out, tag="" if args.suite == "default" else args.suite)
    for path in paths.values():
        if path:
            print(f"wrote {path}")
    bad = [f"({r['batch']}, {r['cache_len']}) {v}: {c['status']}" for r in result["rows"]
           for v, c in r["checks"].items() if v.startswith("modelaccel") and c["status"] != "ok"]
    if bad:
        print("FAILED: modelaccel disagreed with the float32 reference or errored: " + "; ".join(bad))
        return 1
    return 0


def cmd_bench_train(args):
    from modelaccel.bench import train_check

    return train_check.main(steps=args.steps, out_dir=args.out)


def run_transformers_smoke():
    """The Transformers benchmark's CPU smoke test in a child process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "modelaccel.bench.transformers_bench"], env=env).returncode


def cmd_bench_transformers(args):
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU found: skipping the Transformers benchmark and running a tiny CPU smoke test of it "
              "(a 2-layer Llama, attention kernels in the Triton interpreter).", flush=True)
        return run_transformers_smoke()
    from modelaccel.bench import transformers_bench

    return transformers_bench.main(suite=args.suite, out_dir=args.out, generate=not args.no_generate)


def _add_out_argument(parser, files):
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help=f"directory for the {files} results (default: benchmarks/results)")


def build_parser():
    parser = argparse.ArgumentParser(prog="modelaccel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="print versions, GPU and SDPA backend facts")
    info.set_defaults(func=cmd_info)

    bench = commands.add_parser("bench", help="run a benchmark")
    targets = bench.add_subparsers(dest="target", required=True)
    attn = targets.add_parser(
        "attention", help="attention: modelaccel vs SDPA flash/cuDNN (CPU: interpreter self-check)",
        description="Attention benchmark on a CUDA GPU. Forward (default): without --dtype/--causal/--headdim "
                    "the suite's tables run (default: fp16 d128, bf16 d128 causal, fp16 d64); with any of them, "
                    "one table with that setting over the suite's shapes. --mode bwd: the backward pass, "
                    "causal, bf16 d128 unless --dtype/--headdim. --varlen: batches of random-length sequences "
                    "through flash_attn_varlen_func, causal and non-causal tables (--causal: causal only). "
                    "Without a GPU, runs the Triton-interpreter self-check instead.")
    attn.add_argument("--dtype", choices=("fp16", "bf16"), help="one table in this dtype (default fp16)")
    attn.add_argument("--causal", action="store_true", help="one causal table (square and GQA shapes)")
    attn.add_argument("--headdim", type=int, help="one table with this head dim (default 128)")
    attn.add_argument("--mode", choices=("fwd", "bwd"), default="fwd",
                      help="fwd: the forward pass (default); bwd: the backward pass alone")
    attn.add_argument("--varlen", action="store_true",
                      help="variable-length batches: flash_attn_varlen_func against SDPA on the padded batch")
    attn.add_argument("--suite", choices=("default", "quick"), default="default",
                      help="default: the full tables; quick: a few rows for smoke tests")
    _add_out_argument(attn, "JSON, markdown and PNG")
    attn.add_argument("--providers", type=_providers, default=None,
                      help="comma list of modelaccel, flash, cudnn, and with --varlen flash_varlen "
                           "(default: all of the mode's)")
    attn.set_defaults(func=cmd_bench_attention)

    train = targets.add_parser(
        "train", help="train a small GPT with SDPA and with modelaccel attention; compare losses and step times",
        description="Trains the same small GPT-style decoder twice from the same seed (same init, same "
                    "synthetic Markov-chain data), once with SDPA attention and once with "
                    "modelaccel.flash_attn_func, and compares the loss curves and step times. Needs a CUDA "
                    "GPU for the real run; without one, says so and runs a tiny version on CPU with the "
                    "Triton interpreter.")
    train.add_argument("--steps", type=int, default=None, help="training steps per run (GPU default 300)")
    _add_out_argument(train, "JSON and PNG")
    train.set_defaults(func=cmd_bench_train)

    decode = targets.add_parser(
        "decode-attention",
        help="decoding attention: flash_attn_with_kvcache vs SDPA flash/cuDNN, TB/s of K+V read",
        description="Decoding (one query token) with flash_attn_with_kvcache on a CUDA GPU: bf16, 32 query heads "
                    "over 8 KV heads, head dim 128, (batch, cache length) from (1, 4096) to (1, 131072) and "
                    "(128, 1024); contiguous and paged caches (pages of 16 and 256). Reports K+V bytes read per "
                    "second against the read bandwidth measured in the same run, timed with plain launches and "
                    "with CUDA graph replay, next to SDPA's flash and cuDNN backends, and the issue's targets as "
                    "pass/fail. Without a GPU: says so and, if flash_attn_with_kvcache exists, runs a small CPU "
                    "check of it in the Triton interpreter.")
    decode.add_argument("--suite", choices=("default", "quick"), default="default",
                        help="default: all 7 shapes; quick: (1, 4096) and (8, 4096)")
    _add_out_argument(decode, "JSON, markdown and PNG")
    decode.add_argument("--read-gib", type=int, default=4,
                        help="GiB of bf16 summed to measure the read bandwidth (default 4)")
    decode.set_defaults(func=cmd_bench_decode_attention)

    hf = targets.add_parser(
        "transformers",
        help="Llama-3-8B-shaped Transformers model: time to first token and training step, modelaccel vs SDPA/eager",
        description="A Llama-3-8B-shaped LlamaForCausalLM with random bf16 weights on one CUDA GPU, its attention "
                    "switched between attn_implementation modelaccel, sdpa and eager. Times the first token (one "
                    "forward over prompts of 512, 2048, 8192 tokens at batch 1 and 8) and a training step "
                    "(forward + backward, sequence 4096, batch 1; fewer layers if the full model does not fit). "
                    "Out-of-memory rows are recorded without a number. Prints a table with modelaccel/SDPA time "
                    "ratios and the targets as pass/fail, writes transformers_<device>_<date>.{json,md,png}. "
                    "Without a GPU: says so and runs a tiny CPU smoke test.")
    hf.add_argument("--suite", choices=("default", "quick"), default="default",
                    help="default: all 6 TTFT rows and the training step; quick: 512 tokens at batch 1 and the "
                         "training step with 2 layers")
    hf.add_argument("--no-generate", action="store_true",
                    help="leave out the generate rows (no target; ~5 minutes on an H200): "
                         "benchmarks/generate_rows.py runs them alone")
    _add_out_argument(hf, "JSON, markdown and PNG")
    hf.set_defaults(func=cmd_bench_transformers)
    return parser


def main(argv=None):
    """Entry point of the `modelaccel` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)

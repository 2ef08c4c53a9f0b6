"""Do the GEMMs around our attention run slower, and is it the GPU's clock?

The 4-layer training profile at b586605 (profile_transformers.py train1x4096) put our
attention forward and backward ahead of cuDNN's (1.137 + 3.32 ms against 1.150 + 3.58 ms
with its helper kernels), yet the step 1.9% behind, and the difference sat in the forward's
GEMMs (+1.6 ms in two nvjet kernels that are the same code for both providers). This runs
the full Llama-3-8B-shaped model's rows in rounds that alternate which provider goes first
(ABBA), and per provider and round records
  - ms by CUDA events: the call, and for the training step its forward and backward parts,
  - the SM clock and power draw sampled every ~20 ms while a block of calls runs (NVML
    through pynvml where installed, else nvidia-smi),
  - from one profiled call: GPU ms per kernel class (gemm: cuBLAS nvjet/gemm/cutlass;
    attention: ours or cuDNN's/flash; other).
If the GEMMs slow down only next to our kernel while the clock stays level, the cause is
not power; if the clock drops in our blocks, the rows measure the power controller.
Usage: python benchmarks/clock_probe.py OUT.json [ROW ...]   ROW: ttft:BATCHxSEQLEN or train:SEQLEN
"""

import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from modelaccel.bench.transformers_bench import (build_model, collect_metadata, llama_config, make_ids, prefill_logits,
                                                 set_attention, training_loss)
from prefill_gaps import PROVIDERS, parse_row  # the same rows, written the same way

ROUNDS = 6
BLOCK_CALLS = 4
SAMPLE_S = 0.02


class ClockSampler:
    """SM MHz and watts sampled in a thread until stop()."""

    def __init__(self, device_index=0):
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)

            def read():
                return (pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                        pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
            self.source = "pynvml"
        except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi each sample
            def read():
                out = subprocess.run(["nvidia-smi", f"--id={device_index}", "--query-gpu=clocks.sm,power.draw",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
                mhz, watts = out.strip().split(",")
                return float(mhz), float(watts)
            self.source = "nvidia-smi"
        self._read = read
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a failed read costs one sample
                pass
            time.sleep(SAMPLE_S)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        if not self.samples:
            return {"source": self.source, "samples": 0}
        mhz = [s[0] for s in self.samples]
        watts = [s[1] for s in self.samples]
        return {"source": self.source, "samples": len(mhz), "sm_mhz_median": statistics.median(mhz),
                "sm_mhz_min": min(mhz), "watts_median": statistics.median(watts), "watts_max": max(watts)}


def kernel_class(name):
    low = name.lower()
    if "nvjet" in low or "gemm" in low or "cutlass" in low:
        return "gemm"
    if "attn" in low or "sdpa" in low or "flash" in low or "fmha" in low or "cudnn" in low:
        return "attention"
    return "other"


def make_call(model, kind, batch, seqlen):
    ids = make_ids(batch, seqlen, model.config.vocab_size)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    if kind == "ttft":
        def call():
            events[0].record()
            prefill_logits(model, ids)
            events[1].record()
            events[2].record()
    else:
        def call():
            events[0].record()
            loss = training_loss(model, ids)
            events[1].record()
            loss.backward()
            events[2].record()

    def timed():
        call()
        events[2].synchronize()
        return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
    return timed


def classes_of_one_call(call):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    ms = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[kernel_class(e.key)] += e.self_device_time_total / 1e3
    return ms


def run_row(model, kind, batch, seqlen):
    train = kind == "train"
    model.train(train)
    model.requires_grad_(train)
    call = make_call(model, kind, batch, seqlen)
    for provider in PROVIDERS:  # warm-up: tuning, compilation, allocator
        set_attention(model, provider)
        for _ in range(3):
            call()
    rounds = []
    for r in range(ROUNDS):
        order = PROVIDERS if r % 4 in (0, 3) else PROVIDERS[::-1]
        entry = {}
        for provider in order:
            set_attention(model, provider)
            call()
            sampler = ClockSampler(torch.cuda.current_device()).start()
            parts = [call() for _ in range(BLOCK_CALLS)]
            clocks = sampler.stop()
            entry[provider] = {"first": order[0] == provider, "forward_ms": statistics.median(p[0] for p in parts),
                               "backward_ms": statistics.median(p[1] for p in parts),
                               "kernels_ms": classes_of_one_call(call), **clocks}
        rounds.append(entry)
        ma, sd = entry["modelaccel"], entry["sdpa"]
        print(f"{kind} {batch}x{seqlen} round {r} ({order[0]} first): "
              + "  ".join(f"{p}: fwd {e['forward_ms']:.2f} bwd {e['backward_ms']:.2f} ms, "
                          f"gemm {e['kernels_ms']['gemm']:.2f} attn {e['kernels_ms']['attention']:.2f} "
                          f"other {e['kernels_ms']['other']:.2f}, "
                          f"{e.get('sm_mhz_median', 0):.0f} MHz (min {e.get('sm_mhz_min', 0):.0f}), "
                          f"{e.get('watts_median', 0):.0f} W"
                          for p, e in (("ma", ma), ("sdpa", sd))), flush=True)
    summary = {}
    for provider in PROVIDERS:
        rows = [r[provider] for r in rounds]
        summary[provider] = {key: statistics.median(row[key] for row in rows)
                             for key in ("forward_ms", "backward_ms", "sm_mhz_median", "watts_median") if key in rows[0]}
        for cls in ("gemm", "attention", "other"):
            summary[provider][f"{cls}_kernels_ms"] = statistics.median(row["kernels_ms"][cls] for row in rows)
    print(f"{kind} {batch}x{seqlen} medians over {ROUNDS} rounds: {json.dumps(summary)}", flush=True)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.eval()
    return {"kind": kind, "batch": batch, "seqlen": seqlen, "rounds": rounds, "median": summary}


def main():
    out = sys.argv[1]
    rows = [parse_row(a) for a in sys.argv[2:]] or [("train", 1, 4096), ("ttft", 8, 2048)]
    model = build_model(llama_config())
    result = {"metadata": collect_metadata(), "block_calls": BLOCK_CALLS, "rows": []}
    for kind, batch, seqlen in rows:
        result["rows"].append(run_row(model, kind, batch, seqlen))
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

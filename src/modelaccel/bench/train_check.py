"""Training check: a small GPT trained with SDPA attention and with modelaccel's, compared.

The same decoder is trained twice from the same seed, so both runs start from the same
weights and see the same batches; only the attention function differs. If modelaccel's
forward and backward are right, the two loss curves lie on top of each other (up to the
rounding differences of two fp16/bf16 kernels, which grow slowly over the steps) and both
fall well below log(vocab). Step times compare end-to-end training speed.

The data is synthetic but learnable: token sequences from a fixed random Markov chain in
which each token has a handful of likely successors, so the best achievable loss is that
chain's entropy rate, far below the log(vocab) of guessing.

    modelaccel bench train [--steps N] [--out DIR]

On a CUDA GPU this runs the full-size check (bf16 autocast). Without one it says so and runs
a tiny version on CPU, where modelaccel's kernels run in the Triton interpreter.
"""

import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import report

GPU_CONFIG = {"steps": 300, "seq": 1024, "batch": 8, "d_model": 512, "n_layers": 8, "n_heads": 8,
              "vocab": 512, "dtype": "bfloat16"}
# Small enough for the Triton interpreter (every kernel instance runs in numpy). fp16, since
# the interpreter cannot do bf16 dots.
CPU_CONFIG = {"steps": 5, "seq": 32, "batch": 2, "d_model": 64, "n_layers": 2, "n_heads": 2,
              "vocab": 64, "dtype": "float16"}
SUCCESSORS = 4  # likely next tokens per token in the Markov chain


# ---------------------------------------------------------------------------------------
# Data


def markov_batches(steps, batch, seq, vocab, seed, device):
    """Token batches from a fixed random Markov chain, all drawn up front.

    Each token has SUCCESSORS likely next tokens (weights from a seeded generator) and a small
    uniform floor, so every transition is possible but the chain's entropy is near
    log(SUCCESSORS). Returns (tokens int64 [steps, batch, seq + 1] on device, entropy_rate:
    the chain's stationary entropy in nats, the lowest mean loss a model can reach).
    """
    gen = torch.Generator().manual_seed(seed)
    probs = torch.full((vocab, vocab), 0.01 / vocab, dtype=torch.float64)
    successors = torch.stack([torch.randperm(vocab, generator=gen)[:SUCCESSORS] for _ in range(vocab)])
    weights = torch.rand(vocab, SUCCESSORS, generator=gen, dtype=torch.float64) + 0.2
    probs.scatter_add_(1, successors, 0.99 * weights / weights.sum(1, keepdim=True))
    probs /= probs.sum(1, keepdim=True)
    cdf = probs.cumsum(1)
    cdf[:, -1] = 1.0

    rows = steps * batch
    tokens = torch.empty(rows, seq + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, vocab, (rows,), generator=gen)
    for t in range(seq):  # vectorised over all sequences; sequential along time
        u = torch.rand(rows, 1, generator=gen, dtype=torch.float64)
        tokens[:, t + 1] = torch.searchsorted(cdf[tokens[:, t]], u).squeeze(1).clamp_max(vocab - 1)

    # Stationary distribution by power iteration, then H = sum_i pi_i H(row i).
    pi = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    for _ in range(200):
        pi = pi @ probs
    entropy_rate = float(-(pi[:, None] * probs * probs.log()).sum())
    return tokens.reshape(steps, batch, seq + 1).to(device), entropy_rate


# ---------------------------------------------------------------------------------------
# Model


def sdpa_attention(q, k, v):
    """Causal attention through PyTorch SDPA. q, k, v [batch, seq, heads, headdim] -> same."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def modelaccel_attention(q, k, v):
    """Causal attention through modelaccel.flash_attn_func. q, k, v [batch, seq, heads, headdim]."""
    from modelaccel import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)


ATTENTION = {"sdpa": sdpa_attention, "modelaccel": modelaccel_attention}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model, n_heads, attention, attn_dtype):
        super().__init__()
        self.n_heads = n_heads
        self.attention = attention
        self.attn_dtype = attn_dtype
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        # The flash kernels take fp16/bf16 only. Under CUDA autocast q/k/v already are; on
        # CPU (fp32 parameters) they are cast here and the output cast back, for both
        # attention functions alike so the two runs round the same way.
        y = self.attention(q.to(self.attn_dtype), k.to(self.attn_dtype), v.to(self.attn_dtype)).to(q.dtype)
        x = x + self.proj(y.reshape(b, s, d))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token + learned position embeddings, n_layers blocks, final norm, tied output head."""

    def __init__(self, vocab, seq, d_model, n_layers, n_heads, attention, attn_dtype):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, attention, attn_dtype) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 init; residual output projections scaled down by depth.
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx):
        """idx int64 [batch, seq] -> logits [batch, seq, vocab]."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok.weight.t()


# ---------------------------------------------------------------------------------------
# Training


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_training(attn="sdpa", steps=300, seq=1024, batch=8, d_model=512, n_layers=8, n_heads=8,
                 dtype=torch.bfloat16, device="cuda", seed=0, vocab=512, lr=1e-3, warmup_steps=None):
    """Train the GPT on Markov-chain data with AdamW and return what happened.

    Args:
        attn: "sdpa" or "modelaccel", the attention function of every block.
        dtype: the attention's dtype (torch.float16 or torch.bfloat16). On CUDA the model runs
            under autocast in this dtype with fp32 parameters; on CPU it runs in fp32 and only
            q/k/v are cast to it (the interpreted kernels take fp16/bf16 only).
        seed: seeds the initial weights and the data; equal seeds give both attention
            functions the same starting point and the same batches.
        warmup_steps: steps left out of the mean step time (compilation, tuning, allocator
            warm-up); default min(10, steps // 5).
    Returns:
        dict with losses (list of floats, one per step), mean_step_ms (over the steps after
        warm-up; None if none), step_ms (every step), warmup_steps, entropy_rate (the
        data's loss floor, nats) and log_vocab.
    """
    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {sorted(ATTENTION)}, got {attn!r}")
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    if warmup_steps is None:
        warmup_steps = min(10, steps // 5)
    device = torch.device(device)
    data, entropy_rate = markov_batches(steps, batch, seq, vocab, seed, device)
    torch.manual_seed(seed)
    model = GPT(vocab, seq, d_model, n_layers, n_heads, ATTENTION[attn], dtype).to(device)
    # foreach=False: the same update arithmetic on any device and parameter layout.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    autocast = (torch.autocast("cuda", dtype=dtype) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    losses, step_ms = [], []
    for step in range(steps):
        tokens = data[step]
        _sync(device)
        start = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        step_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    timed = step_ms[warmup_steps:]
    return {"losses": losses, "step_ms": step_ms, "warmup_steps": warmup_steps,
            "mean_step_ms": sum(timed) / len(timed) if timed else None,
            "entropy_rate": entropy_rate, "log_vocab": math.log(vocab)}


def compare_runs(sdpa, mine):
    """Summary of two run_training results: loss agreement, final losses and step times."""
    diffs = [abs(a - b) for a, b in zip(sdpa["losses"], mine["losses"])]
    tail = max(1, min(10, len(diffs)))
    summary = {
        "max_abs_loss_diff": max(diffs),
        "final_loss": {"sdpa": sdpa["losses"][-1], "modelaccel": mine["losses"][-1]},
        f"mean_loss_last_{tail}": {"sdpa": sum(sdpa["losses"][-tail:]) / tail,
                                   "modelaccel": sum(mine["losses"][-tail:]) / tail},
        "mean_step_ms": {"sdpa": sdpa["mean_step_ms"], "modelaccel": mine["mean_step_ms"]},
    }
    if sdpa["mean_step_ms"] and mine["mean_step_ms"]:
        summary["speedup_vs_sdpa"] = sdpa["mean_step_ms"] / mine["mean_step_ms"]
    return summary


# ---------------------------------------------------------------------------------------
# Command


def _metadata(device):
    from modelaccel.bench.attention import _git_commit

    import triton

    commit, dirty = _git_commit()
    meta = {"torch": torch.__version__, "triton": triton.__version__, "modelaccel_commit": commit,
            "modelaccel_dirty": dirty, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    return meta


def plot_losses(result, path):
    """Both loss curves and their difference, saved as PNG; None if matplotlib is missing."""
    plt = report.pyplot()
    if plt is None:
        return None
    runs = result["runs"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name in ("sdpa", "modelaccel"):
        top.plot(runs[name]["losses"], label=name, linewidth=1)
    top.axhline(runs["sdpa"]["entropy_rate"], color="gray", linestyle=":", label="data entropy rate")
    top.set_ylabel("training loss (nats)")
    top.legend()
    diff = [b - a for a, b in zip(runs["sdpa"]["losses"], runs["modelaccel"]["losses"])]
    bottom.plot(diff, color="black", linewidth=1)
    bottom.set_ylabel("modelaccel - sdpa")
    bottom.set_xlabel("step")
    return report.save_figure(fig, f"GPT training check, {result['metadata']['device_name']}", path)


def main(steps=None, out_dir=os.path.join("benchmarks", "results"), seed=0):
    """`modelaccel bench train`: both runs, a printed summary, JSON + PNG in out_dir; exit code.

    The tiny CPU version runs in a child process with TRITON_INTERPRET=1, since Triton reads
    that variable only when the kernels are defined (at import).
    """
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("No CUDA GPU found: running a tiny training check on CPU with modelaccel's kernels in the "
              "Triton interpreter (the sizes of a real check would take hours there).", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        code = f"import sys; from modelaccel.bench import train_check; sys.exit(train_check.main({steps!r}, {out_dir!r}, {seed!r}))"
        return subprocess.run([sys.executable, "-c", code], env=env).returncode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(GPU_CONFIG if device == "cuda" else CPU_CONFIG)
    if steps is not None:
        config["steps"] = steps
    dtype = getattr(torch, config["dtype"])
    kwargs = {k: config[k] for k in ("steps", "seq", "batch", "d_model", "n_layers", "n_heads", "vocab")}
    print(f"config: {config}, device {device}", flush=True)
    runs = {}
    for attn in ("sdpa", "modelaccel"):
        runs[attn] = run_training(attn, dtype=dtype, device=device, seed=seed, **kwargs)
        r = runs[attn]
        step_text = f"{r['mean_step_ms']:.1f} ms" if r["mean_step_ms"] is not None else "n/a"
        print(f"{attn:>10}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, mean step {step_text} "
              f"(after {r['warmup_steps']} warm-up steps)", flush=True)
    summary = compare_runs(runs["sdpa"], runs["modelaccel"])
    result = {"metadata": _metadata(device), "config": config, "seed": seed, "summary": summary, "runs": runs}
    print(f"log(vocab) {runs['sdpa']['log_vocab']:.3f}, data entropy rate {runs['sdpa']['entropy_rate']:.3f}")
    print(f"max |loss difference| over {config['steps']} steps: {summary['max_abs_loss_diff']:.4g}")
    if device != "cuda":
        print("(CPU step times compare PyTorch's CPU kernels with the Triton interpreter: not a speed measurement)")
    elif "speedup_vs_sdpa" in summary:
        print(f"step time: sdpa {summary['mean_step_ms']['sdpa']:.2f} ms, modelaccel "
              f"{summary['mean_step_ms']['modelaccel']:.2f} ms ({summary['speedup_vs_sdpa']:.3f}x)")

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"train_check_{report.device_slug(result['metadata']['device_name'])}_"
                                 f"{result['metadata']['date'][:10]}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {base}.json")
    if plot_losses(result, base + ".png"):
        print(f"wrote {base}.png")
    return 0 if all(math.isfinite(x) for r in runs.values() for x in r["losses"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Output of attention benchmark results: console table, markdown, JSON and a PNG plot.

Everything here works on the plain dict that `modelaccel.bench.attention.run_benchmark`
returns and needs no GPU, so it is unit-tested on CPU.
"""

import json
import os
import re

SHAPE_COLUMNS = ("BATCH", "HQ", "HK", "N_CTX_Q", "N_CTX_K")
SHAPE_KEYS = ("batch", "nheads_q", "nheads_k", "seqlen_q", "seqlen_k")
# Varlen rows have one max length and a total of real tokens instead of two lengths.
VARLEN_SHAPE_COLUMNS = ("BATCH", "HQ", "HK", "MAX_LEN", "TOKENS")
VARLEN_SHAPE_KEYS = ("batch", "nheads_q", "nheads_k", "max_seqlen", "total_tokens")
_SHAPE_WIDTHS = (5, 4, 4, 7, 7)
_NUM_WIDTH = 10

# Per mode: the report's title and the file-name prefix of its results.
MODE_TITLES = {"fwd": "Forward attention", "bwd": "Attention backward pass",
               "varlen": "Variable-length attention forward"}
MODE_PREFIXES = {"fwd": "attention_fwd", "bwd": "attention_bwd", "varlen": "attention_varlen"}


def _mode(result):
    # Results recorded before the backward and varlen modes existed carry no "mode".
    return result.get("mode", "fwd")


def _is_varlen_row(row):
    return "max_seqlen" in row


def _shape_spec(varlen):
    return (VARLEN_SHAPE_COLUMNS, VARLEN_SHAPE_KEYS) if varlen else (SHAPE_COLUMNS, SHAPE_KEYS)


def device_slug(name):
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def _baselines(providers):
    # Ratios are modelaccel over each SDPA provider, so they exist only when modelaccel ran.
    return [p for p in providers if p != "modelaccel"] if "modelaccel" in providers else []


def _ratio(row, baseline):
    mine, theirs = row["tflops"].get("modelaccel"), row["tflops"].get(baseline)
    return mine / theirs if mine and theirs else None


def _check_text(check):
    if check is None:
        return ""
    if check["max_abs_err"] is None:
        return check["status"]
    return f"{check['status']} {check['max_abs_err']:.1e}"


def _tflops_text(row, provider):
    value = row["tflops"].get(provider)
    if value is not None:
        return f"{value:.1f}"
    if provider == "modelaccel" and row["check"] and row["check"]["status"] == "mismatch":
        return "MISMATCH"
    return "-"


def format_header(providers, varlen=False):
    """Console header matching `format_row`: shape | TFLOPS per provider | ratios | check.

    varlen: use the varlen shape columns (BATCH, HQ, HK, MAX_LEN, TOKENS).
    """
    shape = " ".join(f"{c:>{w}}" for c, w in zip(_shape_spec(varlen)[0], _SHAPE_WIDTHS))
    tf = " ".join(f"{p:>{_NUM_WIDTH}}" for p in providers) + " (TFLOPS)"
    ratios = " ".join(f"{'vs ' + b:>{_NUM_WIDTH}}" for b in _baselines(providers))
    return " | ".join(part for part in (shape, tf, ratios, "check") if part)


def format_row(row, providers):
    """One console line for a row dict: its shape, TFLOPS per provider, ratios and check."""
    keys = _shape_spec(_is_varlen_row(row))[1]
    shape = " ".join(f"{row[k]:>{w}}" for k, w in zip(keys, _SHAPE_WIDTHS))
    tf = " ".join(f"{_tflops_text(row, p):>{_NUM_WIDTH}}" for p in providers) + " " * len(" (TFLOPS)")
    ratio_cells = []
    for b in _baselines(providers):
        r = _ratio(row, b)
        ratio_cells.append(f"{(f'{r:.2f}x' if r is not None else '-'):>{_NUM_WIDTH}}")
    return " | ".join(part for part in (shape, tf, " ".join(ratio_cells), _check_text(row["check"])) if part)


def _geomean_text(table):
    parts = []
    for key, g in table["geomean"].items():
        value = f"{g['geomean']:.3f}x" if g["geomean"] is not None else "n/a"
        parts.append(f"modelaccel {key.replace('_', ' ')}: {value} over {g['rows']} rows")
    return "geomean " + "; ".join(parts) if parts else ""


def format_table(table, providers):
    """Console text for one table dict: title, header, one line per row, geomean line."""
    varlen = bool(table["rows"]) and _is_varlen_row(table["rows"][0])
    lines = [f"== {table['title']}", format_header(providers, varlen=varlen)]
    lines += [format_row(row, providers) for row in table["rows"]]
    geomean = _geomean_text(table)
    if geomean:
        lines.append(geomean)
    return "\n".join(lines)


MODE_NOTES = {
    "fwd": "TFLOPS; ratios are modelaccel over the SDPA backend; check is modelaccel's max abs "
           "error against SDPA. '-' means no number (reasons below the table).",
    "bwd": "TFLOPS of the backward pass alone (2.5x the forward's FLOPs; the forward runs once, untimed); "
           "ratios are modelaccel over the SDPA backend; check is the largest relative error of "
           "modelaccel's dq, dk, dv against SDPA's. '-' means no number (reasons below the table).",
    "varlen": "Useful TFLOPS (FLOPs of the real tokens only, each sequence on its own) and millions of real "
              "tokens per second; ratios are modelaccel over the SDPA backend; check is modelaccel's max abs "
              "error against SDPA flash run on each sequence alone. Causal peers run the batch padded to "
              "its longest sequence (the padding is work they do); non-causal peers run nested jagged "
              "tensors. '-' means no number (reasons below the table).",
}


def format_markdown(result):
    """Markdown report of a whole result: metadata, one table per setting, then the reasons
    for every missing number (a provider refusing a shape, a mismatch, an error)."""
    meta, providers, mode = result["metadata"], result["providers"], _mode(result)
    lines = [f"# {MODE_TITLES[mode]}, {meta['device_name']}", ""]
    for key in ("device_name", "sm_count", "compute_capability", "torch", "triton", "cuda", "cudnn",
                "date", "modelaccel_commit", "modelaccel_dirty", "do_bench"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines.append("")
    lines.append(MODE_NOTES[mode])
    baselines = _baselines(providers)
    varlen = mode == "varlen"
    columns, keys = _shape_spec(varlen)
    for table in result["tables"]:
        header = list(columns) + list(providers) + [f"vs {b}" for b in baselines] + ["check"]
        if varlen:
            header += [f"{p} Mtok/s" for p in providers]
        lines += ["", f"## {table['title']}", "", "| " + " | ".join(header) + " |",
                  "|" + "---:|" * (len(header) - 1) + "---|"]
        notes = []
        for row in table["rows"]:
            cells = [str(row[k]) for k in keys] + [_tflops_text(row, p) for p in providers]
            cells += [f"{r:.2f}x" if (r := _ratio(row, b)) is not None else "-" for b in baselines]
            cells.append(_check_text(row["check"]))
            if varlen:
                cells += [f"{t / 1e6:.1f}" if (t := row["tokens_per_s"].get(p)) else "-" for p in providers]
            lines.append("| " + " | ".join(cells) + " |")
            shape = "(" + ", ".join(str(row[k]) for k in keys) + ")"
            if varlen:
                notes.append(f"- {shape} sequence lengths: {row['seqlens']}")
            notes += [f"- {shape} {p}: {reason}" for p, reason in row["errors"].items()]
        geomean = _geomean_text(table)
        if geomean:
            lines += ["", geomean]
        if notes:
            lines += ["", "Lengths and missing numbers:" if varlen else "Missing numbers:", ""] + notes
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (reason printed) when matplotlib is
    missing: a plot is a convenience and must never cost a benchmark run its results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    return plt


def save_figure(fig, title, path):
    """Title, lay out, write (PNG at 110 dpi) and close a benchmark figure; returns path."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_results(result, path):
    """Bar chart of TFLOPS per provider per shape, one subplot per table, saved as PNG.

    Returns the path, or None (with the reason printed) if matplotlib is not installed:
    the plot is a convenience and must never cost a benchmark run its results.
    """
    plt = pyplot()
    if plt is None:
        return None

    providers, tables = result["providers"], result["tables"]
    mode = _mode(result)
    keys = _shape_spec(mode == "varlen")[1]
    fig, axes = plt.subplots(len(tables), 1, figsize=(14, 4.5 * len(tables)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, table in zip(axes[:, 0], tables):
        positions = range(len(table["rows"]))
        for i, provider in enumerate(providers):
            heights = [row["tflops"].get(provider) or 0.0 for row in table["rows"]]
            ax.bar([x + (i - (len(providers) - 1) / 2) * width for x in positions], heights, width, label=provider)
        ax.set_xticks(list(positions))
        ax.set_xticklabels([",".join(str(row[k]) for k in keys) for row in table["rows"]],
                           rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("useful TFLOPS" if mode == "varlen" else "TFLOPS")
        ax.set_title(table["title"])
        ax.legend()
    columns = ",".join(_shape_spec(mode == "varlen")[0])
    axes[-1, 0].set_xlabel(f"{columns} (missing bars: no number, see the markdown report)")
    return save_figure(fig, f"{MODE_TITLES[mode]}, {result['metadata']['device_name']}", path)


def write_files(result, out_dir, prefix, tag, markdown, plot):
    """Write result as <prefix>_<device-slug>_<date>[_<tag>].{json,md,png} into out_dir
    (created if missing); markdown(result) gives the text, plot(result, path) the PNG (or
    None when skipped). A rerun on the same day with the same tag replaces the files.
    Returns {"json", "md", "png"} paths, "png" None if the plot was skipped."""
    os.makedirs(out_dir, exist_ok=True)
    meta = result["metadata"]
    stem = f"{prefix}_{device_slug(meta['device_name'])}_{meta['date'][:10]}" + (f"_{tag}" if tag else "")
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(markdown(result))
    return {"json": base + ".json", "md": base + ".md", "png": plot(result, base + ".png")}


def write_results(result, out_dir, tag=""):
    """Write an attention benchmark's result (JSON, markdown, PNG) into out_dir, prefixed
    attention_fwd, attention_bwd or attention_varlen by result["mode"] (fwd if absent)."""
    return write_files(result, out_dir, MODE_PREFIXES[_mode(result)], tag, format_markdown, plot_results)

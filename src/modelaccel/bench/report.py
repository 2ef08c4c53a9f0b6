"""Output of attention benchmark results: console table, markdown, JSON and a PNG plot.

Everything here works on the plain dict that `modelaccel.bench.attention.run_benchmark`
returns and needs no GPU, so it is unit-tested on CPU.
"""

import json
import os
import re

SHAPE_COLUMNS = ("BATCH", "HQ", "HK", "N_CTX_Q", "N_CTX_K")
SHAPE_KEYS = ("batch", "nheads_q", "nheads_k", "seqlen_q", "seqlen_k")
_SHAPE_WIDTHS = (5, 4, 4, 7, 7)
_NUM_WIDTH = 10


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


def format_header(providers):
    """Console header matching `format_row`: shape | TFLOPS per provider | ratios | check."""
    shape = " ".join(f"{c:>{w}}" for c, w in zip(SHAPE_COLUMNS, _SHAPE_WIDTHS))
    tf = " ".join(f"{p:>{_NUM_WIDTH}}" for p in providers) + " (TFLOPS)"
    ratios = " ".join(f"{'vs ' + b:>{_NUM_WIDTH}}" for b in _baselines(providers))
    return " | ".join(part for part in (shape, tf, ratios, "check") if part)


def format_row(row, providers):
    """One console line for a row dict: its shape, TFLOPS per provider, ratios and check."""
    shape = " ".join(f"{row[k]:>{w}}" for k, w in zip(SHAPE_KEYS, _SHAPE_WIDTHS))
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
    lines = [f"== {table['title']}", format_header(providers)]
    lines += [format_row(row, providers) for row in table["rows"]]
    geomean = _geomean_text(table)
    if geomean:
        lines.append(geomean)
    return "\n".join(lines)


def format_markdown(result):
    """Markdown report of a whole result: metadata, one table per setting, then the reasons
    for every missing number (a provider refusing a shape, a mismatch, an error)."""
    meta, providers = result["metadata"], result["providers"]
    lines = [f"# Forward attention, {meta['device_name']}", ""]
    for key in ("device_name", "sm_count", "compute_capability", "torch", "triton", "cuda", "cudnn",
                "date", "modelaccel_commit", "modelaccel_dirty", "do_bench"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines.append("")
    lines.append("TFLOPS; ratios are modelaccel over the SDPA backend; check is modelaccel's max abs "
                 "error against SDPA. '-' means no number (reasons below the table).")
    baselines = _baselines(providers)
    for table in result["tables"]:
        header = list(SHAPE_COLUMNS) + list(providers) + [f"vs {b}" for b in baselines] + ["check"]
        lines += ["", f"## {table['title']}", "", "| " + " | ".join(header) + " |",
                  "|" + "---:|" * (len(header) - 1) + "---|"]
        notes = []
        for row in table["rows"]:
            cells = [str(row[k]) for k in SHAPE_KEYS] + [_tflops_text(row, p) for p in providers]
            cells += [f"{r:.2f}x" if (r := _ratio(row, b)) is not None else "-" for b in baselines]
            cells.append(_check_text(row["check"]))
            lines.append("| " + " | ".join(cells) + " |")
            shape = "(" + ", ".join(str(row[k]) for k in SHAPE_KEYS) + ")"
            notes += [f"- {shape} {p}: {reason}" for p, reason in row["errors"].items()]
        geomean = _geomean_text(table)
        if geomean:
            lines += ["", geomean]
        if notes:
            lines += ["", "Missing numbers:", ""] + notes
    return "\n".join(lines) + "\n"


def plot_results(result, path):
    """Bar chart of TFLOPS per provider per shape, one subplot per table, saved as PNG.

    Returns the path, or None (with the reason printed) if matplotlib is not installed:
    the plot is a convenience and must never cost a benchmark run its results.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None

    providers, tables = result["providers"], result["tables"]
    fig, axes = plt.subplots(len(tables), 1, figsize=(14, 4.5 * len(tables)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, table in zip(axes[:, 0], tables):
        positions = range(len(table["rows"]))
        for i, provider in enumerate(providers):
            heights = [row["tflops"].get(provider) or 0.0 for row in table["rows"]]
            ax.bar([x + (i - (len(providers) - 1) / 2) * width for x in positions], heights, width, label=provider)
        ax.set_xticks(list(positions))
        ax.set_xticklabels([",".join(str(row[k]) for k in SHAPE_KEYS) for row in table["rows"]],
                           rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("TFLOPS")
        ax.set_title(table["title"])
        ax.legend()
    axes[-1, 0].set_xlabel("BATCH,HQ,HK,N_CTX_Q,N_CTX_K (missing bars: no number, see the markdown report)")
    fig.suptitle(f"Forward attention, {result['metadata']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result, out_dir, tag=""):
    """Write result as JSON, markdown and PNG into out_dir (created if missing).

    Files are named attention_fwd_<device-slug>_<date>[_<tag>].{json,md,png}; a rerun on
    the same day with the same tag replaces them. Returns {"json", "md", "png"} paths,
    "png" None if the plot was skipped.
    """
    os.makedirs(out_dir, exist_ok=True)
    meta = result["metadata"]
    stem = f"attention_fwd_{device_slug(meta['device_name'])}_{meta['date'][:10]}" + (f"_{tag}" if tag else "")
    base = os.path.join(out_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(base + ".md", "w") as f:
        f.write(format_markdown(result))
    return {"json": base + ".json", "md": base + ".md", "png": plot_results(result, base + ".png")}

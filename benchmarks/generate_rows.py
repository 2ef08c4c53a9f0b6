"""The Transformers benchmark's generate rows alone (ms per greedy decoding step after a
512-token prompt, dynamic and static caches, modelaccel / SDPA / eager), on the full
Llama-3-8B-shaped model, for a check that needs neither the TTFT nor the training rows.
Usage: python benchmarks/generate_rows.py OUT.json
"""

import json
import sys

from modelaccel.bench.transformers_bench import (GENERATE_CACHES, build_model, collect_metadata, llama_config,
                                                 run_generate_row)


def main():
    model = build_model(llama_config()).eval()
    rows = [run_generate_row(model, cache=cache) for cache in GENERATE_CACHES]
    for row in rows:
        print(row["cache"], {p: ms and round(ms, 2) for p, ms in row["ms"].items()}, "tokens equal to sdpa's:",
              row["tokens_match_sdpa"], "errors:", row["errors"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(dict(collect_metadata(), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()

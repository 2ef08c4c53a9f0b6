"""Benchmarks and self-checks behind `modelaccel bench`.

- `modelaccel.bench.attention`: forward attention throughput on a CUDA GPU, modelaccel
  against PyTorch SDPA's flash and cuDNN backends.
- `modelaccel.bench.selfcheck`: the CPU check run when no GPU is present; it must run in a
  process started with TRITON_INTERPRET=1, so it is kept out of this package's imports.
- `modelaccel.bench.report`: text, markdown, JSON and plot output of benchmark results.
"""

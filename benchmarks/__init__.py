"""Benchmarks for liquiddiff: pytest-benchmark suites and the one-command GPU report.

- ``cases.py``: shared builders (op inputs, the eager / compile / fused callables, trainers);
- ``bench_ops.py``, ``bench_model.py``: pytest-benchmark suites (small sizes on a CPU);
- ``gpu_report.py``: ``python -m benchmarks.gpu_report --out DIR`` (report.json, report.md,
  ratios.png);
- ``targets.py``: the issues' performance targets, checked against a report;
- ``sanitize_ops.py``: fused ops at awkward shapes, the program ``compute-sanitizer`` runs;
- ``gpu_check.sh``: the prepared GPU script (gpu tests, memcheck, report).

See benchmarks/README.md.
"""
import os

import torch

# Without CUDA the Triton kernels run under the interpreter; Triton reads this when it first
# jits a kernel, so it is set before any benchmarks module imports liquiddiff.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

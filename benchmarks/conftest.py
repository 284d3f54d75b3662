"""Setup of the benchmark suites.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
Triton jits anything, so it is set here, before any suite imports liquiddiff.kernels. The
interpreter is made strict as in the tests (tests/strict_interpreter.py).

On a CPU (CI) the suites run the reference and interpreter paths at small sizes; run them with
``--benchmark-disable`` to execute each case once (a smoke run, no timing). On a GPU they run
at the report's sizes; ``LIQUIDDIFF_BENCH_QUICK=1`` forces the small sizes there too.
"""
import os

import pytest
import torch

from tests import strict_interpreter

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
strict_interpreter.apply()  # as the tests: each interpreted launch checked as a GPU would run it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """On the CPU the sizes are tiny: one intra-op thread, so a busy core elsewhere (a shared CI
    runner) cannot stall every OpenMP region. Restored after each benchmark test."""
    if torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

"""Every Triton kernel, compiled for sm_90 as its launcher launches it at the model's size (no GPU
needed): none spills, and none needs more than 128 registers a thread (at least two blocks of
up to 8 warps per SM). Run as its own process: the kernels must be compiled for the GPU, not
for the interpreter this test session uses."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_do_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("cuobjdump" in proc.stderr or "No such file" in proc.stderr):
        pytest.skip(f"no sm_90 toolchain in this Triton: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^(\S.*?)\s+\d+ warps:\s+(\d+) registers, stack (\d+)", proc.stdout, re.M)
    assert len(rows) == 33, proc.stdout  # every launch of kernel_resources.launches()
    for label, registers, stack in rows:
        assert int(stack) == 0 and int(registers) <= 128, (label, registers, stack)

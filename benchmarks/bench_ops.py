"""pytest-benchmark suite of the fused ops: eager reference, torch.compile(reference), fused.

Each op x layout x pass (forward, forward+backward) is one benchmark group, so
``pytest benchmarks/bench_ops.py --benchmark-enable`` compares the three implementations side by
side. On a GPU: bf16 at [8, 64, 256, 256]; on a CPU: fp32 at a small shape, the fused ops under
the Triton interpreter. Each case checks that its outputs / gradients exist and are finite; no
case asserts anything about time. The GPU report (gpu_report.py) has the floor and the ratios.

On the CPU, torch.compile costs seconds per case: one representative compile case runs (marked
slow) and the others are skipped unless ``LIQUIDDIFF_BENCH_COMPILE=1``.
"""
import os

import pytest
import torch

from benchmarks import cases

DEVICE = cases.default_device()
SHAPE = cases.OP_SHAPE if cases.full_sizes() else cases.QUICK_OP_SHAPE
DTYPE = cases.default_dtype(DEVICE)
CPU_COMPILE_CASE = ("cfc_relax", "fwdbwd", "nchw")


def _compile_allowed(op, mode, layout):
    if DEVICE.type == "cuda" or os.environ.get("LIQUIDDIFF_BENCH_COMPILE", "0") == "1":
        return True
    return (op, mode, layout) == CPU_COMPILE_CASE


def _params():
    for op in cases.OP_NAMES:
        for mode in cases.OPS[op].modes:
            for layout in cases.OPS[op].layouts:
                for impl in cases.IMPLS:
                    marks = []
                    if impl == "compile":
                        if not _compile_allowed(op, mode, layout):
                            marks.append(pytest.mark.skip(
                                reason="torch.compile on the CPU: one representative case only "
                                "(LIQUIDDIFF_BENCH_COMPILE=1 runs all)"))
                        elif DEVICE.type != "cuda":
                            marks.append(pytest.mark.slow)
                    yield pytest.param(op, mode, layout, impl, marks=marks, id=f"{op}-{mode}-{layout}-{impl}")


_CASES = {}


def _case(op, layout):
    key = (op, layout)
    if key not in _CASES:
        _CASES.clear()  # keep one op's inputs alive at a time (67 MB per tensor on a GPU)
        _CASES[key] = cases.make_op_case(op, SHAPE, DTYPE, DEVICE, layout)
    return _CASES[key]


@pytest.mark.parametrize("op, mode, layout, impl", list(_params()))
def test_op(benchmark, op, mode, layout, impl):
    case = _case(op, layout)
    fn = cases.op_callable(case, impl, mode)
    fn()  # first call outside the timer: compilation, Triton jit, cuDNN/cuBLAS handles
    cases.sync(DEVICE)

    def timed():
        result = fn()
        cases.sync(DEVICE)
        return result

    benchmark.group = f"{op} {cases.MODE_TITLES[mode]} {layout} {tuple(SHAPE)} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(floor_bytes=case.floor_bytes(mode), impl=impl, shape=list(SHAPE))
    result = benchmark(timed)
    cases.check_finite(f"{op} {mode} {layout} {impl}", result)
    assert len(result) == (len(case.spec.outputs) if mode == "fwd" else len(case.inputs))

"""Test setup: without CUDA, Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before Triton compiles any @triton.jit function, so it is set here,
before the package is imported by any test module. The interpreter is made to do what a GPU
does where the two differ (tests/strict_interpreter.py).
"""
import os

import pytest
import torch

from tests import strict_interpreter

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    from benchmarks.cases import ieee_fp32_convolutions

    ieee_fp32_convolutions()  # fp32 parity against cuDNN's convs, not its TF32 default
strict_interpreter.apply()  # as on a GPU: masked lanes, bounds, program order, dot size, bf16 rounding

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_cuda)


# Triton's interpreter before 3.6 has no fp64 tl.dot (3.4 was seen to raise this; 3.6 and 3.9
# run it): the fp64 cases of the opt-in SiLU -> 1x1 conv and CfC-heads kernels cannot run there.
_NO_FP64_DOT = "Unsupported lhs dtype fp64"


def _interpreter_lacks_fp64_dot() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6)


_OLD_INTERPRETER = _interpreter_lacks_fp64_dot()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as exc:
        if _OLD_INTERPRETER and _NO_FP64_DOT in str(exc):
            pytest.skip("this Triton's interpreter has no fp64 tl.dot (Triton < 3.6)")
        raise


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

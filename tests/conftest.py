"""Test setup: without CUDA, Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before Triton compiles any @triton.jit function, so it is set here,
before the package is imported by any test module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    from benchmarks.cases import ieee_fp32_convolutions

    ieee_fp32_convolutions()  # fp32 parity against cuDNN's convs, not its TF32 default

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(requires_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

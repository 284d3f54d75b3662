"""Every fused op on empty tensors: what the reference gives (empty outputs and gradients, zero
parameter gradients), never an error of its own. An empty batch reaches the kernels from an
empty micro-batch or a sampler asked for no image; an empty pixel axis from a caller of an
elementwise op. Launches whose grid is empty are skipped by Triton's launcher on a GPU and run
no program under the interpreter; what breaks instead is the host arithmetic around them (the
pointwise weight gradient divided by the batch size; an empty pixel axis had no pixel stride).
"""
import pytest
import torch

from benchmarks import cases
from tests.parity import poisoned_outputs

# The ops without a convolution: PyTorch's own convolutions refuse an empty pixel axis.
PIXELWISE = ("cfc_relax", "cfc_relax_residual", "adaln", "adaln_residual", "modulated_silu")
SHAPES = {"no batch": ((0, 5, 3, 4), cases.ALL_OP_NAMES),
          "no row": ((2, 5, 0, 4), PIXELWISE), "no column": ((2, 5, 3, 0), PIXELWISE)}


@pytest.mark.parametrize("layout", cases.LAYOUTS)
@pytest.mark.parametrize("op, shape", [(op, shape) for shape, ops in SHAPES.values() for op in ops],
                         ids=[f"{op}-{name}" for name, (_, ops) in SHAPES.items() for op in ops])
def test_fused_op_on_empty_tensors_gives_the_references_results(op, shape, layout, monkeypatch):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")  # the opt-in kernels too
    case = cases.make_op_case(op, shape, torch.float32, torch.device("cpu"), layout, seed=0)
    with poisoned_outputs():  # every buffer a launcher allocates starts as NaN
        errors = cases.parity(case, case.spec.fused)
    assert errors and cases.max_error(errors) == 0, errors

"""SiLU -> 1x1 conv keeping only the pre-activation: same values and gradients as the reference."""
import pytest
import torch

from liquiddiff import functional, kernels
from tests.parity import assert_close, grads_of, leaves


def _inputs(dtype=torch.float64, layout=torch.contiguous_format, bias=True, ci=6, co=5):
    z = torch.randn(2, ci, 5, 7, dtype=dtype).to(memory_format=layout)
    w = torch.randn(co, ci, 1, 1, dtype=dtype).to(memory_format=layout)
    return {"z": z, "weight": w, "bias": torch.randn(co, dtype=dtype) if bias else None}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, tol, layout, bias):
    raw = _inputs(dtype, layout, bias)
    ins, ref_ins = leaves(raw), leaves(raw)
    out = kernels.silu_conv1x1(**ins, **({} if bias else {"bias": None}))
    ref = functional.silu_conv1x1(**ref_ins, **({} if bias else {"bias": None}))
    up = torch.randn_like(ref)
    assert_close("out", out, ref, tol)
    assert out.is_contiguous(memory_format=layout)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    for name in ins:
        assert_close(name, got[name], want[name], tol)


def test_matches_reference_under_autocast():
    raw = _inputs(torch.float32, torch.channels_last)
    raw["z"] = raw["z"].bfloat16()  # activations are bf16 under autocast, parameters fp32
    ins, ref_ins = leaves(raw), leaves(raw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.silu_conv1x1(**ins)
        ref = functional.silu_conv1x1(**ref_ins)
    assert out.dtype == ref.dtype == torch.bfloat16
    up = torch.randn_like(ref)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    assert_close("out", out, ref, 1e-6)
    for name in ins:
        assert got[name].dtype == raw[name].dtype
        assert_close(name, got[name], want[name], 1e-6)


def test_gradcheck():
    ins = leaves(_inputs())
    assert torch.autograd.gradcheck(kernels.silu_conv1x1, (ins["z"], ins["weight"], ins["bias"]))


def test_keeps_only_the_pre_activation():
    ins = leaves(_inputs(torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.silu_conv1x1(**ins)
    activation_saves = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
    assert len(activation_saves) == 1 and activation_saves[0] is ins["z"]


def test_bad_arguments_are_named():
    z = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \[Co, 6, 1, 1\]"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 3, 3))
    with pytest.raises(ValueError, match="bias: expected shape"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 1, 1), torch.randn(4))
    with pytest.raises(TypeError, match="z: expected a floating-point"):
        kernels.silu_conv1x1(z.long(), torch.randn(5, 6, 1, 1))

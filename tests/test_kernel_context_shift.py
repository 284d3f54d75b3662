"""The Triton context shift of the spatial mix (liquiddiff/kernels/context_shift.py) against
functional.context_shift: value and every gradient (one shared upstream, outputs NaN-poisoned)
in fp32 and fp64, awkward B and C, strided scale/shift (the chunks of a time projection) and a
channels_last weight; under autocast as the fused block calls it; NaN propagation, errors, the
runtime switch, gradcheck, opcheck, torch.compile; bf16 on the GPU."""
import pytest
import torch

import parity
from liquiddiff import functional, kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PIXELS = 96  # not a power of two: the division is not exact


def _inputs(batch, channels, dtype=torch.float32, strided=True):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    # As the block makes them: scale and shift are the two chunks of one projection (strided),
    # the pixel sum is of order PIXELS, the weight follows the model's memory format.
    projected = randn(batch, 2 * channels)
    scale, shift = projected.chunk(2, dim=1) if strided else (randn(batch, channels), randn(batch, channels))
    return {"pixel_sum": PIXELS * randn(batch, channels),
            "weight": randn(channels, channels, 1, 1).contiguous(memory_format=torch.channels_last),
            "bias": randn(channels), "scale": scale, "shift": shift}


def _fused(**ins):
    return kernels.context_shift(**ins, pixels=PIXELS)


def _reference(**ins):
    return functional.context_shift(**ins, pixels=PIXELS)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch, channels", [(1, 1), (2, 33), (3, 70), (8, 64)])
def test_parity(dtype, tol, batch, channels):
    out = parity.check_op(_fused, _reference, _inputs(batch, channels, dtype), tol)
    assert "ContextShift" in type(out.grad_fn).__name__  # the kernels ran, not the reference


def test_parity_contiguous_scale_and_shift():
    parity.check_op(_fused, _reference, _inputs(3, 40, strided=False), 1e-5)


def test_parity_scale_and_shift_with_different_strides():
    # Each [B, C] argument is read through its own strides (the chunks share theirs).
    raw = _inputs(3, 40, strided=False)
    raw["shift"] = torch.randn(3, 80, device=DEVICE)[:, ::2]
    ins = parity.leaves(raw)
    assert ins["shift"].stride() == (80, 2) and ins["scale"].stride() == (40, 1)
    parity.check_op(_fused, _reference, raw, 1e-5)


def test_under_autocast_as_the_block_calls_it():
    """bf16 autocast, bf16 weight, bias, scale and shift (the block's casts, autocast's Linear), an
    fp32 pixel sum: the reference's dtype, and its values and gradients to bf16 rounding."""
    raw = {k: (v if k == "pixel_sum" else v.bfloat16()) for k, v in _inputs(4, 48).items()}
    out = parity.check_op(parity.under_autocast(_fused, DEVICE),
                          parity.under_autocast(_reference, DEVICE), raw, 3e-2)
    assert out.dtype == torch.bfloat16


def test_saved_context_is_rounded_to_the_conv_dtype():
    """Under autocast the context is the conv's bf16 output, which backward reads for d scale:
    the op's saved fp32 ctx holds bf16 values (the fp32 tests cannot see this rounding, and the
    bf16 parity tolerance hides it)."""
    raw = {k: (v if k == "pixel_sum" else v.bfloat16()) for k, v in _inputs(2, 40).items()}
    args = (raw["pixel_sum"], raw["weight"], raw["bias"], raw["scale"], raw["shift"], PIXELS, torch.bfloat16)
    with parity.poisoned_outputs():
        _, ctx = torch.ops.liquiddiff.context_shift.default(*args)
    assert ctx.dtype == torch.float32 and torch.equal(ctx, ctx.bfloat16().float())


def test_nan_propagates():
    raw = _inputs(2, 5)
    raw["pixel_sum"][1, 3] = float("nan")
    raw["shift"][0, 2] = float("inf")
    out = _fused(**raw)
    assert torch.isnan(out[1]).all()  # channel 3's mean meets every output channel of item 1
    assert torch.isinf(out[0, 2]) and torch.isfinite(out[0, [0, 1, 3, 4]]).all()


def test_bad_arguments_are_named():
    raw = _inputs(2, 6)
    cases = [({"scale": raw["scale"][0]}, ValueError, "scale"),
             ({"pixel_sum": raw["pixel_sum"][:, :5]}, ValueError, "pixel_sum"),
             ({"shift": raw["shift"].long()}, TypeError, "shift"),
             ({"weight": raw["weight"][:, :5]}, ValueError, "weight"),
             ({"bias": raw["bias"][:5]}, ValueError, "bias")]
    for change, error, name in cases:
        with pytest.raises(error, match=name):
            _fused(**{**raw, **change})
    with pytest.raises(ValueError, match="pixels"):
        kernels.context_shift(**raw, pixels=0)


def test_runs_the_kernels_unless_told_not_to(monkeypatch):
    ins = parity.leaves(_inputs(2, 6))
    assert "ContextShift" in type(_fused(**ins).grad_fn).__name__
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,context_shift=torch")
    assert "ContextShift" not in type(_fused(**ins).grad_fn).__name__


def test_gradcheck_fp64():
    ins = parity.leaves(_inputs(2, 5, torch.float64))
    names = list(ins)
    assert torch.autograd.gradcheck(lambda *t: _fused(**dict(zip(names, t))), tuple(ins.values()))


def test_opcheck():
    raw = _inputs(3, 37)
    args = (raw["pixel_sum"], raw["weight"], raw["bias"], raw["scale"], raw["shift"], PIXELS, torch.bfloat16)
    torch.library.opcheck(torch.ops.liquiddiff.context_shift.default, args)
    _, ctx = torch.ops.liquiddiff.context_shift.default(*args)
    torch.library.opcheck(torch.ops.liquiddiff.context_shift_backward.default,
                          (torch.randn_like(ctx), raw["pixel_sum"], raw["weight"], raw["scale"], ctx, PIXELS,
                           torch.bfloat16, torch.float32))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    compiled = torch.compile(_fused, fullgraph=True)
    parity.check_op(compiled, _reference, _inputs(3, 20), 1e-5)


@pytest.mark.gpu
def test_gpu_bf16_at_the_bottleneck_width():
    """The tiny preset's widest blocks (C = 256, batch 8) under bf16 autocast."""
    raw = {k: (v if k == "pixel_sum" else v.bfloat16()) for k, v in _inputs(8, 256).items()}
    parity.check_op(parity.under_autocast(_fused, DEVICE),
                    parity.under_autocast(_reference, DEVICE), raw, 3e-2)


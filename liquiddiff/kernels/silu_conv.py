"""(Modulation ->) SiLU -> 1x1 conv that keeps only its input for backward (no Triton kernel).

Autograd on ``conv(silu(z * (1 + scale) + shift))`` keeps z (for the modulation's scale
gradient), y (for SiLU's backward) and silu(y) (the conv's input, for its weight gradient); on
``conv(silu(z))``, z and silu(z). This op keeps z alone and recomputes y and silu(y) in the
backward, elementwise passes that cost far less than the memory they free: one activation per
FeedForward (twice C wide) and CfC g/h head, two per spatial mix. The convolution itself, forward
and backward, stays with cuDNN / the CPU backend (``aten.convolution_backward``), in the dtype
autocast picks, so values and gradients are those of the reference.

Layout: any; the conv keeps the input's memory format (NCHW or channels_last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _tensors

__all__ = ["silu_conv1x1"]


def _conv_dtype(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype the reference's conv runs in: autocast's when it is on, else type promotion."""
    device_type = z.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return _tensors.result_dtype(z, weight, bias)


def _modulate(z, scale, shift):
    """The reference's modulation, in its dtypes (recomputed the same way in backward)."""
    if scale is None:
        return z
    return z * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class _SiluConv1x1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, scale, shift):
        dtype = _conv_dtype(z, weight, bias)
        with torch.autocast(z.device.type, enabled=False):
            a = F.silu(_modulate(z, scale, shift)).to(dtype)
            out = F.conv2d(a, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(z, weight, scale, shift)
        ctx.dtype = dtype
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, scale, shift = ctx.saved_tensors
        need_z, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad
        need_y = need_z or need_scale or need_shift
        dtype = ctx.dtype
        with torch.autocast(z.device.type, enabled=False):
            y = _modulate(z, scale, shift)
            d_a, d_w, d_b = torch.ops.aten.convolution_backward(
                grad_out.to(dtype), F.silu(y).to(dtype), weight.to(dtype), ctx.bias_shape,
                [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_y, need_w, need_b and ctx.bias_shape is not None],
            )
            d_y = torch.ops.aten.silu_backward(d_a.to(y.dtype), y) if need_y else None
        d_z = d_scale = d_shift = None
        if need_z:
            d_z = (d_y if scale is None else d_y * (1 + scale[:, :, None, None])).to(z.dtype)
        if need_scale:
            d_scale = (d_y * z).sum((2, 3)).to(scale.dtype)
        if need_shift:
            d_shift = d_y.sum((2, 3)).to(shift.dtype)
        d_w = d_w.to(weight.dtype) if need_w else None
        d_b = d_b.to(ctx.bias_dtype) if need_b and ctx.bias_shape is not None else None
        return d_z, d_w, d_b, d_scale, d_shift


def silu_conv1x1(z, weight, bias=None, scale=None, shift=None):
    """:func:`liquiddiff.functional.silu_conv1x1`, keeping only its inputs for backward."""
    _tensors.check_activation("z", z)
    _tensors.check_floating("weight", weight)
    if weight.dim() != 4 or weight.shape[1] != z.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"weight: expected shape [Co, {z.shape[1]}, 1, 1], got {tuple(weight.shape)}")
    _tensors.check_device("weight", weight, z.device)
    if bias is not None:
        _tensors.check_vector("bias", bias, (weight.shape[0],), z.device)
    if (scale is None) != (shift is None):
        raise ValueError("scale, shift: give both (the modulation) or neither")
    if scale is not None:
        _tensors.check_vector("scale", scale, z.shape[:2], z.device)
        _tensors.check_vector("shift", shift, z.shape[:2], z.device)
    return _SiluConv1x1.apply(z, weight, bias, scale, shift)

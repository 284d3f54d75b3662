"""SiLU -> 1x1 conv that keeps only the pre-activation for backward (no Triton kernel).

Autograd on ``conv(silu(z))`` keeps two tensors per call: z (for SiLU's backward) and silu(z)
(the conv's input, for its weight gradient). This op keeps z alone and recomputes silu(z) in
the backward, an elementwise pass that costs far less than the memory it frees: one activation
per FeedForward (twice C wide), spatial mix and CfC g/h head. The convolution itself, forward
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


class _SiluConv1x1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias):
        dtype = _conv_dtype(z, weight, bias)
        with torch.autocast(z.device.type, enabled=False):
            y = F.conv2d(F.silu(z).to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(z, weight)
        ctx.dtype = dtype
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, weight = ctx.saved_tensors
        need_z, need_w, need_b = ctx.needs_input_grad
        dtype = ctx.dtype
        a = F.silu(z)
        d_a, d_w, d_b = torch.ops.aten.convolution_backward(
            grad_y.to(dtype), a.to(dtype), weight.to(dtype), ctx.bias_shape,
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_z, need_w, need_b and ctx.bias_shape is not None],
        )
        d_z = torch.ops.aten.silu_backward(d_a.to(z.dtype), z) if need_z else None
        d_w = d_w.to(weight.dtype) if need_w else None
        d_b = d_b.to(ctx.bias_dtype) if need_b and ctx.bias_shape is not None else None
        return d_z, d_w, d_b


def silu_conv1x1(z, weight, bias=None):
    """:func:`liquiddiff.functional.silu_conv1x1`, keeping only ``z`` for backward."""
    _tensors.check_activation("z", z)
    _tensors.check_floating("weight", weight)
    if weight.dim() != 4 or weight.shape[1] != z.shape[1] or weight.shape[2:] != (1, 1):
        raise ValueError(f"weight: expected shape [Co, {z.shape[1]}, 1, 1], got {tuple(weight.shape)}")
    _tensors.check_device("weight", weight, z.device)
    if bias is not None:
        _tensors.check_vector("bias", bias, (weight.shape[0],), z.device)
    return _SiluConv1x1.apply(z, weight, bias)

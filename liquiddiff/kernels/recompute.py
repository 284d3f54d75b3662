"""Convolutions that keep only their input for backward and recompute the rest.

``silu_conv1x1``: (modulation ->) SiLU -> 1x1 conv.

Autograd on ``conv(silu(z * (1 + scale) + shift))`` keeps z (for the modulation's scale
gradient), y (for SiLU's backward) and silu(y) (the conv's input, for its weight gradient); on
``conv(silu(z))``, z and silu(z). This op keeps z alone and recomputes y and silu(y) in the
backward, elementwise passes that cost far less than the memory they free: one activation per
FeedForward (twice C wide), two per spatial mix. The convolution itself runs in the dtype
autocast picks, so values and gradients are those of the reference.

``silu_convs``: SiLU once, then several convolutions of it (the CfC backbone feeding f, g and h):
each conv would keep silu(z); this op keeps z alone, once for all of them. Its forward and
backward bodies (``_heads_forward``, ``_heads_backward``) also serve the CfC branch's node
(``parallel_cfc.py``).

``depthwise_conv`` and ``conv1x1``: under autocast a conv saves the bf16 copy autocast made of
its input. When that input is an fp32 tensor backward has anyway or can remake, this conv keeps
the fp32 tensor itself and casts it again in backward: one bf16 activation less per use, for
one cast.

``spatial_mix_input``: the spatial mix's reads of its input x (the merged depthwise conv, the
pixel sum of its context) and x itself, for the block's residual: one node, so backward sums
x's three gradients in one pass (the Triton kernel's epilogue) or two (after cuDNN), and keeps
the conv-dtype copy of x (what the reference keeps).

``feedforward``: conv1x1 -> SiLU -> conv1x1 (+ residual) as one node that keeps its input
alone and remakes the hidden tensor (one GEMM); its backward takes both convs' bias gradients
from passes it makes anyway (SiLU's backward, the upstream's cast), not from reductions of
their own.

``recompute_saved``: a context in which autograd keeps, instead of a given tensor, the call that
made it, and reruns that call when backward needs the tensor. The block uses it for the CfC's
normalised input (one AdaLN pass from the block's input, which its AdaLN keeps).

The convolutions run on cuDNN / the CPU backend (``aten.convolution`` and its backward), except
the depthwise ones when the ``depthwise_conv`` backend is Triton (``depthwise.py``, opt-in:
``runtime.OPT_IN``).

Layout: any; the conv keeps the input's memory format (NCHW or channels_last).

The backward passes may launch Triton kernels, which autograd cannot differentiate: they are
``once_differentiable``, so a double backward raises instead of missing terms.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from liquiddiff import functional

from . import _tensors, depthwise, pointwise_conv, runtime
from .merged_depthwise import merged_depthwise_weight
from .modulated_silu import (backward as modulated_silu_backward, cast_with_channel_sum, cast_with_pixel_sum,
                             channel_sum, forward as modulated_silu_forward, silu_backward, silu_backward_bias_grad,
                             sum_gradients)

__all__ = ["silu_conv1x1", "silu_convs", "conv1x1", "depthwise_conv", "spatial_mix_input", "recompute_saved"]


def _conv_dtype(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                z_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the reference's conv runs in: autocast's when it is on, else type promotion
    (``z_dtype``: of an input in that dtype, on z's device, not z itself)."""
    device_type = z.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(z_dtype or z.dtype, _tensors.result_dtype(weight, bias))


def _triton_depthwise(a: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether this convolution runs the Triton depthwise kernels: chosen once, in the forward,
    and kept for its backward."""
    return depthwise.is_depthwise(a, weight, groups) and runtime.use_triton("depthwise_conv", a.device.type)


def _triton_pointwise(z: torch.Tensor, weight: torch.Tensor, groups: int, activate: bool, grad: bool = True) -> bool:
    """Whether conv1x1(silu(z)) runs on the Triton pointwise kernels (``pointwise_conv.py``: SiLU
    in the conv's prologue, its backward in the input gradient's epilogue): chosen once, in the
    forward, and kept for the backward. ``grad=False``: for the forward kernel alone, or a call
    that records no gradient (``runtime.FORWARD_ONLY``)."""
    return (activate and groups == 1 and weight.shape[-1] == 1 and weight.shape[-2] == 1
            and runtime.use_triton(pointwise_conv.OP_NAME, z.device.type, grad))


def _records_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (None allowed): a backward may follow."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv(a, weight, bias, dtype, padding: int, groups: int, triton: bool) -> torch.Tensor:
    """The reference's convolution in ``dtype``: the Triton depthwise kernel if ``triton`` (its
    launcher casts the inputs to ``dtype``), else aten on copies cast to ``dtype``: a 1x1
    conv of a channels_last input as a GEMM (:func:`_pointwise_as_gemm`)."""
    if triton:
        return depthwise.forward(a, [weight], [bias], dtype)[0]
    a, weight, bias = a.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    # Eager only. Under torch.compile inductor handles the bias itself, and the layout query
    # below is one dynamo refuses on a tensor made inside an autograd.Function's backward (the
    # CfC's f, g, h remakes): it retraced that backward with every gradient copied to NCHW and
    # left the backward's autocast(enabled=False) on for the rest of the trace (H100:
    # torch.compile(fused) 170 -> 292 ms a step, 14 -> 23 GiB).
    if (groups == 1 and weight.shape[-2:] == (1, 1) and not torch.compiler.is_compiling()
            and a.is_contiguous(memory_format=torch.channels_last)):
        return _pointwise_as_gemm(a, weight, bias)
    return F.conv2d(a, weight, bias, padding=padding, groups=groups)


def _pointwise_as_gemm(a, weight, bias) -> torch.Tensor:
    """The 1x1 conv of a channels_last ``a`` as the GEMM it is, [B*H*W, Ci] x [Ci, Co], the bias
    added in the GEMM's epilogue (cuBLASLt's, on a GPU): cuDNN takes no bias, and aten adds it
    after the conv in a pass of its own, a non-vectorised broadcast add in channels_last (12.4
    ms of the fused H100 step, 1x1 and depthwise convs together). The output is channels_last,
    as cuDNN's; the backward stays ``convolution_backward`` (the same function)."""
    B, C, H, W = a.shape
    rows = a.permute(0, 2, 3, 1).reshape(-1, C)  # a view: channels_last is [B, H, W, C] in memory
    out = F.linear(rows, weight.reshape(weight.shape[0], C), bias)
    return out.view(B, H, W, weight.shape[0]).permute(0, 3, 1, 2)


def _conv_params(weight, bias, dtype):
    """The weight and bias a conv runs with: cast to ``dtype`` once, in the forward, and saved so
    that the backward casts nothing (small tensors, but a launch each)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _conv_backward(grad_out, a, weight, bias_shape, dtype, padding: int, groups: int, needs, triton: bool):
    """(d_a, d_weight, d_bias) of :func:`_conv`, in ``dtype``; None where not needed. After
    cuDNN's, the bias gradient is one Triton pass over grad_out (``modulated_silu.channel_sum``)
    where that op runs Triton, not aten's reduction; a grad_out in a wider dtype (the fp32
    residual stream's) is rounded to ``dtype`` and summed by that pass
    (``modulated_silu.cast_with_channel_sum``)."""
    if triton:
        d_a, (d_w,), (d_b,) = depthwise.backward([grad_out], a, [weight], dtype, needs)
        return d_a, d_w, d_b
    need_a, need_w, need_b = needs
    bias_by_triton = need_b and runtime.use_triton("conv_bias_grad", grad_out.device.type)
    # In the conv's dtype, as the reference's conv receives it (an fp32 upstream, the residual
    # stream's, rounded once): the bias gradient sums the rounded copy, in the cast's pass.
    d_b = None
    if bias_by_triton and grad_out.dtype != dtype:
        grad_out, d_b = cast_with_channel_sum(grad_out, dtype)
    elif bias_by_triton:
        d_b = channel_sum(grad_out, dtype)
    else:
        grad_out = grad_out.to(dtype)
    d_a, d_w, aten_d_b = torch.ops.aten.convolution_backward(
        grad_out, a.to(dtype), weight.to(dtype), bias_shape, [1, 1], [padding, padding], [1, 1],
        False, [0, 0], groups, [need_a, need_w, need_b and not bias_by_triton],
    )
    return d_a, d_w, d_b if bias_by_triton else aten_d_b


def _modulate(z, scale, shift):
    """The reference's modulation, in its dtypes (recomputed the same way in backward)."""
    if scale is None:
        return z
    return z * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def _conv_input(z, scale, shift, activate: bool, dtype, fused_act: bool):
    """(act(modulate(z)), modulate(z) or None): the conv's input, from the Triton modulated
    SiLU (in ``dtype``, y never made) when ``fused_act``, else from aten ops."""
    if fused_act:
        return modulated_silu_forward(z, scale, shift, dtype), None
    y = _modulate(z, scale, shift)
    return (F.silu(y) if activate else y), y


def _eager_input_grads(d_a, y, z, scale, shift, activate: bool, needs):
    """(d_z, d_scale, d_shift) from d_a, the gradient of act(y), y = modulate(z): aten ops."""
    need_z, need_scale, need_shift = needs
    d_y = d_a.to(y.dtype)
    if activate:
        d_y = torch.ops.aten.silu_backward(d_y, y)
    d_z = d_scale = d_shift = None
    if need_z:
        d_z = (d_y if scale is None else d_y * (1 + scale[:, :, None, None])).to(z.dtype)
    if need_scale:
        d_scale = (d_y * z).sum((2, 3)).to(scale.dtype)
    if need_shift:
        d_shift = d_y.sum((2, 3)).to(shift.dtype)
    return d_z, d_scale, d_shift


class _RecomputedConv(torch.autograd.Function):
    """conv(act(modulate(z))) (+ residual: given only where the Triton pointwise forward runs,
    which adds it in its epilogue), act = SiLU or identity, saving z (and the small parameters)
    only. ``pointwise_forward``, ``pointwise_backward``: each pass on the Triton pointwise
    kernels or on the conv's own path, the caller's choice (``runtime.FORWARD_ONLY``: the forward
    kernel under ``auto``, the backward opt-in); the default backward remakes act(z) for the
    weight gradient either way.

    A modulated SiLU (the spatial mix's) runs the Triton kernels of ``modulated_silu.py`` when
    that backend is chosen: one pass writes the conv's input, one pass gives d_z, d_scale and
    d_shift, where aten runs a chain of elementwise ops and reductions."""

    @staticmethod
    def forward(ctx, z, weight, bias, scale, shift, residual, activate, padding, groups, pointwise_forward,
                pointwise_backward):
        dtype = _conv_dtype(z, weight, bias)
        triton = _triton_depthwise(z, weight, groups)
        fused_act = activate and scale is not None and runtime.use_triton("modulated_silu", z.device.type)
        ctx.weight_dtype = weight.dtype
        weight, bias = _conv_params(weight, bias, dtype)
        if residual is not None and not pointwise_forward:
            raise ValueError("residual: only the Triton pointwise forward adds it (silu_conv1x1 adds it otherwise)")
        with torch.autocast(z.device.type, enabled=False):
            if pointwise_forward:
                out = pointwise_conv.forward(z, weight, bias, scale, shift, dtype, residual)
            else:
                a, _ = _conv_input(z, scale, shift, activate, dtype, fused_act)
                out = _conv(a, weight, bias, dtype, padding, groups, triton)
        ctx.save_for_backward(z, weight, scale, shift)
        ctx.conv = (dtype, activate, padding, groups, triton, fused_act, pointwise_backward)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, weight, scale, shift = ctx.saved_tensors
        dtype, activate, padding, groups, triton, fused_act, pointwise = ctx.conv
        need_z, need_w, need_b, need_scale, need_shift, need_residual = ctx.needs_input_grad[:6]
        need_b = need_b and ctx.bias_shape is not None
        # The residual's gradient is the upstream's; the conv's is too, rounded to its dtype
        # (by the kernels as they load it, or by _conv_backward's cast).
        d_residual = grad_out if need_residual else None
        if pointwise:  # SiLU remade in registers by both kernels: no activation pass, no d_a
            d_z, d_w, d_b, d_scale, d_shift = pointwise_conv.backward(
                grad_out, z, weight, scale, shift, dtype, (need_z, need_w, need_b, need_scale, need_shift))
            return (d_z, _cast(d_w, ctx.weight_dtype), _cast(d_b, ctx.bias_dtype), d_scale, d_shift, d_residual,
                    None, None, None, None, None)
        need_y = need_z or need_scale or need_shift
        d_z = d_scale = d_shift = None
        with torch.autocast(z.device.type, enabled=False):
            a, y = _conv_input(z, scale, shift, activate, dtype, fused_act)
            d_a, d_w, d_b = _conv_backward(
                grad_out, a, weight, ctx.bias_shape, dtype, padding, groups, [need_y, need_w, need_b], triton,
            )
            needs = (need_z, need_scale, need_shift)
            if need_y and fused_act:
                d_z, d_scale, d_shift = modulated_silu_backward(d_a, z, scale, shift, needs)
            elif need_y:
                d_z, d_scale, d_shift = _eager_input_grads(d_a, y, z, scale, shift, activate, needs)
        d_w = d_w.to(ctx.weight_dtype) if need_w else None
        d_b = d_b.to(ctx.bias_dtype) if need_b else None
        return d_z, d_w, d_b, d_scale, d_shift, d_residual, None, None, None, None, None


def _cast(grad, dtype):
    """A parameter's gradient in the parameter's dtype; None stays None."""
    return None if grad is None else grad.to(dtype)


def _summed(grads: list):
    """The sum of gradients of one tensor, in >= fp32 when there are several (autograd would add
    bf16 gradients in bf16); the gradient itself when alone, None when none."""
    if len(grads) < 2:
        return grads[0] if grads else None
    total = grads[0].to(torch.promote_types(grads[0].dtype, torch.float32))
    for grad in grads[1:]:
        total = total + grad
    return total


def _paired_heads(weights, triton: list[bool]) -> list[int]:
    """The heads one Triton launch computes: the first two on the Triton depthwise kernels that
    share a kernel size (the CfC's g and h), or the first one alone."""
    first = [i for i, use in enumerate(triton) if use]
    return [i for i in first if weights[i].shape == weights[first[0]].shape][:2] if first else []


def _heads_forward(a, z_channels: int, weights, biases, dtype, triton: list[bool], paired: list[int]) -> list:
    """conv_i(a) for each head, ``a`` = silu(z) in ``dtype``; the ``paired`` heads (see
    :func:`_paired_heads`) in one Triton launch that reads ``a`` once."""
    outs = [None] * len(weights)
    if paired:
        pair = depthwise.forward(a, [weights[i] for i in paired], [biases[i] for i in paired], dtype)
        for i, out in zip(paired, pair):
            outs[i] = out
    for i, (w, b, use) in enumerate(zip(weights, biases, triton)):
        if outs[i] is None:
            outs[i] = _conv(a, w, b, dtype, w.shape[-1] // 2, z_channels // w.shape[1], use)
    return outs


def _heads_backward(grad_outs, z, a, weights, bias_shapes, dtype, triton: list[bool], paired: list[int],
                    need_z: bool, need_ws, need_bs, z_bias_grad: bool = False):
    """(d_z, d_ws, d_bs, d_z's bias gradient) of :func:`_heads_forward` over z, ``a`` = silu(z)
    in ``dtype``: each head's input gradient, their sum and SiLU's backward, with as few passes
    as the backends allow (the pair's epilogue, or one Triton pass over up to three gradients).
    A head whose gradient is None is skipped; d_ws, d_bs in ``dtype``, None where not needed.
    ``z_bias_grad``: d_z summed over the batch and the pixels as the conv that made z would sum
    it for its bias, by the Triton pass that writes d_z where it runs (else None: the caller's).

    ``grad_outs``: a list, emptied (set to None) head by head as each gradient is used, so that a
    caller that hands over its only references frees each before the next head's is made."""
    n = len(weights)
    paired = [i for i in paired if grad_outs[i] is not None]
    d_ws, d_bs = [None] * n, [None] * n
    d_as = []
    for i, (w, bias_shape, use) in enumerate(zip(weights, bias_shapes, triton)):
        if grad_outs[i] is None or i in paired:
            continue
        d_ai, d_ws[i], d_bs[i] = _conv_backward(
            grad_outs[i], a, w, bias_shape, dtype, w.shape[-1] // 2, z.shape[1] // w.shape[1],
            [need_z, need_ws[i], need_bs[i]], use,
        )
        grad_outs[i] = None
        if need_z:
            d_as.append(d_ai)
    d_z = d_z_sum = None
    if paired:  # their input gradient + the others', through SiLU's backward: d_z in one pass
        need = [need_z, any(need_ws[i] for i in paired), any(need_bs[i] for i in paired)]
        d_z, pair_ws, pair_bs = depthwise.backward(
            [grad_outs[i] for i in paired], a, [weights[i] for i in paired], dtype, need,
            silu_input=z, addend=_summed(d_as))
        for i, d_w, d_b in zip(paired, pair_ws, pair_bs):
            d_ws[i], d_bs[i] = d_w if need_ws[i] else None, d_b if need_bs[i] else None
    elif d_as and len(d_as) <= 3:
        d_z, d_z_sum = _silu_backward_with_bias_grad(d_as, z, z_bias_grad)
    elif d_as:
        d_z = torch.ops.aten.silu_backward(_summed(d_as).to(z.dtype), z)
    return d_z, d_ws, d_bs, d_z_sum


class _SiluConvs(torch.autograd.Function):
    """(conv_i(silu(z)))_i for 1x1 / depthwise weights, saving z (and the weights) only. In
    backward, SiLU's backward over the heads' summed input gradients is one Triton pass
    (``modulated_silu.silu_backward``) where that backend runs.

    With the Triton depthwise kernels, two depthwise heads of one kernel size (the CfC's g and
    h) are one launch each way: the forward reads silu(z) once for both; the backward's input
    gradient sums both heads, adds the other heads' gradient and applies SiLU's backward in the
    same pass, and one weight-gradient launch serves both heads."""

    @staticmethod
    def forward(ctx, z, n, *params):
        weights, biases = params[:n], params[n:]
        dtype = _conv_dtype(z, weights[0], biases[0])
        ctx.triton = [_triton_depthwise(z, w, z.shape[1] // w.shape[1]) for w in weights]
        ctx.paired = _paired_heads(weights, ctx.triton)
        ctx.weight_dtypes = [w.dtype for w in weights]
        ctx.biases = [None if b is None else (list(b.shape), b.dtype) for b in biases]
        weights, biases = zip(*(_conv_params(w, b, dtype) for w, b in zip(weights, biases)))
        with torch.autocast(z.device.type, enabled=False):
            outs = _heads_forward(F.silu(z).to(dtype), z.shape[1], weights, biases, dtype, ctx.triton, ctx.paired)
        ctx.save_for_backward(z, *weights)
        ctx.dtype = dtype
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        z, *weights = ctx.saved_tensors
        n = len(weights)
        needs = ctx.needs_input_grad
        need_bs = [bias is not None and need for bias, need in zip(ctx.biases, needs[2 + n:])]
        with torch.autocast(z.device.type, enabled=False):
            d_z, d_ws, d_bs, _ = _heads_backward(
                list(grad_outs), z, F.silu(z).to(ctx.dtype), weights, [None if b is None else b[0] for b in ctx.biases],
                ctx.dtype, ctx.triton, ctx.paired, needs[0], needs[2:2 + n], need_bs)
        d_ws = [None if d is None else d.to(w_dtype) for d, w_dtype in zip(d_ws, ctx.weight_dtypes)]
        d_bs = [None if d is None else d.to(bias[1]) for d, bias in zip(d_bs, ctx.biases)]
        return (d_z, None, *d_ws, *d_bs)


def _check_conv(name: str, z, weight, bias, kernel: int | None, depthwise: bool, conv: str = "") -> int:
    """Argument checks before any work; returns the kernel size (odd, 'same' padding). ``conv``
    prefixes the weight's and bias's names (one of several convolutions)."""
    _tensors.check_activation(name, z)
    _tensors.check_floating(f"{conv}weight", weight)
    k = weight.shape[-1] if kernel is None and weight.dim() == 4 else kernel
    channels = z.shape[1]
    expected = (channels if depthwise else weight.shape[0], 1 if depthwise else channels, k, k)
    if weight.dim() != 4 or tuple(weight.shape) != expected or not k or k % 2 == 0:
        shape = f"[{channels}, 1, k, k] (k odd)" if depthwise else f"[Co, {channels}, 1, 1]"
        raise ValueError(f"{conv}weight: expected shape {shape}, got {tuple(weight.shape)}")
    _tensors.check_device(f"{conv}weight", weight, z.device)
    if bias is not None:
        _tensors.check_vector(f"{conv}bias", bias, (weight.shape[0],), z.device)
    return k


def _check_residual(residual, z_shape, weight, device) -> None:
    """A residual added to a 1x1 conv's output: that output's shape, on its device."""
    if residual is None:
        return
    _tensors.check_activation("residual", residual)
    expected = (z_shape[0], weight.shape[0], *z_shape[2:])
    if tuple(residual.shape) != expected:
        raise ValueError(f"residual: expected the conv's output shape {expected}, got {tuple(residual.shape)}")
    _tensors.check_device("residual", residual, device)


def silu_conv1x1(z, weight, bias=None, scale=None, shift=None, residual=None):
    """:func:`liquiddiff.functional.silu_conv1x1`, keeping only z and the small parameters for
    backward (the residual's gradient is the upstream one); with the Triton pointwise forward
    (under ``auto``, ``runtime.FORWARD_ONLY``; its backward kernels are opt-in), the residual is
    added in the forward kernel's epilogue."""
    _check_conv("z", z, weight, bias, kernel=1, depthwise=False)
    if (scale is None) != (shift is None):
        raise ValueError("scale, shift: give both (the modulation) or neither")
    if scale is not None:
        _tensors.check_vector("scale", scale, z.shape[:2], z.device)
        _tensors.check_vector("shift", shift, z.shape[:2], z.device)
    _check_residual(residual, z.shape, weight, z.device)
    # The forward kernel where it runs (runtime.FORWARD_ONLY: under auto in every call), the
    # backward kernels only where chosen for calls with gradient (opt-in).
    forward = _triton_pointwise(z, weight, 1, True, grad=False)
    backward = _records_grad(z, weight, bias, scale, shift, residual) and _triton_pointwise(z, weight, 1, True)
    if residual is not None and not forward:
        # cuDNN takes no addend: autograd's add, as the reference's (a checkpointed block's
        # rerun in backward stops before it: it saves nothing).
        return residual + _RecomputedConv.apply(z, weight, bias, scale, shift, None, True, 0, 1, False, backward)
    return _RecomputedConv.apply(z, weight, bias, scale, shift, residual, True, 0, 1, forward, backward)


def conv1x1(x, weight, bias=None):
    """:func:`liquiddiff.functional.conv1x1`, keeping ``x`` itself (not autocast's copy): an
    fp32 x that backward has anyway is kept once, not with a bf16 copy beside it."""
    _check_conv("x", x, weight, bias, kernel=1, depthwise=False)
    return _RecomputedConv.apply(x, weight, bias, None, None, None, False, 0, 1, False, False)


class _FeedForward(torch.autograd.Function):
    """conv1x1(silu(conv1x1(x, w1, b1)), w2, b2) (+ residual) as one node, saving x and the cast
    weights only: backward remakes the hidden tensor (twice x's width) by one GEMM from x, which
    the first conv's weight gradient reads anyway.

    One node, so the first conv's bias gradient comes from SiLU's backward pass, which sums the
    hidden tensor's gradient over the pixels as it writes it (Triton,
    ``modulated_silu.silu_backward_bias_grad``), and the second conv's from the pass that rounds
    the fp32 upstream to the conv's dtype (``cast_with_channel_sum``): no reduction reads either
    gradient back. ``pointwise_forward``, ``pointwise_backward``: the second conv's passes on the
    Triton pointwise kernels (SiLU in registers; the forward adds the residual in its epilogue),
    as :class:`_RecomputedConv`'s."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, residual, pointwise_forward, pointwise_backward):
        dtype = _conv_dtype(x, w1, b1)
        out_dtype = _conv_dtype(x, w2, b2, z_dtype=dtype)  # the hidden tensor's conv
        ctx.param_dtypes = [None if p is None else p.dtype for p in (w1, b1, w2, b2)]
        ctx.bias_shapes = [None if b is None else list(b.shape) for b in (b1, b2)]
        (w1, b1), (w2, b2) = _conv_params(w1, b1, dtype), _conv_params(w2, b2, out_dtype)
        with torch.autocast(x.device.type, enabled=False):
            hidden = _hidden(x, w1, b1, dtype, pointwise_forward, activation=False)
            if pointwise_forward:
                out = pointwise_conv.forward(hidden, w2, b2, None, None, out_dtype, residual)
            else:
                out = _conv(F.silu(hidden), w2, b2, out_dtype, 0, 1, False)
                if residual is not None:
                    out = residual + out
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.dtypes = dtype, out_dtype
        ctx.pointwise = pointwise_forward, pointwise_backward
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w1, b1, w2 = ctx.saved_tensors
        dtype, out_dtype = ctx.dtypes
        need_x, need_w1, need_b1, need_w2, need_b2, need_residual = ctx.needs_input_grad[:6]
        need_b1, need_b2 = (need and shape is not None for need, shape in zip((need_b1, need_b2), ctx.bias_shapes))
        need_hidden = need_x or need_w1 or need_b1
        pointwise_forward, pointwise_backward = ctx.pointwise
        d_x = d_w1 = d_b1 = None
        with torch.autocast(x.device.type, enabled=False):
            if pointwise_backward:  # SiLU remade and its backward applied in registers
                hidden = _hidden(x, w1, b1, dtype, pointwise_forward, activation=False)
                d_hidden, d_w2, d_b2, _, _ = pointwise_conv.backward(
                    grad_out, hidden, w2, None, None, out_dtype, (need_hidden, need_w2, need_b2, False, False))
            else:
                hidden, a = _hidden(x, w1, b1, dtype, pointwise_forward, activation=True)
                d_a, d_w2, d_b2 = _conv_backward(grad_out, a, w2, ctx.bias_shapes[1], out_dtype, 0, 1,
                                                 [need_hidden, need_w2, need_b2], False)
                del a
                if need_hidden:
                    d_hidden, d_b1 = _silu_backward_with_bias_grad([d_a], hidden, need_b1)
                    del d_a
            del hidden
            if need_hidden:
                d_x, d_w1, conv_d_b1 = _conv_backward(d_hidden, x, w1, ctx.bias_shapes[0], dtype, 0, 1,
                                                      [need_x, need_w1, need_b1 and d_b1 is None], False)
                d_b1 = conv_d_b1 if d_b1 is None else d_b1
        grads = [_cast(d, p_dtype) for d, p_dtype in zip((d_w1, d_b1, d_w2, d_b2), ctx.param_dtypes)]
        return (d_x, grads[0], grads[1] if need_b1 else None, grads[2], grads[3] if need_b2 else None,
                grad_out if need_residual else None, None, None)


def _hidden(x, w1, b1, dtype, triton: bool, activation: bool):
    """The FeedForward's hidden tensor, made the same way in its forward and its backward's
    remake (the Triton forward kernel's tiles where the forward kernel runs, else aten's GEMM),
    with its SiLU when ``activation``: (hidden, silu(hidden)), by one pass on Triton, where a
    SiLU pass read the GEMM's output back."""
    if triton and activation:
        return pointwise_conv.conv1x1_and_silu_forward(x, w1, b1, dtype)
    hidden = pointwise_conv.conv1x1_forward(x, w1, b1, dtype) if triton else _conv(x, w1, b1, dtype, 0, 1, False)
    return (hidden, F.silu(hidden)) if activation else hidden


def _silu_backward_with_bias_grad(grads, z, need_bias: bool):
    """(d_z for SiLU's backward of the sum of ``grads`` at z, the bias gradient of the conv that
    made z or None: left to that conv's backward). One pass for both where SiLU's backward and
    that conv's bias gradient run Triton."""
    device_type = z.device.type
    if not runtime.use_triton("modulated_silu", device_type):
        return torch.ops.aten.silu_backward(_summed(grads).to(z.dtype), z), None
    if need_bias and runtime.use_triton("conv_bias_grad", device_type):
        return silu_backward_bias_grad(grads, z)
    return silu_backward(grads, z), None


def feedforward(x, w1, b1, w2, b2, residual=None):
    """:func:`liquiddiff.functional.feedforward` as one node (:class:`_FeedForward`); or, in a
    call that records no gradient with the Triton pointwise kernels chosen for calls with
    gradient (``pointwise_conv=triton``, as the CfC heads kernel), one Triton pass that never
    writes the hidden tensor (``pointwise_conv.feedforward_forward``)."""
    _tensors.check_activation("x", x)
    for name, weight, bias, inputs in (("w1", w1, b1, x.shape[1]), ("w2", w2, b2, w1.shape[0])):
        _tensors.check_floating(name, weight)
        if weight.dim() != 4 or tuple(weight.shape[1:]) != (inputs, 1, 1):
            raise ValueError(f"{name}: expected shape [Co, {inputs}, 1, 1], got {tuple(weight.shape)}")
        _tensors.check_device(name, weight, x.device)
        if bias is not None:
            _tensors.check_vector(f"b{name[1]}", bias, (weight.shape[0],), x.device)
    _check_residual(residual, (x.shape[0], w1.shape[0], *x.shape[2:]), w2, x.device)
    dtype = _conv_dtype(x, w1, b1)
    grad = _records_grad(x, w1, b1, w2, b2, residual)
    if (not grad and w2.shape[0] <= pointwise_conv.MAX_FEEDFORWARD_CHANNELS
            and _conv_dtype(x, w2, b2) == dtype and _triton_pointwise(x, w2, 1, True)):
        return pointwise_conv.feedforward_forward(x, w1, b1, w2, b2, dtype, residual)
    # The second conv's kernels as silu_conv1x1 picks them (runtime.FORWARD_ONLY).
    forward = _triton_pointwise(x, w2, 1, True, grad=False)
    backward = grad and _triton_pointwise(x, w2, 1, True)
    return _FeedForward.apply(x, w1, b1, w2, b2, residual, forward, backward)


def depthwise_conv(x, weight, bias=None):
    """:func:`liquiddiff.functional.depthwise_conv`, keeping ``x`` itself (not autocast's copy)."""
    k = _check_conv("x", x, weight, bias, kernel=None, depthwise=True)
    return _RecomputedConv.apply(x, weight, bias, None, None, None, False, k // 2, x.shape[1], False, False)


class _SpatialMixInput(torch.autograd.Function):
    """(conv(x), x.sum((2, 3)), x) for a depthwise conv, saving the conv-dtype copy of x (nothing
    else keeps the spatial mix's input: half the bytes of an fp32 x, what the reference keeps).
    An fp32 x under autocast is copied and summed in one pass (``modulated_silu.cast_with_pixel_sum``)
    before the convolution, which reads the copy (cuDNN's or the Triton depthwise kernel's).

    Backward sums x's three gradients, the conv's input gradient, the broadcast pixel-sum
    gradient and the residual's, into one tensor in x's dtype: in the Triton kernel's epilogue,
    or two passes after cuDNN's, where autograd made a cast and two adds of full size.

    ``x_conv``, ``pixel_sum``: both already made (``parallel_cfc(copy_dtype=)``), or None: the
    same values, the pass skipped; their gradients are x's."""

    @staticmethod
    def forward(ctx, x, weight, bias, x_conv, pixel_sum):
        dtype = _conv_dtype(x, weight, bias)
        ctx.triton = _triton_depthwise(x, weight, x.shape[1])
        ctx.weight_dtype = weight.dtype
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        weight, bias = _conv_params(weight, bias, dtype)
        if x_conv is None or x_conv.dtype != dtype:  # else both made with x (the CfC kernel)
            x_conv, pixel_sum = _copy_with_pixel_sum(x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            local = _conv(x_conv, weight, bias, dtype, weight.shape[-1] // 2, x.shape[1], ctx.triton)
        ctx.save_for_backward(x_conv, weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not a tensor of zeros
        return local, pixel_sum, x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_local, d_sum, d_residual):
        x_conv, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.bias_shape is not None
        d_x = d_w = d_b = None
        with torch.autocast(x_conv.device.type, enabled=False):
            if d_local is not None and (need_x or need_w or need_b):
                k = weight.shape[-1]
                needs = [need_x, need_w, need_b]
                if ctx.triton:
                    d_x, (d_w,), (d_b,) = depthwise.backward([d_local], x_conv, [weight], ctx.dtype, needs,
                                                             addend=d_residual, channel_addend=d_sum)
                    d_sum = d_residual = None  # summed in
                else:
                    d_x, d_w, d_b = _conv_backward(d_local, x_conv, weight, ctx.bias_shape, ctx.dtype, k // 2,
                                                   x_conv.shape[1], needs, False)
            if need_x:
                d_x = _sum_gradients(d_x, d_sum, d_residual, ctx.x_dtype, x_conv)
        d_w = d_w.to(ctx.weight_dtype) if need_w and d_w is not None else None
        d_b = d_b.to(ctx.bias_dtype) if need_b and d_b is not None else None
        return d_x, d_w, d_b, None, None


def _copy_with_pixel_sum(x, dtype):
    """(x in ``dtype``, x summed over its pixels): for the model's fp32 stream under autocast one
    pass over x (the copy backward keeps and the pixel sum, fp32 in any autocast state as the
    reference's), where a cast and a sum took two."""
    if x.dtype == torch.float32 and dtype != x.dtype and runtime.use_triton("modulated_silu", x.device.type):
        return cast_with_pixel_sum(x, dtype)
    return x.to(dtype), x.sum(dim=(2, 3))  # the sum in the caller's autocast state, as the reference's


def _sum_gradients(d_x, d_sum, d_residual, dtype, like):
    """d_residual + d_x + d_sum (broadcast over the pixels) in ``dtype``, None terms left out: a
    fresh tensor when there are several (incoming gradients may be shared), in one Triton pass
    (``modulated_silu.sum_gradients``, where that backend runs) or two of torch's."""
    terms = [d for d in (d_residual, d_x) if d is not None]
    if d_sum is not None:
        terms.append(d_sum[:, :, None, None].expand(like.shape))
    if not terms:
        return None
    if len(terms) > 1 and runtime.use_triton("modulated_silu", like.device.type):
        return sum_gradients(terms, dtype)
    total = terms[0] if len(terms) == 1 else torch.add(terms[0], terms[1])
    for d in terms[2:]:
        total = total.add_(d)
    return total.to(dtype)


def spatial_mix_input(x, weights, biases, precomputed=None):
    """:func:`liquiddiff.functional.spatial_mix_input`: the merged depthwise conv (on the Triton
    kernels when selected) of the conv-dtype copy of x, x's pixel sum and x, as one node whose
    backward sums x's three gradients in one or two passes.

    ``precomputed``: ``(x.to(dtype), x.sum((2, 3)))`` made with x (``parallel_cfc(copy_dtype=)``;
    None entries: not made), used where the conv runs in ``dtype``, without gradients of their
    own (x's gradient holds theirs)."""
    _tensors.check_activation("x", x)
    weight, bias = merged_depthwise_weight(weights, biases)
    _check_conv("x", x, weight, bias, kernel=None, depthwise=True)
    x_conv, pixel_sum = (None, None) if precomputed is None else precomputed
    if (x_conv is None) != (pixel_sum is None):
        raise ValueError("precomputed: expected (copy, pixel sum), both tensors or both None")
    if x_conv is not None:
        _tensors.check_activation("precomputed[0]", x_conv, like=x)
        _tensors.check_vector("precomputed[1]", pixel_sum, x.shape[:2], x.device)
    return _SpatialMixInput.apply(x, weight, bias, x_conv, pixel_sum)


def silu_convs(z, weights, biases):
    """:func:`liquiddiff.functional.silu_convs`, keeping only ``z`` for backward."""
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"weights, biases: expected equally many (at least one), got {len(weights)} and {len(biases)}")
    for w, b in zip(weights, biases):
        depthwise = isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[1] == 1 and w.shape[-1] > 1
        _check_conv("z", z, w, b, kernel=None if depthwise else 1, depthwise=depthwise)
    return _SiluConvs.apply(z, len(weights), *weights, *biases)


class _Recipe:
    """A saved tensor's replacement: the call that made it and the autocast state it ran in;
    with ``index``, output ``index`` of a call that makes several saved tensors, whose first
    unpack leaves the others in ``shared`` for their own (each taken once: a second backward
    runs the call again)."""

    __slots__ = ("fn", "args", "device_type", "autocast", "index", "shared")

    def __init__(self, fn: Callable, args: tuple, device_type: str, index: int | None = None,
                 shared: dict | None = None):
        self.fn, self.args, self.device_type, self.index, self.shared = fn, args, device_type, index, shared
        self.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def __call__(self) -> torch.Tensor:
        if self.index is None:
            return self._run()
        made = self.shared.pop(self.index, None)
        if made is None:
            outs = self._run()
            self.shared.update((i, t) for i, t in enumerate(outs) if i != self.index)
            made = outs[self.index]
        return made

    def _run(self):
        # Backward may run without the forward's autocast (CUDA's engine thread never has it),
        # and the recomputed tensor must be the forward's, bit for bit.
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
            return self.fn(*self.args)


class _RecomputeHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that pack the listed tensors as their recipes and hand every other
    tensor to the hooks that were active outside (a caller's ``save_on_cpu``, a memory probe),
    which a plain nested pair of hooks would silently override.

    The pack hook is a closure, not a bound method: a method would make the hooks object a
    reference cycle (it keeps its hooks), so its table, and every recipe's arguments (a block's
    fp32 input), would live through backward and past the step until Python's cycle collector
    ran, where they should go as soon as the node that saved the recipe has run."""

    def __init__(self, table: dict):
        outer: list = [None]  # the enclosing hooks, read when this context is entered

        def pack(tensor):
            entry = table.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                return entry[1]
            if outer[0] is None:
                return tensor.detach()  # not the tensor itself: a saved output would be a cycle
            return outer[0], outer[0][0](tensor)

        super().__init__(pack, self._unpack)
        self._outer = outer

    def __enter__(self):
        self._outer[0] = torch._C._autograd._top_saved_tensors_default_hooks(False)
        super().__enter__()

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, _Recipe):
            return packed()
        if isinstance(packed, tuple):
            (_, unpack), value = packed
            return unpack(value)
        return packed


def recompute_saved(*recipes: tuple[torch.Tensor | tuple, Callable, tuple]):
    """Context manager: for each ``(tensor, fn, args)``, where ``tensor`` is ``fn(*args)``,
    autograd saves the call instead of ``tensor`` and reruns it (without grad, in the forward's
    autocast state) when backward unpacks it; ``tensor`` a tuple: the outputs of ``fn(*args)``,
    one call remaking them all where they are unpacked together. Other saved tensors go to the
    enclosing hooks.

    It frees memory only when ``args`` are tensors backward keeps anyway, and ``fn`` must be
    deterministic. Under ``torch.compile`` it does nothing: the compiler chooses what to save.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    # Keyed by id, checked through a weak reference: autograd keeps the pack hook as long as the
    # graph lives, and a strong reference there would keep the very tensors this frees.
    table = {}
    for made, fn, args in recipes:
        if isinstance(made, torch.Tensor):
            table[id(made)] = weakref.ref(made), _Recipe(fn, args, made.device.type)
            continue
        shared: dict = {}
        for i, t in enumerate(made):
            table[id(t)] = weakref.ref(t), _Recipe(fn, args, t.device.type, i, shared)
    return _RecomputeHooks(table)

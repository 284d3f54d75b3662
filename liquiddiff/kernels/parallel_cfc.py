"""ParallelCfC's branch (:func:`liquiddiff.functional.parallel_cfc`) as one autograd node.

    backbone = silu(conv1x1(depthwise7x7(n)));  f = conv1x1(backbone)
    g, h = conv1x1(silu(depthwise3x3(backbone)));  out = cfc_relax(f, g, h, n, a, b, rho, t, residual)

Composed of the block's ops (the Triton CfC kernel, the g/h depthwise pair and SiLU backward of
``recompute.py``, cuDNN 1x1 convolutions, or with the opt-in pointwise kernels the three heads
and the CfC gate as one kernel each way, ``cfc_heads.py``, and the g/h heads' SiLU -> 1x1
backward by ``pointwise_conv.py``), it keeps what they keep: n (and ``n_conv``, its copy in the
conv dtype, when given), the depthwise output, the backbone pre-activation z and the g/h hidden
tensors (the CfC op's f, g and h are remade in
backward, as are the SiLUs), and owns the backward's schedule. As separate autograd nodes the
same ops remade silu(z) and each head's SiLU twice (once to remake f, g, h for the CfC op, once
for the conv that consumes them), and autograd summed n's two gradients (from the CfC op, in fp32,
and from the 7x7 conv, in bf16 under autocast) with a cast and an add. Here each SiLU is remade
once, and the 7x7 conv's input gradient adds the CfC op's: in its epilogue with the Triton
depthwise kernel, else in one add. Per block, at [8, 64, 256, 256] under bf16 autocast, that is
about 0.7 GB less traffic per train step (``python -m benchmarks.traffic``).

When the caller keeps a recipe for n (``recompute_saved``: the block remakes it from its AdaLN),
backward remakes n once; before, both of n's consumers unpacked (and so remade) it. Under
autocast the block's AdaLN also hands over n in the convolutions' dtype (``n_conv``, written in
its pass), which the 7x7 reads where it would cast n (fp32) by a pass of its own (and its
weight gradient in backward, remade with n by one AdaLN pass), and the CfC
kernel writes its output's bf16 copy and pixel sum for the spatial mix (``copy_dtype``), which
read the output back in a pass of their own (``modulated_silu.cast_with_pixel_sum``).
``normalized_parallel_cfc`` takes the AdaLN before the branch into the node (n = AdaLN(u), u the
residual): n is written once, in the convolutions' dtype, and the CfC kernels remake its exact
values from u and the AdaLN's statistics, forward and backward; backward remakes the copy alone
(for the 7x7's weight gradient) and ends with the AdaLN's backward.

Biases on cuDNN, which takes none (aten would add each in a pass over the conv's output and sum
grad_out for its gradient): the 7x7's goes into the backbone 1x1's GEMM bias, the g/h 3x3s' into
their SiLU (the Triton modulated SiLU with shift = bias), whose backward's pixel sums give their
gradients; the 1x1s' are in their GEMMs' epilogue (``recompute._pointwise_as_gemm``). The
backbone 1x1's bias gradient (from which the folded 7x7 bias's comes) is summed by the SiLU
backward pass that writes its input gradient (``modulated_silu.silu_backward_bias_grad``).

The g and h heads' 1x1 convs run the Triton SiLU -> 1x1 conv forward (``runtime.FORWARD_ONLY``),
their SiLU and 3x3 bias in its prologue (backward remakes their SiLU for cuDNN as before). In a
call without gradient (sampling) the backbone's 1x1 runs it too, with its SiLU in the epilogue
(``pointwise_conv.conv1x1_silu_forward``: its pre-activation z is never written), and with the
Triton depthwise kernels chosen the heads' 3x3 convs run in their prologue
(``pointwise_conv.depthwise_forward``: their outputs are never written).

Layout: any; outputs keep n's memory format. Without the Triton CfC kernel (``cfc_relax`` on its
torch backend) the reference runs instead, as for the other fused ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from liquiddiff import functional

from . import _tensors, adaln, cfc_heads, depthwise, pointwise_conv, runtime
# By name: the package attribute ``cfc_relax`` is the op, not this module.
from .cfc_relax import backward as cfc_relax_backward, check_gate_parameters, forward as cfc_relax_forward
from .modulated_silu import backward as modulated_silu_backward, forward as modulated_silu_forward
from .recompute import (_check_conv, _conv, _conv_backward, _conv_dtype, _conv_params, _heads_backward,
                        _heads_forward, _paired_heads, _records_grad, _triton_depthwise, _triton_pointwise)

__all__ = ["parallel_cfc", "normalized_parallel_cfc", "normalized_parallel_cfc_runs"]

_CONVS = len(functional.CFC_CONVS)
_DW, _PW, _F, _G_DW, _G_PW, _H_DW, _H_PW = range(_CONVS)
_HEADS = (_F, _G_DW, _H_DW)  # the convolutions of silu(z)
_SMALL = 4  # a, b, rho, t


def _pick(items, indices):
    return [items[i] for i in indices]


class _ParallelCfC(torch.autograd.Function):
    """Inputs: n, residual, a, b, rho, t, then the weights and the biases of CFC_CONVS, then
    n_conv (n in the convolutions' dtype, or None), copy_dtype (None, or the dtype of the
    output's copy that comes back with its pixel sum) and grad (whether autograd records the
    call): :func:`parallel_cfc`."""

    @staticmethod
    def forward(ctx, n, residual, a, b, rho, t, *params):
        weights, biases = params[:_CONVS], params[_CONVS:2 * _CONVS]
        n_conv, copy_dtype, grad = params[2 * _CONVS:]
        out, saved = _forward(ctx, n, residual, (a, b, rho, t), weights, biases, n_conv, copy_dtype, grad)
        # n_conv too, for the 7x7's weight gradient: the block remakes it with n, by
        # one AdaLN pass (recompute_saved), where backward cast n by a pass of its own.
        ctx.save_for_backward(n, n_conv, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # Triton kernels: no graph of the backward
    def backward(ctx, grad_out, *_copies):  # the copies take no gradient: only out's runs this
        needs = ctx.needs_input_grad
        if grad_out is None:  # not materialised (copy_dtype): out did not reach the loss
            return (None,) * len(needs)
        n, n_conv, *saved = ctx.saved_tensors
        d_ns, d_residual, d_small, d_ws, d_bs = _backward(ctx, grad_out, n, n_conv, saved, needs)
        # n_conv (its gradient is n's), copy_dtype, grad
        return (d_ns[0], d_residual, *d_small, *d_ws, *d_bs, None, None, None)


class _NormalizedParallelCfC(torch.autograd.Function):
    """Inputs: u, scale, shift, eps, a, b, rho, t, then the weights and the biases of
    CFC_CONVS, copy_dtype and grad: :func:`normalized_parallel_cfc`. n = AdaLN(u) is written in
    the convolutions' dtype alone; the CfC kernels remake n exactly from u, forward and backward;
    backward remakes n's copy for the 7x7's weight gradient by one AdaLN pass from u and runs
    AdaLN's backward on n's gradient, u's gradient as the CfC residual added in that pass."""

    @staticmethod
    def forward(ctx, u, scale, shift, eps, a, b, rho, t, *params):
        weights, biases = params[:_CONVS], params[_CONVS:2 * _CONVS]
        copy_dtype, grad = params[2 * _CONVS:]
        ctx.eps = eps
        ctx.n_dtype = _conv_dtype(u, weights[_DW], biases[_DW])
        n, mean, rstd = adaln.normalize(u, scale, shift, eps, out_dtype=ctx.n_dtype)
        normalization = (mean, rstd, scale, shift)
        out, saved = _forward(ctx, n, u, (a, b, rho, t), weights, biases, None, copy_dtype, grad, normalization)
        ctx.shift_dtype = shift.dtype
        ctx.save_for_backward(u, *normalization, *saved)  # not n: remade from u in backward
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_copies):
        if grad_out is None:  # not materialised: out did not reach the loss
            return (None,) * len(ctx.needs_input_grad)
        u, mean, rstd, scale, shift, *saved = ctx.saved_tensors
        need_u, need_scale, need_shift = ctx.needs_input_grad[:3]
        needs = ctx.needs_input_grad[4:8 + 2 * _CONVS]
        need_n = need_u or need_scale or need_shift
        n = adaln.normalize(u, scale, shift, ctx.eps, out_dtype=ctx.n_dtype)[0]  # the forward's, remade
        d_ns, d_residual, d_small, d_ws, d_bs = _backward(ctx, grad_out, n, None, saved, (need_n, need_u, *needs),
                                                          (u, mean, rstd, scale, shift))
        del n
        d_u = d_scale = d_shift = None
        if need_n:  # n's gradients (the CfC op's and the 7x7's, or their sum) summed by the AdaLN kernel
            d_u, d_scale, d_shift = adaln.normalize_backward(d_ns, d_residual, u, mean, rstd, scale, ctx.shift_dtype,
                                                             (need_u, need_scale, need_shift))
        return (d_u, d_scale, d_shift, None, *d_small, *d_ws, *d_bs, None, None)  # eps, copy_dtype, grad


def _forward(ctx, n, residual, small, weights, biases, n_conv, copy_dtype, grad, normalization=None):
    """(out, the tensors backward needs besides n and n_conv) of :func:`parallel_cfc`, ctx set up
    for :func:`_backward`. ``normalization`` (mean, rstd, scale, shift): n is AdaLN(residual)
    with these, remade by the CfC kernel, and ``n`` is its copy in the convolutions' dtype."""
    a, b, rho, t = small
    channels = n.shape[1]
    dtype = _conv_dtype(n, weights[_DW], biases[_DW])
    if n_conv is not None and n_conv.dtype != dtype:
        n_conv = None  # n, cast by the 7x7's launch
    triton = [_triton_depthwise(n, w, channels // w.shape[1]) for w in weights]  # 1x1: never
    ctx.dw_triton, ctx.head_triton = triton[_DW], _pick(triton, _HEADS)
    ctx.paired = _paired_heads(_pick(weights, _HEADS), ctx.head_triton)
    ctx.param_dtypes = [p.dtype for p in weights], [None if b is None else b.dtype for b in biases]
    weights, biases = zip(*(_conv_params(w, b, dtype) for w, b in zip(weights, biases)))
    with torch.autocast(n.device.type, enabled=False):
        # On cuDNN the 7x7's bias moves into the 1x1's (its GEMM epilogue, _backbone_bias):
        # dw is kept without it. The Triton depthwise kernel adds it in registers.
        ctx.folded = not ctx.dw_triton and biases[_DW] is not None
        dw_bias = None if ctx.folded else biases[_DW]
        z_bias = _backbone_bias(weights[_PW], biases[_PW], biases[_DW]) if ctx.folded else biases[_PW]
        dw = _conv(n if n_conv is None else n_conv, weights[_DW], dw_bias, dtype, weights[_DW].shape[-1] // 2,
                   channels, ctx.dw_triton)
        # The Triton SiLU -> 1x1 conv forward (runtime.FORWARD_ONLY) runs the g and h 1x1s
        # with their SiLU (and 3x3 bias) in the prologue, and the backbone's 1x1 with its SiLU
        # in the epilogue: z, which backward needs, written by the same pass, and without
        # gradient never written; with the Triton depthwise kernels chosen and no gradient, the
        # g and h 3x3s in the heads' prologue (never written).
        pointwise_forward = _triton_pointwise(n, weights[_PW], 1, True, grad=False)
        forward_only = not grad and pointwise_forward
        if forward_only:
            z, silu_z = None, pointwise_conv.conv1x1_silu_forward(dw, weights[_PW], z_bias, dtype)
        elif pointwise_forward:
            z, silu_z = pointwise_conv.conv1x1_and_silu_forward(dw, weights[_PW], z_bias, dtype)
        else:
            z = _conv(dw, weights[_PW], z_bias, dtype, 0, 1, False)
            silu_z = F.silu(z)
        ctx.pointwise = _triton_pointwise(n, weights[_G_PW], 1, True)
        ctx.hidden_zero = _hidden_zero(n, biases, ctx.pointwise, ctx.head_triton)
        hidden_biases = _hidden_biases(ctx.hidden_zero, biases)
        if ctx.pointwise:
            # f, g and h never leave the registers of one kernel (cfc_heads.py): here only the
            # depthwise heads. f (head 0) is a 1x1 conv, never in the Triton pair.
            g_hidden, h_hidden = _heads_forward(silu_z, channels, _pick(weights, _HEADS[1:]),
                                                _pick(biases, _HEADS[1:]), dtype, ctx.head_triton[1:],
                                                [i - 1 for i in ctx.paired])
            out = cfc_heads.forward(silu_z, g_hidden, h_hidden,
                                    [(weights[i], biases[i]) for i in (_F, _G_PW, _H_PW)],
                                    n, a, b, rho, t, residual, dtype)
        else:
            depthwise_heads = all(ctx.head_triton[1:]) and channels <= pointwise_conv.MAX_DEPTHWISE_HEAD_CHANNELS
            if forward_only and depthwise_heads:
                f = _conv(silu_z, weights[_F], biases[_F], dtype, 0, 1, False)
                # Two calls, no comprehension: a closure over silu_z would make the ``del``
                # below one that dynamo cannot trace.
                g = pointwise_conv.depthwise_forward(silu_z, weights[_G_DW], biases[_G_DW], weights[_G_PW],
                                                     biases[_G_PW], dtype)
                h = pointwise_conv.depthwise_forward(silu_z, weights[_H_DW], biases[_H_DW], weights[_H_PW],
                                                     biases[_H_PW], dtype)
                g_hidden = h_hidden = None
            else:
                head_biases = _pick(biases, _HEADS)
                if hidden_biases is not None:  # added by the heads' SiLU instead
                    head_biases = [head_biases[0], None, None]
                f, g_hidden, h_hidden = _heads_forward(silu_z, channels, _pick(weights, _HEADS), head_biases,
                                                       dtype, ctx.head_triton, ctx.paired)
                del silu_z  # before the g and h heads' temporaries: the forward's transient peak
                g, h = (_head_conv(hidden, hidden_biases, j, weights[i], biases[i], dtype, pointwise_forward)
                        for j, (hidden, i) in enumerate(((g_hidden, _G_PW), (h_hidden, _H_PW))))
            out = cfc_relax_forward(f, g, h, n, a, b, rho, t, residual, copy_dtype, normalization)
    ctx.dtype = dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    if copy_dtype is not None:
        # Made from the output: gradients reach them through its consumers' (the spatial
        # mix's input gradient holds its pixel sum's), none of their own here.
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensor for the copy's unused gradient
    return out, (dw, z, g_hidden, h_hidden, a, b, rho, t, *weights, *biases)


def _backward(ctx, grad_out, n, n_conv, saved, needs, normalization=None):
    """(d_ns, d_residual, d_small, d_ws, d_bs) of :func:`_forward` for ``needs`` in
    :class:`_ParallelCfC`'s input order, from ``saved`` (its second result); ``n`` and
    ``n_conv`` as the forward had them (or remade). d_ns: n's gradient as a list of one tensor.
    ``normalization`` (residual, mean, rstd, scale, shift): n's exact values, remade from the
    residual by the CfC backward kernel; d_n is then in their dtype (fp32 under autocast), not
    n's, and where the 7x7's input gradient comes from cuDNN d_ns holds the two apart, for the
    AdaLN backward kernel that follows to add them as it loads them (their sum rounded as an
    in-place add into the CfC op's would store it); d_residual is the upstream gradient itself,
    which that kernel rounds to the residual's dtype as it loads it."""
    dw, z, g_hidden, h_hidden, *rest = saved
    small, weights, biases = rest[:_SMALL], rest[_SMALL:_SMALL + _CONVS], rest[_SMALL + _CONVS:]
    need_n, need_residual = needs[:2]
    need_ws = needs[2 + _SMALL:2 + _SMALL + _CONVS]
    need_bs = [b is not None and need for b, need in zip(biases, needs[2 + _SMALL + _CONVS:])]
    # f, g and h's gradients feed everything upstream of the CfC op but n's own term.
    need_heads = need_n or any(need_ws) or any(need_bs)
    d_ws, d_bs = [None] * _CONVS, [None] * _CONVS
    bias_shapes = [None if b is None else list(b.shape) for b in biases]
    dtype = ctx.dtype
    hidden_biases = _hidden_biases(ctx.hidden_zero, biases)
    # Each full-size temporary is dropped after its last use (the ``del``s): this backward
    # runs while nearly every activation of the forward is still alive, so what it holds at
    # once is the train step's peak memory (``python -m benchmarks.peak_memory``).
    with torch.autocast(n.device.type, enabled=False):
        # The g/h heads' SiLUs: remade here for cuDNN, or in registers by the Triton
        # pointwise kernels (ctx.pointwise), which never write them.
        silu_z = F.silu(z)
        cfc_needs = [need_heads] * 3 + [need_n] + list(needs[2:2 + _SMALL])
        if ctx.pointwise:  # f, g and h remade in the CfC backward kernel's registers
            silu_g = silu_h = None
            d_f, d_g, d_h, d_n, *d_small = cfc_heads.backward(
                grad_out, silu_z, g_hidden, h_hidden, [(weights[i], biases[i]) for i in (_F, _G_PW, _H_PW)],
                n, *small, dtype, cfc_needs)
        else:
            silu_g, silu_h = (_head_silu(hidden, hidden_biases, j, dtype)
                              for j, hidden in enumerate((g_hidden, h_hidden)))
            f = _conv(silu_z, weights[_F], biases[_F], dtype, 0, 1, False)
            g = _conv(silu_g, weights[_G_PW], biases[_G_PW], dtype, 0, 1, False)
            h = _conv(silu_h, weights[_H_PW], biases[_H_PW], dtype, 0, 1, False)
            d_f, d_g, d_h, d_n, *d_small = cfc_relax_backward(grad_out, f, g, h, n, *small, cfc_needs,
                                                                   normalization)
            del f, g, h
        d_ns = [d_n]
        if need_heads:
            hidden_d_bs = [None, None]  # the g/h depthwise biases' gradients, when their SiLU adds them
            d_g, d_ws[_G_PW], d_bs[_G_PW], hidden_d_bs[0] = _pointwise_head_backward(
                d_g, g_hidden, silu_g, weights[_G_PW], bias_shapes[_G_PW], dtype, need_ws[_G_PW], need_bs[_G_PW],
                hidden_biases, 0, need_bs[_G_DW])
            del silu_g
            d_h, d_ws[_H_PW], d_bs[_H_PW], hidden_d_bs[1] = _pointwise_head_backward(
                d_h, h_hidden, silu_h, weights[_H_PW], bias_shapes[_H_PW], dtype, need_ws[_H_PW], need_bs[_H_PW],
                hidden_biases, 1, need_bs[_H_DW])
            del silu_h
            head_need_bs = _pick(need_bs, _HEADS)
            if hidden_biases is not None:
                head_need_bs[1:] = [False, False]
            head_grads = [d_f, d_g, d_h]
            del d_f, d_g, d_h  # the list alone holds them: _heads_backward drops each when used
            need_dw_b = ctx.folded and need_bs[_DW]
            d_z, head_ws, head_bs, d_z_sum = _heads_backward(
                head_grads, z, silu_z, _pick(weights, _HEADS), _pick(bias_shapes, _HEADS), dtype,
                ctx.head_triton, ctx.paired, True, _pick(need_ws, _HEADS), head_need_bs,
                z_bias_grad=_backbone_needs_sum(ctx.folded, need_ws[_PW], need_bs[_PW], need_dw_b))
            del silu_z
            for i, d_w, d_b in zip(_HEADS, head_ws, head_bs):
                d_ws[i], d_bs[i] = d_w, d_b
            if hidden_biases is not None:
                d_bs[_G_DW], d_bs[_H_DW] = hidden_d_bs
            d_dw, d_ws[_PW], d_bs[_PW], folded_d_b = _pointwise_backbone_backward(
                d_z, dw, weights[_PW], biases[_DW] if ctx.folded else None, dtype,
                need_ws[_PW], need_bs[_PW], need_dw_b, d_z_sum)
            del d_z
            d_ns, d_ws[_DW], d_b = _backbone_backward(d_dw, n, n_conv, weights[_DW], bias_shapes[_DW], dtype, d_n,
                                                      [need_n, need_ws[_DW], need_bs[_DW] and not ctx.folded],
                                                      ctx.dw_triton, normalization is not None)
            d_bs[_DW] = folded_d_b if ctx.folded else d_b
    weight_dtypes, bias_dtypes = ctx.param_dtypes
    d_ws = [None if d is None else d.to(w_dtype) for d, w_dtype in zip(d_ws, weight_dtypes)]
    d_bs = [None if d is None else d.to(b_dtype) for d, b_dtype in zip(d_bs, bias_dtypes)]
    d_residual = None
    if need_residual:
        d_residual = grad_out if normalization is not None else grad_out.to(ctx.residual_dtype)
    return d_ns, d_residual, d_small, d_ws, d_bs


def _pointwise_head_backward(d_out, hidden, silu_hidden, weight, bias_shape, dtype, need_w, need_b,
                             hidden_biases, head: int, need_hidden_b: bool):
    """(d_hidden, d_weight, d_bias, d_hidden_bias) of the g or h head's ``conv1x1(silu(hidden +
    hidden_bias))``: cuDNN, then SiLU's backward (the Triton modulated SiLU's where it added the
    depthwise conv's bias, :func:`_hidden_biases`, whose pixel sums give that bias's gradient:
    no pass of its own); or, without ``silu_hidden``, the Triton pointwise kernels (SiLU and its
    backward in registers)."""
    if silu_hidden is None:
        d_hidden, d_w, d_b, _, _ = pointwise_conv.backward(d_out, hidden, weight, None, None, dtype,
                                                           (True, need_w, need_b, False, False))
        return d_hidden, d_w, d_b, None
    d_silu, d_w, d_b = _conv_backward(d_out, silu_hidden, weight, bias_shape, dtype, 0, 1, [True, need_w, need_b], False)
    if hidden_biases is None:
        return torch.ops.aten.silu_backward(d_silu, hidden), d_w, d_b, None
    d_hidden, _, d_shift = modulated_silu_backward(d_silu, hidden, *_bias_modulation(hidden, hidden_biases, head),
                                                   (True, False, need_hidden_b))
    if d_shift is None:
        return d_hidden, d_w, d_b, None
    return d_hidden, d_w, d_b, d_shift.sum(0, dtype=torch.promote_types(d_shift.dtype, torch.float32))


def _hidden_zero(n, biases, pointwise: bool, head_triton) -> torch.Tensor | None:
    """A zero (the modulation's scale) when the g and h heads' SiLUs add their depthwise convs'
    biases (the Triton modulated SiLU with scale 0 and shift = bias, :func:`_head_silu`): on
    cuDNN, whose bias would cost a pass over each hidden tensor and a reduction for its
    gradient. None where the depthwise or pointwise Triton kernels run the heads (they handle
    the bias themselves), or that SiLU has no Triton backend here."""
    if (pointwise or any(head_triton[1:]) or biases[_G_DW] is None or biases[_H_DW] is None
            or not runtime.use_triton("modulated_silu", n.device.type)):
        return None
    return biases[_G_DW].new_zeros(())


def _hidden_biases(zero, biases) -> tuple | None:
    """(the zero, (g_dw's bias, h_dw's bias)) where the heads' SiLUs add those biases, else None."""
    return None if zero is None else (zero, (biases[_G_DW], biases[_H_DW]))


def _bias_modulation(hidden, hidden_biases, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [B, C] of the modulated SiLU that adds ``head``'s bias: 0 and the bias,
    expanded over the batch (views, nothing written)."""
    zero, biases = hidden_biases
    return zero.expand(hidden.shape[:2]), biases[head].expand(hidden.shape[:2])


def _head_silu(hidden, hidden_biases, head: int, dtype):
    """silu(hidden), or silu(hidden + bias) by one Triton pass where the bias was left out of the
    head's depthwise conv (:func:`_hidden_biases`)."""
    if hidden_biases is None:
        return F.silu(hidden)
    return modulated_silu_forward(hidden, *_bias_modulation(hidden, hidden_biases, head), dtype)


def _head_conv(hidden, hidden_biases, head: int, weight, bias, dtype, pointwise: bool):
    """The g or h head's 1x1 conv of silu(hidden) (its 3x3 bias added first where
    :func:`_hidden_biases` left it out of the 3x3): on the Triton SiLU -> 1x1 conv forward
    (``pointwise``), the SiLU and the bias in its prologue; else a SiLU pass, then cuDNN's GEMM."""
    if pointwise:
        scale, shift = (None, None) if hidden_biases is None else _bias_modulation(hidden, hidden_biases, head)
        return pointwise_conv.forward(hidden, weight, bias, scale, shift, dtype)
    return _conv(_head_silu(hidden, hidden_biases, head, dtype), weight, bias, dtype, 0, 1, False)


def _backbone_bias(pw_weight, pw_bias, dw_bias):
    """The 1x1's bias with the 7x7's folded in: pw(dw + b_dw) + b_pw = pw(dw) + (W_pw b_dw + b_pw),
    one small launch in the convs' dtype (the parameters as the forward cast them). cuDNN takes
    no bias: the 7x7's would cost a pass over its output and a reduction for its gradient
    (kernels.recompute._pointwise_as_gemm)."""
    if pw_bias is None:
        return pw_weight.flatten(1) @ dw_bias
    return torch.addmv(pw_bias, pw_weight.flatten(1), dw_bias)


def _backbone_needs_sum(folded: bool, need_w: bool, need_b: bool, need_dw_b: bool) -> bool:
    """Whether the backbone's 1x1 backward needs d_z's sum over the batch and the pixels (its
    bias gradient, which the folded 7x7 bias's gradients are made from)."""
    return need_b or (folded and (need_w or need_dw_b))


def _pointwise_backbone_backward(d_z, dw, weight, dw_bias, dtype, need_w, need_b, need_dw_b, d_z_sum=None):
    """(d_dw, d_weight, d_bias, d_dw_bias) of the backbone's 1x1 conv z = pw(dw) + bias, where
    ``dw_bias`` (not None) is the 7x7's bias folded into the 1x1's (:func:`_backbone_bias`, dw
    kept without it): the weight gradient against dw + dw_bias is the one against dw plus
    outer(sum d_z, dw_bias), and the 7x7's bias gradient, the sum of d_dw = W^T d_z over the
    pixels, is W^T (sum d_z), with no pass of its own. ``d_z_sum``: that sum (the 1x1's bias
    gradient) where SiLU's backward made it with d_z, else None: cuDNN's backward makes it. None
    where not needed."""
    need_sum = _backbone_needs_sum(dw_bias is not None, need_w, need_b, need_dw_b)
    d_dw, d_w, d_b = _conv_backward(d_z, dw, weight, [weight.shape[0]], dtype, 0, 1,
                                    [True, need_w, need_sum and d_z_sum is None], False)
    d_b = d_z_sum if d_z_sum is not None else d_b
    d_dw_bias = None
    if dw_bias is not None:
        if need_w:
            d_w = torch.addr(d_w.flatten(1), d_b, dw_bias).view_as(d_w)
        if need_dw_b:
            d_dw_bias = weight.flatten(1).t() @ d_b
    return d_dw, d_w, d_b if need_b else None, d_dw_bias


def _backbone_backward(d_dw, n, n_conv, weight, bias_shape, dtype, d_n_cfc, needs, triton: bool, apart: bool):
    """The 7x7 conv's ([d_n], d_weight, d_bias), d_n summed with the CfC op's ``d_n_cfc``: in the
    Triton kernel's epilogue (written once, in n's wider dtype), else by one in-place add into
    d_n_cfc, or, ``apart``, [d_n_cfc, the conv's d_n] for the caller's next kernel to add (the
    AdaLN backward, which rounds their sum as that add would store it). The weight gradient
    reads ``n_conv`` (n in ``dtype``, or None: n, cast)."""
    k = weight.shape[-1]
    conv_input = n if n_conv is None else n_conv
    if triton:
        d_n, (d_w,), (d_b,) = depthwise.backward([d_dw], conv_input, [weight], dtype, needs, addend=d_n_cfc)
        return [d_n], d_w, d_b
    d_n, d_w, d_b = _conv_backward(d_dw, conv_input, weight, bias_shape, dtype, k // 2, n.shape[1], needs, False)
    if d_n is None:
        return [d_n_cfc], d_w, d_b
    if apart:
        return [d_n_cfc, d_n], d_w, d_b
    return [d_n_cfc.add_(d_n)], d_w, d_b  # d_n_cfc: the CfC op's fresh output, n's dtype


def _check(n, convs, a, b, rho, t, residual) -> None:
    """Argument checks before any work, each naming the argument."""
    _tensors.check_activation("n", n)
    if residual is not None:
        _tensors.check_activation("residual", residual, like=n)
    if len(convs) != _CONVS:
        raise ValueError(f"convs: expected {_CONVS} (weight, bias) pairs {functional.CFC_CONVS}, got {len(convs)}")
    channels = n.shape[1]
    for i, (name, (weight, bias)) in enumerate(zip(functional.CFC_CONVS, convs)):
        label = f"convs[{i}] ({name}) "
        depthwise_kernel = name.endswith("_dw")
        if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[0] != channels:
            # Every conv maps C channels to C (before the bias check, which would blame the bias).
            raise ValueError(f"{label}weight: expected {channels} output channels, got shape {tuple(weight.shape)}")
        _check_conv("n", n, weight, bias, kernel=None if depthwise_kernel else 1, depthwise=depthwise_kernel, conv=label)
    check_gate_parameters(n, a, b, rho, t)


def parallel_cfc(n, convs, a, b, rho, t, residual=None, n_conv=None, copy_dtype=None):
    """Fused :func:`liquiddiff.functional.parallel_cfc`: same signature, value and gradients.

    ``n_conv``: n already in the convolutions' dtype (``n.to(dtype)``, which the block's AdaLN
    writes in the pass that writes n: ``copy_dtype``), read by the 7x7 conv where it would cast
    n by a pass of its own, and saved for its weight gradient (the block remakes it with n in
    backward, ``recompute_saved``, where backward cast n); without a gradient of its own (the
    conv's input gradient is n's). Ignored in another dtype, and by the PyTorch fallback.

    ``copy_dtype``: returns ``(out, copy, pixel_sum)``, the copy ``out.to(copy_dtype)`` and
    ``out.sum((2, 3))`` (from fp32 partials) written by the CfC kernel's pass, where the spatial
    mix would read out back for them (``spatial_mix_input(precomputed=)``); both without a
    gradient of their own, and ``(out, None, None)`` where another kernel or the PyTorch
    fallback makes out (the Triton CfC heads kernel)."""
    _check(n, convs, a, b, rho, t, residual)
    if n_conv is not None and (n_conv.shape != n.shape or n_conv.device != n.device or not n_conv.is_floating_point()):
        raise ValueError(f"n_conv: expected a float tensor of n's shape {tuple(n.shape)} on {n.device}, got "
                         f"{n_conv.dtype} {tuple(n_conv.shape)} on {n_conv.device}")
    if copy_dtype is not None and not (isinstance(copy_dtype, torch.dtype) and copy_dtype.is_floating_point):
        raise ValueError(f"copy_dtype: expected a floating torch.dtype or None, got {copy_dtype!r}")
    if not runtime.use_triton("cfc_relax", n.device.type):
        out = functional.parallel_cfc(n, convs, a, b, rho, t, residual=residual)
        return out if copy_dtype is None else (out, None, None)
    weights, biases = zip(*convs)
    grad = _records_grad(n, residual, a, b, rho, t, *weights, *biases)
    if copy_dtype is not None and _triton_pointwise(n, weights[_G_PW], 1, True):
        return _ParallelCfC.apply(n, residual, a, b, rho, t, *weights, *biases, n_conv, None, grad), None, None
    return _ParallelCfC.apply(n, residual, a, b, rho, t, *weights, *biases, n_conv, copy_dtype, grad)


def normalized_parallel_cfc_runs(u, scale, shift, convs) -> bool:
    """Whether :func:`normalized_parallel_cfc` runs for these arguments: on the Triton CfC and
    AdaLN kernels, with the CfC op's own kernel (the opt-in CfC heads kernel reads n), and where
    n's one copy in the convolutions' dtype is n's exact value rounded once, as the convolutions
    read it after an AdaLN of its own (a dtype no wider than n's: autocast's)."""
    exact = _tensors.result_dtype(u, scale, shift)
    conv = _conv_dtype(u, *convs[_DW])
    device = u.device.type
    return (torch.promote_types(exact, conv) == exact and runtime.use_triton("cfc_relax", device)
            and runtime.use_triton("adaln_modulate", device) and not _triton_pointwise(u, convs[_G_PW][0], 1, True))


def normalized_parallel_cfc(u, scale, shift, eps, convs, a, b, rho, t, copy_dtype):
    """The fused block's first half: ``parallel_cfc(n, convs, a, b, rho, t, residual=u,
    copy_dtype=copy_dtype)`` with n = ``adaln_modulate(u, scale, shift, eps)``, as one autograd
    node (:func:`liquiddiff.functional.adaln_modulate`, then :func:`liquiddiff.functional.parallel_cfc`:
    the same value and gradients), where :func:`normalized_parallel_cfc_runs` says it runs.

    n is written once, in the convolutions' dtype (the one they read); the CfC kernels remake
    its exact values (fp32 under autocast) from u, which they load anyway as the residual, and
    AdaLN's per-pixel statistics. A separate AdaLN would also write n in fp32 for the CfC kernel
    to read, and remake it in backward for the CfC backward kernel to read; here backward remakes
    only the convolutions' copy (for the 7x7's weight gradient) and runs AdaLN's backward on n's
    gradient with u's residual gradient added in that pass. Returns ``(out, copy, pixel_sum)``
    as :func:`parallel_cfc` with ``copy_dtype`` does."""
    eps = adaln.check_arguments(u, scale, shift, eps, copy_dtype=copy_dtype, name="u")
    _check(u, convs, a, b, rho, t, None)
    if copy_dtype is None:
        raise ValueError("copy_dtype: expected a floating torch.dtype (the spatial mix's input dtype), got None")
    if not normalized_parallel_cfc_runs(u, scale, shift, convs):
        raise ValueError("u: normalized_parallel_cfc needs the Triton CfC and AdaLN kernels, not the CfC heads kernel, "
                         "and convolutions in a dtype no wider than n's (normalized_parallel_cfc_runs says when)")
    weights, biases = zip(*convs)
    grad = _records_grad(u, scale, shift, a, b, rho, t, *weights, *biases)
    return _NormalizedParallelCfC.apply(u, scale, shift, eps, a, b, rho, t, *weights, *biases, copy_dtype, grad)

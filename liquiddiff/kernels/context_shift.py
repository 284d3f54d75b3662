"""The spatial mix's context shift in Triton, forward and backward: the op
:func:`liquiddiff.functional.context_shift` (public: :func:`context_shift`).

    mean = pixel_sum / pixels,   ctx = W @ mean + bias   (the context's 1x1 conv, per batch item)
    out = ctx * (1 + scale) + shift
    d ctx = g * (1 + scale),  d scale = g * ctx,  d shift = g,  d bias = sum_b d ctx,
    d W = sum_b d ctx (x) mean,  d pixel_sum = (W^T @ d ctx) / pixels

Why a kernel for [B, C] tensors: in eager PyTorch this is a division, autocast's cast, a cuDNN
convolution of a 1x1 image and three elementwise ops forward, and their backward passes (about
12 launches of almost no work per block of the model); here one launch each way. The
convolution's rounding is kept: mean, W and bias are rounded to the convolution's dtype (autocast's
under autocast) and so is ctx, which backward reads (saved, fp32, [B, C]); the modulation and
every gradient are computed in fp32 and rounded once.

Memory moved: W (C*C) read once per batch item forward (each program its rows) and again in
backward (d pixel_sum's columns), d W written once, plus [B, C] vectors: a few MB at most (the
large preset's C = 768 at batch 8). No partial sums: the sums over the batch run inside one
program (deterministic, no atomics).

Layout: [B, C] vectors and W [C, C, 1, 1] through their strides, any C, any B. B and C are
compile-time constants (the loops run over them: a runtime bound fails in Triton 3.6's
interpreter under numpy >= 2.4), a few values per model.
"""
import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from liquiddiff import functional

from . import _eager, _tensors, runtime
from .recompute import _conv_dtype

__all__ = ["context_shift"]

OP_NAME = "context_shift"
_BLOCK_O = 32  # output channels a program holds
_BLOCK_I = 64  # input channels per step of the loop over W's columns


if triton is not None:

    @triton.jit
    def _mean(sum_ptr, b, ci, i_mask, s_sum_b, s_sum_c, pixels, CONV: tl.constexpr, COMPUTE: tl.constexpr):
        """The pixel mean of channels ``ci`` of batch item b, rounded as the convolution's input."""
        total = tl.load(sum_ptr + b * s_sum_b + ci * s_sum_c, mask=i_mask, other=0.0).to(COMPUTE)
        return (total / pixels).to(CONV).to(COMPUTE)

    @triton.jit
    def _d_ctx(g_ptr, scale_ptr, b, co, o_mask, s_g_b, s_g_c, s_scale_b, s_scale_c, COMPUTE: tl.constexpr):
        """(g, d ctx = g * (1 + scale)) of channels ``co`` of batch item b."""
        g = tl.load(g_ptr + b * s_g_b + co * s_g_c, mask=o_mask, other=0.0).to(COMPUTE)
        one_plus = 1.0 + tl.load(scale_ptr + b * s_scale_b + co * s_scale_c, mask=o_mask, other=0.0).to(COMPUTE)
        return g, g * one_plus

    @triton.jit
    def _context_shift_fwd_kernel(
        sum_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, ctx_ptr, pixels,
        s_sum_b, s_sum_c, s_w_o, s_w_i, s_bias, s_scale_b, s_scale_c, s_shift_b, s_shift_c, batch_start,
        C: tl.constexpr, CONV: tl.constexpr, COMPUTE: tl.constexpr, SPLIT_BATCH: tl.constexpr, BLOCK_O: tl.constexpr,
        BLOCK_I: tl.constexpr,
    ):
        b = _tensors.batch_item(1, batch_start, SPLIT_BATCH)
        co = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = co < C
        acc = tl.zeros([BLOCK_O], dtype=COMPUTE)
        for i0 in range(0, C, BLOCK_I):
            ci = i0 + tl.arange(0, BLOCK_I)
            i_mask = ci < C
            mean = _mean(sum_ptr, b, ci, i_mask, s_sum_b, s_sum_c, pixels, CONV, COMPUTE)
            w = tl.load(w_ptr + co[:, None] * s_w_o + ci[None, :] * s_w_i, mask=o_mask[:, None] & i_mask[None, :],
                        other=0.0).to(CONV).to(COMPUTE)
            acc += tl.sum(w * mean[None, :], axis=1)
        bias = tl.load(bias_ptr + co * s_bias, mask=o_mask, other=0.0).to(CONV).to(COMPUTE)
        ctx = (acc + bias).to(CONV).to(COMPUTE)
        one_plus = 1.0 + tl.load(scale_ptr + b * s_scale_b + co * s_scale_c, mask=o_mask, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + b * s_shift_b + co * s_shift_c, mask=o_mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + b * C + co, (ctx * one_plus + shift).to(out_ptr.dtype.element_ty), mask=o_mask)
        tl.store(ctx_ptr + b * C + co, ctx.to(ctx_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _context_shift_bwd_kernel(
        g_ptr, sum_ptr, w_ptr, scale_ptr, ctx_ptr, d_sum_ptr, d_w_ptr, d_bias_ptr, d_scale_ptr, pixels,
        s_g_b, s_g_c, s_sum_b, s_sum_c, s_w_o, s_w_i, s_scale_b, s_scale_c,
        B: tl.constexpr, C: tl.constexpr, CONV: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # Programs [0, cdiv(C, BLOCK_O)): rows of d W, d bias, d scale; the rest: d pixel_sum.
        row_programs = tl.cdiv(C, BLOCK_O)
        pid = tl.program_id(0)
        if pid < row_programs:
            co = pid * BLOCK_O + tl.arange(0, BLOCK_O)
            o_mask = co < C
            d_bias = tl.zeros([BLOCK_O], dtype=COMPUTE)
            for b in range(B):
                g, d_ctx = _d_ctx(g_ptr, scale_ptr, b, co, o_mask, s_g_b, s_g_c, s_scale_b, s_scale_c, COMPUTE)
                ctx = tl.load(ctx_ptr + b * C + co, mask=o_mask, other=0.0).to(COMPUTE)
                tl.store(d_scale_ptr + b * C + co, (g * ctx).to(d_scale_ptr.dtype.element_ty), mask=o_mask)
                d_bias += d_ctx
            tl.store(d_bias_ptr + co, d_bias.to(d_bias_ptr.dtype.element_ty), mask=o_mask)
            for i0 in range(0, C, BLOCK_I):
                ci = i0 + tl.arange(0, BLOCK_I)
                i_mask = ci < C
                d_w = tl.zeros([BLOCK_O, BLOCK_I], dtype=COMPUTE)
                for b in range(B):
                    _, d_ctx = _d_ctx(g_ptr, scale_ptr, b, co, o_mask, s_g_b, s_g_c, s_scale_b, s_scale_c, COMPUTE)
                    mean = _mean(sum_ptr, b, ci, i_mask, s_sum_b, s_sum_c, pixels, CONV, COMPUTE)
                    d_w += d_ctx[:, None] * mean[None, :]
                tl.store(d_w_ptr + co[:, None] * C + ci[None, :], d_w.to(d_w_ptr.dtype.element_ty),
                         mask=o_mask[:, None] & i_mask[None, :])
        else:
            ci = (pid - row_programs) * BLOCK_I + tl.arange(0, BLOCK_I)
            i_mask = ci < C
            for b in range(B):
                d_mean = tl.zeros([BLOCK_I], dtype=COMPUTE)
                for o0 in range(0, C, BLOCK_O):
                    co = o0 + tl.arange(0, BLOCK_O)
                    o_mask = co < C
                    _, d_ctx = _d_ctx(g_ptr, scale_ptr, b, co, o_mask, s_g_b, s_g_c, s_scale_b, s_scale_c, COMPUTE)
                    w = tl.load(w_ptr + co[:, None] * s_w_o + ci[None, :] * s_w_i,
                                mask=o_mask[:, None] & i_mask[None, :], other=0.0).to(CONV).to(COMPUTE)
                    d_mean += tl.sum(w * d_ctx[:, None], axis=0)
                tl.store(d_sum_ptr + b * C + ci, (d_mean / pixels).to(d_sum_ptr.dtype.element_ty), mask=i_mask)


def _forward_buffers(pixel_sum, weight, bias, scale, shift, conv_dtype):
    out_dtype = torch.promote_types(conv_dtype, _tensors.result_dtype(scale, shift))
    ctx_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    return (_tensors.empty_buffer(tuple(scale.shape), out_dtype, scale.device),
            _tensors.empty_buffer(tuple(scale.shape), ctx_dtype, scale.device))


@_tensors.launches_on_input_device
def _forward_kernels(pixel_sum: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                     shift: torch.Tensor, pixels: int, conv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, ctx): ctx (the context, rounded to ``conv_dtype``, kept in fp32) is for backward."""
    out, ctx = _forward_buffers(pixel_sum, weight, bias, scale, shift, conv_dtype)
    batch, channels = scale.shape
    if out.numel():
        _tensors.launch_over_batch(
            _context_shift_fwd_kernel, (_tensors.cdiv(channels, _BLOCK_O),), batch,
            pixel_sum, weight, bias, scale, shift, out, ctx, float(pixels),
            *pixel_sum.stride(), weight.stride(0), weight.stride(1), bias.stride(0), *scale.stride(),
            *shift.stride(),
            C=channels, CONV=_tensors.tl_dtype(conv_dtype),
            COMPUTE=_tensors.compute_dtype(pixel_sum, weight, bias, scale, shift),
            BLOCK_O=_BLOCK_O, BLOCK_I=_BLOCK_I, **_tensors.COMPILE_OPTIONS,
        )
    return out, ctx


def _backward_buffers(pixel_sum, weight, bias_dtype, scale):
    return (_tensors.empty_buffer(tuple(pixel_sum.shape), pixel_sum.dtype, pixel_sum.device),
            _tensors.empty_buffer(tuple(weight.shape), weight.dtype, weight.device),
            _tensors.empty_buffer((weight.shape[0],), bias_dtype, weight.device),
            _tensors.empty_buffer(tuple(scale.shape), scale.dtype, scale.device))


@_tensors.launches_on_input_device
def _backward_kernels(grad_out: torch.Tensor, pixel_sum: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      ctx: torch.Tensor, pixels: int, conv_dtype: torch.dtype,
                      bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d pixel_sum, d weight, d bias, d scale), each in its input's dtype (d shift is grad_out)."""
    d_sum, d_w, d_bias, d_scale = _backward_buffers(pixel_sum, weight, bias_dtype, scale)
    batch, channels = scale.shape
    if channels:
        grid = (_tensors.cdiv(channels, _BLOCK_O) + _tensors.cdiv(channels, _BLOCK_I),)
        _context_shift_bwd_kernel[grid](
            grad_out, pixel_sum, weight, scale, ctx, d_sum, d_w, d_bias, d_scale, float(pixels),
            *grad_out.stride(), *pixel_sum.stride(), weight.stride(0), weight.stride(1), *scale.stride(),
            B=batch, C=channels, CONV=_tensors.tl_dtype(conv_dtype), COMPUTE=_tensors.compute_dtype(grad_out, pixel_sum, weight, scale),
            BLOCK_O=_BLOCK_O, BLOCK_I=_BLOCK_I, **_tensors.COMPILE_OPTIONS,
        )
    return d_sum, d_w, d_bias, d_scale


_forward_op = torch.library.custom_op("liquiddiff::context_shift", mutates_args=())(_forward_kernels)
_backward_op = torch.library.custom_op("liquiddiff::context_shift_backward", mutates_args=())(_backward_kernels)


@_forward_op.register_fake
def _(pixel_sum, weight, bias, scale, shift, pixels, conv_dtype):
    return _forward_buffers(pixel_sum, weight, bias, scale, shift, conv_dtype)


@_backward_op.register_fake
def _(grad_out, pixel_sum, weight, scale, ctx, pixels, conv_dtype, bias_dtype):
    return _backward_buffers(pixel_sum, weight, bias_dtype, scale)


def _setup_context(ctx, inputs, output):
    pixel_sum, weight, bias, scale, shift, pixels, conv_dtype = inputs
    ctx.save_for_backward(pixel_sum, weight, scale, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # ctx's gradient: None, not a tensor of zeros
    ctx.pixels, ctx.conv_dtype, ctx.bias_dtype, ctx.shift_dtype = pixels, conv_dtype, bias.dtype, shift.dtype


def _backward(ctx, grad_out, _grad_ctx, launch=_backward_op):
    if grad_out is None:
        return (None,) * 7
    pixel_sum, weight, scale, saved_ctx = ctx.saved_tensors
    d_sum, d_w, d_bias, d_scale = launch(grad_out, pixel_sum, weight, scale, saved_ctx, ctx.pixels, ctx.conv_dtype,
                                         ctx.bias_dtype)
    needs = ctx.needs_input_grad
    grads = (d_sum, d_w, d_bias, d_scale, grad_out.to(ctx.shift_dtype))
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
_EagerContextShift = _eager.eager_function(
    "_EagerContextShift", _forward_kernels, _setup_context,
    lambda ctx, *grads: _backward(ctx, *grads, launch=_backward_kernels),
)


def context_shift(pixel_sum, weight, bias, scale, shift, pixels: int):
    """Fused :func:`liquiddiff.functional.context_shift`: same signature, value (to the rounding
    of the reference's elementwise ops) and gradients; one kernel launch each way."""
    _tensors.check_floating("scale", scale)
    if scale.dim() != 2:
        raise ValueError(f"scale: expected a [B, C] tensor, got shape {tuple(scale.shape)}")
    batch, channels = scale.shape
    device = scale.device
    _tensors.check_vector("pixel_sum", pixel_sum, (batch, channels), device)
    _tensors.check_vector("shift", shift, (batch, channels), device)
    _tensors.check_floating("weight", weight)
    if tuple(weight.shape) != (channels, channels, 1, 1):
        raise ValueError(f"weight: expected shape [{channels}, {channels}, 1, 1], got {tuple(weight.shape)}")
    _tensors.check_device("weight", weight, device)
    _tensors.check_vector("bias", bias, (channels,), device)
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"pixels: expected a positive int (the pixel count the sum ran over), got {pixels!r}")
    if not runtime.use_triton(OP_NAME, device.type):
        return functional.context_shift(pixel_sum, weight, bias, scale, shift, pixels)
    conv_dtype = _conv_dtype(pixel_sum, weight, bias)
    op = _forward_op if _eager.needs_custom_op(scale) else _EagerContextShift.apply
    return op(pixel_sum, weight, bias, scale, shift, pixels, conv_dtype)[0]

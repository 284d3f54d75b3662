"""Fused AdaLN modulation, with the residual add folded in: Triton kernels and custom ops.

Computes, per pixel over the channel axis (DESIGN.md section 1):
    s     = x (+ residual)
    x_hat = (s - mean_C(s)) * rstd,  rstd = 1 / sqrt(var_C(s) + eps)   (biased variance)
    out   = x_hat * (1 + scale) + shift
and the gradients of x, residual, scale and shift.

Memory moved (N = B*C*H*W elements, P = B*H*W pixels):
- forward: reads x (and residual), writes out (and s, and out's copy in another dtype:
  ``copy_dtype``), writes mean and rstd (2P, in the compute dtype); scale and shift are loaded
  once per program.
- backward: reads grad_out (and a second one, two consumers' gradients, and grad_s), s and the
  statistics, writes ds once (twice when x and residual differ in dtype, both in the same pass)
  and per-program partial sums of d scale and d shift (2 * B * C per block of pixels), which one
  torch sum reduces.
Saved for backward: s (x itself when there is no residual), scale, mean, rstd; not out.

Layout: x, residual, out, s and the gradients are viewed as [B, C, H*W] with their own strides
(NCHW-contiguous, channels_last, or channel slices of either), without a copy. One program
holds a [next_pow2(C), BLOCK_P] tile: the whole channel axis (C <= MAX_CHANNELS), so the
statistics need no second pass over memory. Triton specialises strides equal to 1, so the same
kernel gets contiguous (vectorised) loads along pixels for NCHW and along channels for
channels_last.

Public entry: ``adaln_modulate(x, scale, shift, eps=1e-6, residual=None)`` returns ``out``, or
``(out, s)`` with a residual, as :func:`liquiddiff.functional.adaln_modulate` does.
``normalize`` and ``normalize_backward``: the same kernels without an autograd node of their
own, the statistics returned, for a caller whose kernel remakes out from x (the fused block's
CfC, where n = AdaLN(u) and u is the CfC's residual: ``parallel_cfc.normalized_parallel_cfc``). Custom ops:
``liquiddiff::adaln_modulate`` -> (out, s, mean, rstd, copy) and
``liquiddiff::adaln_modulate_backward``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from liquiddiff import functional

from . import _eager, _tensors, runtime

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

__all__ = ["adaln_modulate", "check_arguments", "normalize", "normalize_backward", "launch_config"]

OP_NAME = "adaln_modulate"

# Tile sizing, in elements of one [BLOCK_C, BLOCK_P] tile, at 16 elements per thread: the
# backward keeps about five live fp32 tiles, which fits in ~100 registers (no spills, several
# programs per SM) at 16 per thread and needs 130-250, or spills, at 32 (ptxas, sm_90).
# NCHW loads run along pixels: at least 16 per channel row keep whole 32-byte sectors in bf16,
# so the tile grows from 4K up to 8K elements (16 warps) for C = 512 before BLOCK_P drops.
_TARGET_TILE = 4096
_MAX_TILE = 8192
_MIN_PIXELS = 16
_ELEMENTS_PER_THREAD = 16
# The channel axis lives in one tile: a tile of one pixel holds at most _MAX_TILE channels.
MAX_CHANNELS = _MAX_TILE


def launch_config(channels: int, pixels: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) for C channels and H*W pixels per image."""
    block_c = _tensors.next_power_of_2(channels)
    block_p = max(_MIN_PIXELS, _TARGET_TILE // block_c)
    block_p = max(1, min(block_p, _MAX_TILE // block_c, _tensors.next_power_of_2(pixels)))
    num_warps = min(16, max(2, block_c * block_p // (32 * _ELEMENTS_PER_THREAD)))
    return block_c, block_p, num_warps


if triton is not None:

    @triton.jit
    def _program_tile(batch_start, C, P, SPLIT_BATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """This program's batch item, pixel indices, masks and [BLOCK_C, BLOCK_P] offsets.

        The whole channel axis is in the tile (BLOCK_C >= C); int64 offsets, since a large
        activation can exceed 2**31 elements.
        """
        b = _tensors.batch_item(1, batch_start, SPLIT_BATCH)
        c = tl.arange(0, BLOCK_C)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_c = c < C
        mask_p = p < P
        mask = mask_c[:, None] & mask_p[None, :]
        return b, p, mask_c, mask_p, mask, c.to(tl.int64)[:, None], p.to(tl.int64)[None, :]

    @triton.jit
    def _adaln_fwd_kernel(
        x_ptr, res_ptr, scale_ptr, shift_ptr, out_ptr, s_ptr, mean_ptr, rstd_ptr, copy_ptr,
        C, P, eps,
        sx_b, sx_c, sx_p,
        sr_b, sr_c, sr_p,
        so_b, so_c, so_p,
        ss_b, ss_c, ss_p,
        scp_b, scp_c, scp_p,
        sscale_b, sscale_c,
        sshift_b, sshift_c, batch_start,
        HAS_RESIDUAL: tl.constexpr,
        HAS_COPY: tl.constexpr,
        COMPUTE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        b, p, mask_c, mask_p, mask, c64, p64 = _program_tile(batch_start, C, P, SPLIT_BATCH, BLOCK_C, BLOCK_P)

        x = tl.load(x_ptr + b * sx_b + c64 * sx_c + p64 * sx_p, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + b * sr_b + c64 * sr_c + p64 * sr_p, mask=mask, other=0.0)
            s = x.to(COMPUTE) + r.to(COMPUTE)
            # The stored s is rounded to its dtype; normalise that value (as the reference
            # does), so backward, which reloads s, sees the same x_hat.
            s_store = s.to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + b * ss_b + c64 * ss_c + p64 * ss_p, s_store, mask=mask)
            s = s_store.to(COMPUTE)
        else:
            s = x.to(COMPUTE)

        mean = tl.sum(s, axis=0) / C
        # Padded channels hold 0, not s - mean: keep them out of the variance.
        diff = tl.where(mask_c[:, None], s - mean[None, :], 0.0)
        var = tl.sum(diff * diff, axis=0) / C
        rstd = 1.0 / tl.sqrt(var + tl.cast(eps, COMPUTE))
        x_hat = diff * rstd[None, :]

        scale = tl.load(scale_ptr + b * sscale_b + c64 * sscale_c, mask=mask_c[:, None], other=0.0)
        shift = tl.load(shift_ptr + b * sshift_b + c64 * sshift_c, mask=mask_c[:, None], other=0.0)
        out = (x_hat * (1.0 + scale.to(COMPUTE)) + shift.to(COMPUTE)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * so_b + c64 * so_c + p64 * so_p, out, mask=mask)
        if HAS_COPY:  # out.to(copy dtype): the stored value rounded again, as a cast of out would
            tl.store(copy_ptr + b * scp_b + c64 * scp_c + p64 * scp_p, out.to(copy_ptr.dtype.element_ty), mask=mask)

        tl.store(mean_ptr + b * P + p, mean, mask=mask_p)
        tl.store(rstd_ptr + b * P + p, rstd, mask=mask_p)

    @triton.jit
    def _adaln_bwd_kernel(
        g_ptr, g2_ptr, gs_ptr, s_ptr, scale_ptr, mean_ptr, rstd_ptr,
        ds_ptr, ds2_ptr, dparam_part_ptr,
        B, C, P,
        sg_b, sg_c, sg_p,
        sg2_b, sg2_c, sg2_p,
        sgs_b, sgs_c, sgs_p,
        ss_b, ss_c, ss_p,
        sd_b, sd_c, sd_p,
        sd2_b, sd2_c, sd2_p,
        sscale_b, sscale_c, batch_start,
        HAS_GRAD_S: tl.constexpr,
        HAS_GRAD_OUT2: tl.constexpr,
        WRITE_DS: tl.constexpr,
        WRITE_DS2: tl.constexpr,
        PARAM_GRADS: tl.constexpr,
        COMPUTE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        b, p, mask_c, mask_p, mask, c64, p64 = _program_tile(batch_start, C, P, SPLIT_BATCH, BLOCK_C, BLOCK_P)

        # Masked lanes load g = 0, so padded channels and pixels add nothing to the channel
        # sums below or to the pixel partial sums.
        g = tl.load(g_ptr + b * sg_b + c64 * sg_c + p64 * sg_p, mask=mask, other=0.0).to(COMPUTE)
        if HAS_GRAD_OUT2:  # out's second upstream gradient, summed here rather than by a pass of its own
            g += tl.load(g2_ptr + b * sg2_b + c64 * sg2_c + p64 * sg2_p, mask=mask, other=0.0).to(COMPUTE)
            # Rounded as grad_out.add_(grad_out2) would store it (nothing to round in fp32 and wider).
            g = g.to(g_ptr.dtype.element_ty).to(COMPUTE)
        s = tl.load(s_ptr + b * ss_b + c64 * ss_c + p64 * ss_p, mask=mask, other=0.0).to(COMPUTE)
        mean = tl.load(mean_ptr + b * P + p, mask=mask_p, other=0.0).to(COMPUTE)
        rstd = tl.load(rstd_ptr + b * P + p, mask=mask_p, other=0.0).to(COMPUTE)
        x_hat = (s - mean[None, :]) * rstd[None, :]

        if PARAM_GRADS:
            # Partials [programs along P, 2 (scale, shift), B, C]: one torch sum reduces both.
            row = (tl.program_id(0) * 2 * B + b) * C + tl.arange(0, BLOCK_C)
            tl.store(dparam_part_ptr + row, tl.sum(g * x_hat, axis=1), mask=mask_c)
            tl.store(dparam_part_ptr + B * C + row, tl.sum(g, axis=1), mask=mask_c)

        if WRITE_DS or WRITE_DS2:
            scale = tl.load(scale_ptr + b * sscale_b + c64 * sscale_c,
                            mask=mask_c[:, None], other=0.0).to(COMPUTE)
            dxhat = g * (1.0 + scale)
            mean_dxhat = tl.sum(dxhat, axis=0) / C
            mean_dxhat_xhat = tl.sum(dxhat * x_hat, axis=0) / C
            ds = rstd[None, :] * (dxhat - mean_dxhat[None, :] - x_hat * mean_dxhat_xhat[None, :])
            if HAS_GRAD_S:
                # In s's dtype, as autograd hands a tensor its gradients: a wider one (the fp32
                # residual stream's, for a bf16 x) rounded as it is loaded, not by a cast pass.
                gs = tl.load(gs_ptr + b * sgs_b + c64 * sgs_c + p64 * sgs_p, mask=mask, other=0.0)
                ds += gs.to(s_ptr.dtype.element_ty).to(COMPUTE)
            if WRITE_DS:
                tl.store(ds_ptr + b * sd_b + c64 * sd_c + p64 * sd_p,
                         ds.to(ds_ptr.dtype.element_ty), mask=mask)
            if WRITE_DS2:
                tl.store(ds2_ptr + b * sd2_b + c64 * sd2_c + p64 * sd2_p,
                         ds.to(ds2_ptr.dtype.element_ty), mask=mask)


def _stats_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if _tensors.compute_dtype(*tensors) == tl.float64 else torch.float32


def _forward_buffers(x, scale, shift, residual, out_dtype, copy_dtype):
    """(out, s, mean, rstd, copy) for the forward op; the fake kernel uses the same allocation."""
    batch, _, height, width = x.shape
    s_dtype = _tensors.result_dtype(x, residual)
    out = _tensors.empty_activation(x, out_dtype or _tensors.result_dtype(x, residual, scale, shift))
    if residual is None:
        s = _tensors.empty_buffer((0,), s_dtype, x.device)
    else:
        s = _tensors.empty_activation(x, s_dtype)
    stats_dtype = _stats_dtype(x, residual, scale, shift)
    mean = _tensors.empty_buffer((batch, height * width), stats_dtype, x.device)
    rstd = _tensors.empty_buffer((batch, height * width), stats_dtype, x.device)
    copy = _tensors.empty_buffer((0,), out.dtype, x.device) if copy_dtype is None else _tensors.empty_activation(
        x, copy_dtype)
    return out, s, mean, rstd, copy


@_tensors.launches_on_input_device
def _forward_kernels(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor],
    out_dtype: Optional[torch.dtype],
    copy_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, s, mean, rstd, copy); s is an empty tensor when there is no residual, copy
    (out in ``copy_dtype``) one without a copy_dtype."""
    out, s, mean, rstd, copy = _forward_buffers(x, scale, shift, residual, out_dtype, copy_dtype)
    if x.numel() == 0:
        return out, s, mean, rstd, copy
    batch, channels, height, width = x.shape
    pixels = height * width
    x, x_strides = _tensors.flat_pixels(x)
    out_strides = _tensors.pixel_strides(out)
    if residual is None:
        res, res_strides, s_arg, s_strides = x, x_strides, out, out_strides
    else:
        res, res_strides = _tensors.flat_pixels(residual)
        s_arg, s_strides = s, _tensors.pixel_strides(s)
    block_c, block_p, num_warps = launch_config(channels, pixels)
    _tensors.launch_over_batch(
        _adaln_fwd_kernel, (_tensors.cdiv(pixels, block_p),), batch,
        x, res, scale, shift, out, s_arg, mean, rstd, out if copy_dtype is None else copy,
        channels, pixels, eps,
        *x_strides, *res_strides, *out_strides, *s_strides,
        *(out_strides if copy_dtype is None else _tensors.pixel_strides(copy)),
        *scale.stride(), *shift.stride(),
        HAS_RESIDUAL=residual is not None,
        HAS_COPY=copy_dtype is not None,
        COMPUTE=_tensors.compute_dtype(x, residual, scale, shift),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
        **_tensors.COMPILE_OPTIONS,
    )
    return out, s, mean, rstd, copy


_adaln_forward = torch.library.custom_op("liquiddiff::adaln_modulate", mutates_args=())(_forward_kernels)


@_adaln_forward.register_fake
def _(x, scale, shift, eps, residual, out_dtype, copy_dtype):
    return _forward_buffers(x, scale, shift, residual, out_dtype, copy_dtype)


def _backward_buffers(s, scale, mean, ds_dtype, ds2_dtype, write_ds, param_grads):
    """(ds, ds2, d params) for the backward op, d params = (d scale, d shift) stacked [2, B, C];
    unused ones are empty tensors."""
    batch, channels = scale.shape
    device = s.device
    ds = _tensors.empty_activation(s, ds_dtype) if write_ds else _tensors.empty_buffer((0,), ds_dtype, device)
    if ds2_dtype is None:
        ds2 = _tensors.empty_buffer((0,), ds_dtype, device)
    else:
        ds2 = _tensors.empty_activation(s, ds2_dtype)
    dparams = _tensors.empty_buffer((2, batch, channels) if param_grads else (0,), mean.dtype, device)
    return ds, ds2, dparams


@_tensors.launches_on_input_device
def _backward_kernels(
    grad_out: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    s: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds_dtype: torch.dtype,
    ds2_dtype: Optional[torch.dtype],
    write_ds: bool,
    param_grads: bool,
    grad_out2: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (out, s) -> (ds, ds2, d params); out's upstream gradient is grad_out (+
    grad_out2, when given: two consumers' gradients, summed in registers).

    ds: d s in ``ds_dtype`` (written when ``write_ds``); ds2: the same values in ``ds2_dtype``
    (when given: residual and x differ in dtype); d params: d scale and d shift stacked
    [2, B, C], in the statistics' dtype (when ``param_grads``). Skipped outputs are empty tensors.
    """
    ds, ds2, dparams = _backward_buffers(s, scale, mean, ds_dtype, ds2_dtype, write_ds, param_grads)
    batch, channels, height, width = s.shape
    pixels = height * width
    block_c, block_p, num_warps = launch_config(max(channels, 1), max(pixels, 1))
    n_blocks = _tensors.cdiv(pixels, block_p)
    if param_grads:
        dparam_part = _tensors.empty_buffer((n_blocks, 2, batch, channels), mean.dtype, s.device)
    else:
        dparam_part = dparams
    if s.numel() > 0:
        grad_out, g_strides = _tensors.flat_pixels(grad_out)
        g2, g2_strides = (grad_out, g_strides) if grad_out2 is None else _tensors.flat_pixels(grad_out2)
        s, s_strides = _tensors.flat_pixels(s)
        if grad_s is None:
            gs, gs_strides = grad_out, g_strides
        else:
            gs, gs_strides = _tensors.flat_pixels(grad_s)
        ds_strides = _tensors.pixel_strides(ds) if write_ds else g_strides
        ds2_strides = g_strides if ds2_dtype is None else _tensors.pixel_strides(ds2)
        _tensors.launch_over_batch(
            _adaln_bwd_kernel, (n_blocks,), batch,
            grad_out, g2, gs, s, scale, mean, rstd,
            ds, ds2, dparam_part,
            batch, channels, pixels,
            *g_strides, *g2_strides, *gs_strides, *s_strides, *ds_strides, *ds2_strides,
            *scale.stride(),
            HAS_GRAD_S=grad_s is not None,
            HAS_GRAD_OUT2=grad_out2 is not None,
            WRITE_DS=write_ds,
            WRITE_DS2=ds2_dtype is not None,
            PARAM_GRADS=param_grads,
            COMPUTE=_tensors.compute_dtype(grad_out, grad_out2, grad_s, s, scale, mean),
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
            **_tensors.COMPILE_OPTIONS,
        )
    if param_grads:
        # Deterministic: a fixed-order torch reduction over the per-program partial sums.
        torch.sum(dparam_part, dim=0, out=dparams)
    return ds, ds2, dparams


_adaln_backward = torch.library.custom_op("liquiddiff::adaln_modulate_backward", mutates_args=())(
    _backward_kernels
)


@_adaln_backward.register_fake
def _(grad_out, grad_s, s, scale, mean, rstd, ds_dtype, ds2_dtype, write_ds, param_grads, grad_out2=None):
    return _backward_buffers(s, scale, mean, ds_dtype, ds2_dtype, write_ds, param_grads)


def _setup_context(ctx, inputs, output):
    x, scale, shift, _eps, residual, _out_dtype, _copy_dtype = inputs
    _out, s, mean, rstd, copy = output
    ctx.save_for_backward(x if residual is None else s, scale, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.scale_dtype = scale.dtype
    ctx.shift_dtype = shift.dtype
    # The statistics are saved state, not results to differentiate; s is a placeholder without
    # residual, and a constant when neither x nor residual requires grad (as in the reference).
    # The copy (out cast for a convolution that reads it in place of out, ``copy_dtype``) is
    # out's value: its consumer hands its gradient to out's. (One call: each replaces the last.)
    constant = [mean, rstd, copy]
    if residual is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[4]):
        constant.append(s)
    ctx.mark_non_differentiable(*constant)
    # An output that does not reach the loss then comes to backward as None, not as an
    # activation-sized tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_s, _grad_mean, _grad_rstd, _grad_copy, launch=_adaln_backward):
    s, scale, mean, rstd = ctx.saved_tensors
    need_x, need_scale, need_shift, _, need_res = ctx.needs_input_grad[:5]
    has_residual = ctx.residual_dtype is not None
    if grad_out is None:
        # Only s reached the loss: the norm branch contributes nothing.
        grad_x = None if grad_s is None or not need_x else grad_s.to(ctx.x_dtype)
        grad_res = None if grad_s is None or not need_res else grad_s.to(ctx.residual_dtype)
        return grad_x, None, None, None, grad_res, None, None

    same_dtype = not has_residual or ctx.residual_dtype == ctx.x_dtype
    write_ds = need_x or (need_res and same_dtype)
    ds2_dtype = ctx.residual_dtype if need_res and not same_dtype else None
    param_grads = need_scale or need_shift
    ds, ds2, dparams = launch(
        grad_out, grad_s, s, scale, mean, rstd, ctx.x_dtype, ds2_dtype, write_ds, param_grads)
    grad_x = ds if need_x else None
    grad_res = (ds if same_dtype else ds2) if need_res else None
    grad_scale, grad_shift = _tensors.unstack_grads(
        dparams, (ctx.scale_dtype if need_scale else None, ctx.shift_dtype if need_shift else None))
    return grad_x, grad_scale, grad_shift, None, grad_res, None, None


_adaln_forward.register_autograd(_backward, setup_context=_setup_context)
_EagerAdaLN = _eager.eager_function(
    "_EagerAdaLN", _forward_kernels, _setup_context,
    lambda ctx, *grads: _backward(ctx, *grads, launch=_backward_kernels),
)


class _AdaLNWithInput(torch.autograd.Function):
    """(out, x, copy) of the op without residual, as one node: the gradient x receives through
    the second output (from its other consumers: the block's CfC residual) is the backward
    kernel's grad_s, added in the pass that writes x's gradient instead of in a pass of
    autograd's. Launches the kernels directly in eager mode, the custom ops when traced."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps, residual, out_dtype, copy_dtype):
        # residual: always None, in the op's argument order so that _backward reads the flags.
        ctx.traced = _eager.needs_custom_op(x)
        launch = _adaln_forward if ctx.traced else _forward_kernels
        output = launch(x, scale, shift, eps, None, out_dtype, copy_dtype)
        _setup_context(ctx, (x, scale, shift, eps, None, out_dtype, copy_dtype), output)
        return output[0], x, output[4]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_x, _grad_copy):
        return _backward(ctx, grad_out, grad_x, None, None, None,
                         launch=_adaln_backward if ctx.traced else _backward_kernels)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not 0.0 < eps < math.inf:  # NaN too; and no math.isfinite, which a SymFloat (dynamic=True) breaks
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    return eps


def check_arguments(x, scale, shift, eps, residual=None, out_dtype=None, copy_dtype=None, name="x") -> float:
    """Argument checks before any work, each naming the argument (x as ``name``); returns eps as
    a float."""
    _tensors.check_activation(name, x)
    batch, channels = x.shape[:2]
    _tensors.check_vector("scale", scale, (batch, channels), x.device)
    _tensors.check_vector("shift", shift, (batch, channels), x.device)
    if residual is not None:
        _tensors.check_activation("residual", residual, like=x)
    eps = _check_eps(eps)
    if channels > MAX_CHANNELS:
        raise ValueError(f"{name}: at most {MAX_CHANNELS} channels are supported, got {channels}")
    for arg, dtype in (("out_dtype", out_dtype), ("copy_dtype", copy_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{arg}: expected a floating-point torch.dtype or None, got {dtype!r}")
    return eps


def normalize(x, scale, shift, eps: float, out_dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``: out = AdaLN(x) stored in ``out_dtype`` (when given), and x's
    per-pixel statistics ([B, H*W], fp32 or fp64), with which a kernel that loads x anyway remakes
    out exactly (``cfc_relax.forward(normalization=)``). No autograd node: for a caller's
    autograd.Function, with :func:`normalize_backward` (``parallel_cfc.normalized_parallel_cfc``);
    arguments as :func:`check_arguments` checks them; the Triton kernel only."""
    op = _adaln_forward if _eager.needs_custom_op(x) else _forward_kernels
    out, _s, mean, rstd, _copy = op(x, scale, shift, eps, None, out_dtype, None)
    return out, mean, rstd


def normalize_backward(grad_outs, grad_x, x, mean, rstd, scale, shift_dtype: torch.dtype, needs) -> tuple:
    """(d x, d scale, d shift) of :func:`normalize`'s out for the upstream gradient, the sum of
    ``grad_outs`` (one or two: two consumers' gradients, summed in registers and rounded to the
    first one's dtype, as an in-place add would store the sum), plus ``grad_x`` (or None), the
    gradient x receives from its other consumers, in any dtype (rounded to x's as it is loaded,
    as autograd would cast it), added in the same pass; None where ``needs`` (three flags) says
    so."""
    need_x, need_scale, need_shift = needs
    launch = _adaln_backward if _eager.needs_custom_op(x) else _backward_kernels
    ds, _, dparams = launch(grad_outs[0], grad_x, x, scale, mean, rstd, x.dtype, None, need_x, need_scale or need_shift,
                            *grad_outs[1:])
    d_scale, d_shift = _tensors.unstack_grads(dparams, (scale.dtype if need_scale else None,
                                                        shift_dtype if need_shift else None))
    return ds if need_x else None, d_scale, d_shift


def adaln_modulate(x, scale, shift, eps: float = 1e-6, residual=None, *, out_dtype=None, return_input=False,
                   copy_dtype=None):
    """Fused :func:`liquiddiff.functional.adaln_modulate`: same signature, dtypes and results.

    Returns ``out``, or ``(out, s)`` when ``residual`` is given. ``out_dtype`` stores ``out`` in
    that dtype instead of the promoted one: the reference's ``out.to(out_dtype)``, without the
    cast's pass over memory (the fused block's FFN input, which its conv would cast to
    autocast's dtype anyway). ``return_input=True`` (without residual) returns ``(out, x)``: use
    that x for x's other consumers, and the backward kernel adds the gradient they give x in the
    pass that writes x's gradient. ``copy_dtype`` also returns ``out.to(copy_dtype)``, last,
    written by the same pass (the fused CfC's 7x7 conv input under autocast, where a cast read
    out again; out itself, detached, when out has that dtype): a copy without a gradient of its
    own, whose consumer gives its gradient to out.
    """
    eps = check_arguments(x, scale, shift, eps, residual, out_dtype, copy_dtype)
    if return_input and residual is not None:
        raise ValueError("return_input: only without residual (with one, the sum s is returned)")
    wanted_copy = copy_dtype
    if copy_dtype == (out_dtype or _tensors.result_dtype(x, residual, scale, shift)):
        copy_dtype = None  # out is its own copy, as out.to(its dtype) is out
    if not runtime.use_triton(OP_NAME, x.device.type):
        out = functional.adaln_modulate(x, scale, shift, eps=eps, residual=residual)
        out, s = out if residual is not None else (out, None)
        out = out if out_dtype is None else out.to(out_dtype)
        copy = None if copy_dtype is None else out.detach().to(copy_dtype)
    elif return_input:
        out, x, copy = _AdaLNWithInput.apply(x, scale, shift, eps, None, out_dtype, copy_dtype)
    else:
        op = _adaln_forward if _eager.needs_custom_op(x) else _EagerAdaLN.apply
        out, s, _mean, _rstd, copy = op(x, scale, shift, eps, residual, out_dtype, copy_dtype)
    result = (out, s) if residual is not None else (out, x) if return_input else (out,)
    if wanted_copy is not None:
        result += (out.detach() if copy_dtype is None else copy,)
    return result if len(result) > 1 else out

"""SiLU of a per-channel modulation in Triton, forward and backward: the op
:func:`liquiddiff.functional.modulated_silu` (public: :func:`modulated_silu`), and the launchers
that ``silu_conv1x1`` (recompute.py) calls for the spatial mix's activation, modulated by t.

    y = z[b, c, p] * (1 + scale[b, c]) + shift[b, c],   a = silu(y)
    d_y = d_a * sig(y) * (1 + y * (1 - sig(y))),   d_z = d_y * (1 + scale[b, c])
    d_scale[b, c] = sum_p d_y * z,   d_shift[b, c] = sum_p d_y

The backward kernel also serves a plain SiLU whose output feeds several consumers
(:func:`silu_backward`: the CfC backbone's SiLU, read by the f, g and h convs): it sums their
gradients in registers and applies SiLU's backward, d_z = sig(z) * (1 + z * (1 - sig(z))) *
sum(grads), in one pass instead of casts, fp32 adds and SiLU's backward (about 19 passes, 5
here, for three bf16 gradients). Without SiLU it is a plain sum of gradients
(:func:`sum_gradients`: the spatial mix's input, whose conv, pixel-sum and residual gradients
meet in fp32 after cuDNN's input gradient), and with one "gradient" a cast that also sums over
the pixels (:func:`cast_with_pixel_sum`: the spatial mix's input before cuDNN's conv); with
neither output, a per-channel sum over the batch and the pixels (:func:`channel_sum`: the bias
gradient of a convolution left to cuDNN, where aten's bf16 reduction ran at a fraction of the
bandwidth: 15 ms of the fused H100 step for about 10 GB). That bias gradient also comes out of
a pass that writes the conv's upstream gradient anyway, summed as stored (rounded to its dtype,
as the conv's own reduction would read it): SiLU's backward (:func:`silu_backward_bias_grad`:
the FeedForward's first conv, the CfC backbone's 1x1) and the cast of a wider upstream
(:func:`cast_with_channel_sum`: the FeedForward's last conv, under the fp32 residual stream).

Memory moved per element: the forward reads z and writes a (in the convolution's dtype: no cast
copy); the backward reads d_a and z and writes d_z, and leaves d_scale and d_shift as
per-program fp32 partial sums over its pixels that torch adds up (deterministic, no atomics).
In eager PyTorch the same is a mul, an add and a SiLU forward (6 passes, 4 here fewer), and in
backward a recomputed modulation, SiLU's backward, two muls and two sums (about 14 passes, 3
here).

Layout: [B, C, H*W] through strides (``_tensors.flat_pixels``), NCHW, channels_last and channel
slices without a copy; the tile is [channels, pixels], shaped for z's layout (as the CfC
kernel's: Triton specialises the unit stride, so loads are vectors along it).
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from liquiddiff import functional

from . import _eager, _tensors, runtime

__all__ = ["modulated_silu", "forward", "backward", "silu_backward", "silu_backward_bias_grad", "sum_gradients",
           "cast_with_pixel_sum", "cast_with_channel_sum", "channel_sum"]

# Streaming tiles as the CfC kernel's (measured there on an H200); the backward holds two input
# tiles and two accumulators, fewer than the CfC backward's five and three, so it keeps the
# forward's elements per thread. Not yet timed on a GPU.
_FWD_TILE = 4096
_BWD_TILE = 2048
_PER_THREAD = 16
_BWD_MAX_TILES = 16
_BWD_MIN_PROGRAMS = 1024


if triton is not None:

    @triton.jit
    def _modulation(scale_ptr, shift_ptr, pid_b, cs, c_mask, ss_b, ss_c, sh_b, sh_c, COMPUTE: tl.constexpr):
        """(1 + scale, shift) of this program's channels, as [BLOCK_C, 1] columns."""
        one_plus = 1.0 + tl.load(scale_ptr + pid_b * ss_b + cs * ss_c, mask=c_mask).to(COMPUTE)
        shift = tl.load(shift_ptr + pid_b * sh_b + cs * sh_c, mask=c_mask).to(COMPUTE)
        return one_plus[:, None], shift[:, None]

    @triton.jit
    def _modulated_silu_fwd_kernel(
        z_ptr, scale_ptr, shift_ptr, out_ptr, C, P,
        sz_b, sz_c, sz_p, so_b, so_c, so_p, ss_b, ss_c, sh_b, sh_c, batch_start,
        COMPUTE: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # int64 batch offset: B * C * H * W may pass 2**31 while one batch item does not (WIDE:
        # it does, and the channel and pixel offsets are int64 too).
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        if WIDE:
            cs, ps = cs.to(tl.int64), ps.to(tl.int64)
        c_mask = cs < C
        mask = c_mask[:, None] & (ps < P)[None, :]
        one_plus, shift = _modulation(scale_ptr, shift_ptr, pid_b, cs, c_mask, ss_b, ss_c, sh_b, sh_c, COMPUTE)
        z = tl.load(z_ptr + pid_b * sz_b + cs[:, None] * sz_c + ps[None, :] * sz_p, mask=mask).to(COMPUTE)
        y = z * one_plus + shift
        out = y * tl.sigmoid(y)
        tl.store(out_ptr + pid_b * so_b + cs[:, None] * so_c + ps[None, :] * so_p,
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _modulated_silu_bwd_kernel(
        go_ptr, go2_ptr, go3_ptr, z_ptr, scale_ptr, shift_ptr, dz_ptr, part_ptr, B, C, P,
        sgo_b, sgo_c, sgo_p, sgo2_b, sgo2_c, sgo2_p, sgo3_b, sgo3_c, sgo3_p,
        sz_b, sz_c, sz_p, sdz_b, sdz_c, sdz_p, ss_b, ss_c, sh_b, sh_c, batch_start,
        GRADS: tl.constexpr, SILU: tl.constexpr, MODULATED: tl.constexpr, NEED_DZ: tl.constexpr,
        NEED_PARAMS: tl.constexpr, SUM_STORED: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TILES: tl.constexpr,
    ):
        # GRADS (1-3) upstream gradients of the same activation, summed in registers (the CfC
        # backbone's SiLU feeds three convs; any strides, a broadcast one included). MODULATED
        # False: plain SiLU, y = z. SILU False: no activation, d_z is the sum (z unread).
        # Unmodulated, NEED_PARAMS sums d_z over the pixels (the second partial; the first stays
        # zero); SUM_STORED: d_z as stored, rounded to its dtype (a bias gradient: the sum the
        # next conv's own reduction of d_z would make).
        pid_p = tl.program_id(0)
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if WIDE:
            cs = cs.to(tl.int64)
        c_mask = cs < C
        if MODULATED:
            one_plus, shift = _modulation(scale_ptr, shift_ptr, pid_b, cs, c_mask, ss_b, ss_c, sh_b, sh_c, COMPUTE)
        # Whole tiles accumulate; one cross-thread reduction per program at the end.
        acc_scale = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        acc_shift = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        for i in range(TILES):
            ps = (pid_p * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            if WIDE:
                ps = ps.to(tl.int64)
            mask = c_mask[:, None] & (ps < P)[None, :]
            rows, cols = cs[:, None], ps[None, :]
            go = tl.load(go_ptr + pid_b * sgo_b + rows * sgo_c + cols * sgo_p, mask=mask).to(COMPUTE)
            if GRADS >= 2:
                go += tl.load(go2_ptr + pid_b * sgo2_b + rows * sgo2_c + cols * sgo2_p, mask=mask).to(COMPUTE)
            if GRADS >= 3:
                go += tl.load(go3_ptr + pid_b * sgo3_b + rows * sgo3_c + cols * sgo3_p, mask=mask).to(COMPUTE)
            if SILU:
                z = tl.load(z_ptr + pid_b * sz_b + rows * sz_c + cols * sz_p, mask=mask).to(COMPUTE)
                if MODULATED:
                    y = z * one_plus + shift
                else:
                    y = z
                sig = tl.sigmoid(y)
                dy = go * (sig * (1.0 + y * (1.0 - sig)))
            else:
                dy = go
            if NEED_PARAMS:
                # Masked lanes hold garbage (inf * 0 is NaN): select, don't rely on zeros.
                if SILU and MODULATED:
                    acc_scale += tl.where(mask, dy * z, 0.0)
                if SUM_STORED:
                    acc_shift += tl.where(mask, dy.to(dz_ptr.dtype.element_ty).to(COMPUTE), 0.0)
                else:
                    acc_shift += tl.where(mask, dy, 0.0)
            if NEED_DZ:
                if MODULATED:
                    dy = dy * one_plus
                tl.store(dz_ptr + pid_b * sdz_b + rows * sdz_c + cols * sdz_p,
                         dy.to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            part = part_ptr + (pid_p * B + pid_b) * C + cs
            tl.store(part, tl.sum(acc_scale, axis=1), mask=c_mask)
            tl.store(part + tl.num_programs(0).to(tl.int64) * B * C, tl.sum(acc_shift, axis=1), mask=c_mask)


def _tile(C: int, P: int, z_strides: tuple[int, int, int], elements: int) -> tuple[int, int, int]:
    return _tensors.pixel_tile(C, P, z_strides[1] == 1 and C > 1, elements, _PER_THREAD)


@_tensors.launches_on_input_device
def _forward_kernels(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = _tensors.empty_activation(z, dtype)
    B, C, H, W = z.shape
    P = H * W
    (z, out_flat), (sz, so) = _tensors.flat_all(z, out)
    block_c, block_p, num_warps = _tile(C, P, sz, _FWD_TILE)
    _tensors.launch_over_batch(
        _modulated_silu_fwd_kernel, (_tensors.cdiv(P, block_p), _tensors.cdiv(C, block_c)), B,
        z, scale, shift, out_flat, C, P, *sz, *so, *scale.stride(), *shift.stride(),
        COMPUTE=_tensors.compute_dtype(z, scale, shift, out), WIDE=_tensors.wide_offsets(z, out_flat),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps, **_tensors.COMPILE_OPTIONS,
    )
    return out


_forward_op = torch.library.custom_op("liquiddiff::modulated_silu_forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(z, scale, shift, dtype):
    return _tensors.empty_activation(z, dtype)


def forward(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(z * (1 + scale) + shift), computed in fp32 (fp64 for fp64) and stored in ``dtype``,
    in z's memory format. No autograd: the caller's autograd.Function calls :func:`backward`."""
    op = _forward_op if _eager.needs_custom_op(z) else _forward_kernels
    return op(z, scale, shift, dtype)


def _launch_backward(grads, z, scale, shift, need_dz: bool, need_params: bool, silu: bool = True,
                     dz_dtype: typing.Optional[torch.dtype] = None, sum_stored: bool = False):
    """(d_z or an empty tensor, partials [2, programs, B, C] or None): one launch over z. ``silu``
    False: d_z (in ``dz_dtype``) is the sum of ``grads``, z only gives its shape and layout.
    ``sum_stored`` (unmodulated): the pixel sums are of d_z as stored, not of its unrounded values."""
    if sum_stored and (scale is not None or not need_dz):
        raise ValueError("sum_stored: only for an unmodulated d_z that is stored")
    B, C, H, W = z.shape
    P = H * W
    d_z = _tensors.empty_activation(z, dz_dtype or z.dtype) if need_dz else z.new_empty(0)
    flat, strides = _tensors.flat_all(*grads, z, d_z if need_dz else z)
    go, sgo = flat[:-2], strides[:-2]
    z, d_z_flat, sz, sdz = flat[-2], flat[-1], strides[-2], strides[-1]
    modulated = scale is not None
    compute, part_dtype = _tensors.compute_dtypes(*grads, z, scale, shift)
    block_c, block_p, num_warps = _tile(C, P, sz, _BWD_TILE)
    tiles = _tensors.tiles_per_program(C, P, B, block_c, block_p, _BWD_MAX_TILES, _BWD_MIN_PROGRAMS)
    pixel_programs = _tensors.cdiv(P, block_p * tiles)
    partials = _tensors.empty_buffer((2, pixel_programs, B, C), part_dtype, z.device) if need_params else None
    # Absent operands (a second or third gradient, the modulation) repeat the first ones.
    go, sgo = go + [go[-1]] * (3 - len(go)), sgo + [sgo[-1]] * (3 - len(sgo))
    params, param_strides = ((scale, shift), (*scale.stride(), *shift.stride())) if modulated else ((z, z), (0,) * 4)
    _tensors.launch_over_batch(
        _modulated_silu_bwd_kernel, (pixel_programs, _tensors.cdiv(C, block_c)), B,
        *go, z, *params, d_z_flat, z if partials is None else partials, B, C, P,
        *sgo[0], *sgo[1], *sgo[2], *sz, *sdz, *param_strides,
        GRADS=len(grads), SILU=silu, MODULATED=modulated, NEED_DZ=need_dz, NEED_PARAMS=need_params,
        SUM_STORED=sum_stored, COMPUTE=compute, WIDE=_tensors.wide_offsets(*go, z, d_z_flat), BLOCK_C=block_c,
        BLOCK_P=block_p, TILES=tiles, num_warps=num_warps, **_tensors.COMPILE_OPTIONS,
    )
    return d_z, partials


@_tensors.launches_on_input_device
def _backward_kernels(grad_out: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      needs: typing.Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_z, d scale and d shift stacked [2, B, C]: one reduction and one cast,
    ``_tensors.stacked_dtype``); a skipped one is an empty tensor."""
    d_z, partials = _launch_backward([grad_out], z, scale, shift, needs[0], needs[1] or needs[2])
    if partials is None:
        return d_z, scale.new_empty(0)
    return d_z, partials.sum(1).to(_tensors.stacked_dtype(partials.dtype, (scale.dtype, shift.dtype)))


_backward_op = torch.library.custom_op("liquiddiff::modulated_silu_backward", mutates_args=())(_backward_kernels)


@_backward_op.register_fake
def _(grad_out, z, scale, shift, needs):
    part_dtype = _tensors.compute_dtypes(grad_out, z, scale, shift)[1]
    return (
        _tensors.empty_activation(z, z.dtype) if needs[0] else z.new_empty(0),
        scale.new_empty((2, *scale.shape), dtype=_tensors.stacked_dtype(part_dtype, (scale.dtype, shift.dtype)))
        if needs[1] or needs[2] else scale.new_empty(0),
    )


def backward(grad_out: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             needs: typing.Sequence[bool]):
    """(d_z, d_scale, d_shift) of :func:`forward` for ``grad_out`` (the gradient of its output),
    each in its input's dtype; None where ``needs`` (three flags) says so."""
    op = _backward_op if _eager.needs_custom_op(z) else _backward_kernels
    d_z, d_params = op(grad_out, z, scale, shift, list(needs))
    d_scale, d_shift = _tensors.unstack_grads(
        d_params, (scale.dtype if needs[1] else None, shift.dtype if needs[2] else None))
    return d_z if needs[0] else None, d_scale, d_shift


def _check_silu_grads(grads) -> None:
    if not 1 <= len(grads) <= 3:
        raise ValueError(f"grads: expected one to three gradients, got {len(grads)}")


@_tensors.launches_on_input_device
def _silu_backward_kernels(grads: typing.Sequence[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return _launch_backward(list(grads), z, None, None, True, False)[0]


_silu_backward_op = torch.library.custom_op("liquiddiff::silu_backward_sum", mutates_args=())(_silu_backward_kernels)


@_silu_backward_op.register_fake
def _(grads, z):
    return _tensors.empty_activation(z, z.dtype)


def silu_backward(grads: typing.Sequence[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The gradient of z for ``a = silu(z)`` whose consumers gave ``grads`` (one to three, any
    dtypes), summed in fp32 in registers, in z's dtype: one pass where eager casts, adds and runs
    SiLU's backward (the CfC backbone's SiLU feeds three convolutions)."""
    _check_silu_grads(grads)
    op = _silu_backward_op if _eager.needs_custom_op(z) else _silu_backward_kernels
    return op(grads, z)


def _channel_sums(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [C] sum over the batch and the pixels, in ``dtype``, from :func:`_launch_backward`'s partials."""
    return partials[1].sum((0, 1)).to(dtype)


@_tensors.launches_on_input_device
def _silu_backward_bias_grad_kernels(grads: typing.Sequence[torch.Tensor], z: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    d_z, partials = _launch_backward(list(grads), z, None, None, True, True, sum_stored=True)
    return d_z, _channel_sums(partials, z.dtype)


_silu_backward_bias_grad_op = torch.library.custom_op("liquiddiff::silu_backward_bias_grad", mutates_args=())(
    _silu_backward_bias_grad_kernels)


@_silu_backward_bias_grad_op.register_fake
def _(grads, z):
    return _tensors.empty_activation(z, z.dtype), z.new_empty(z.shape[1])


def silu_backward_bias_grad(grads: typing.Sequence[torch.Tensor], z: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`silu_backward`, that d_z summed over the batch and the pixels as stored, rounded to
    z's dtype, in z's dtype): the gradient of z and the bias gradient of the convolution that made
    z, whose own reduction would read d_z back (as the reference's conv sums the gradient it
    receives)."""
    _check_silu_grads(grads)
    op = _silu_backward_bias_grad_op if _eager.needs_custom_op(z) else _silu_backward_bias_grad_kernels
    return op(grads, z)


@_tensors.launches_on_input_device
def _cast_with_channel_sum_kernels(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    copy, partials = _launch_backward([x], x, None, None, True, True, silu=False, dz_dtype=dtype, sum_stored=True)
    return copy, _channel_sums(partials, dtype)


_cast_with_channel_sum_op = torch.library.custom_op("liquiddiff::cast_with_channel_sum", mutates_args=())(
    _cast_with_channel_sum_kernels)


@_cast_with_channel_sum_op.register_fake
def _(x, dtype):
    return _tensors.empty_activation(x, dtype), x.new_empty(x.shape[1], dtype=dtype)


def cast_with_channel_sum(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in ``dtype``, in x's layout; that copy summed over the batch and the pixels, in
    ``dtype``): a convolution's upstream gradient rounded to the conv's dtype and the conv's bias
    gradient (:func:`channel_sum` of the copy) in one pass, where a cast and a sum read x and
    then the copy."""
    op = _cast_with_channel_sum_op if _eager.needs_custom_op(x) else _cast_with_channel_sum_kernels
    return op(x, dtype)


@_tensors.launches_on_input_device
def _cast_with_pixel_sum_kernels(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    copy, partials = _launch_backward([x], x, None, None, True, True, silu=False, dz_dtype=dtype)
    return copy, partials[1].sum(0).to(x.dtype)


_cast_with_pixel_sum_op = torch.library.custom_op("liquiddiff::cast_with_pixel_sum", mutates_args=())(
    _cast_with_pixel_sum_kernels)


@_cast_with_pixel_sum_op.register_fake
def _(x, dtype):
    return _tensors.empty_activation(x, dtype), x.new_empty(x.shape[:2])


def cast_with_pixel_sum(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in ``dtype``, in x's layout; x summed over its pixels, in x's dtype, from fp32 (fp64)
    per-program partials): one pass where a cast and a sum read x twice (the spatial mix's fp32
    input under autocast, before cuDNN's conv: the copy is what its backward keeps)."""
    op = _cast_with_pixel_sum_op if _eager.needs_custom_op(x) else _cast_with_pixel_sum_kernels
    return op(x, dtype)


@_tensors.launches_on_input_device
def _channel_sum_kernels(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, partials = _launch_backward([x], x, None, None, False, True, silu=False)
    return _channel_sums(partials, dtype)


_channel_sum_op = torch.library.custom_op("liquiddiff::channel_sum", mutates_args=())(_channel_sum_kernels)


@_channel_sum_op.register_fake
def _(x, dtype):
    return x.new_empty(x.shape[1], dtype=dtype)


def channel_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [B, C, H, W] summed over B, H and W, in ``dtype``, from fp32 (fp64) per-program partials:
    a convolution's bias gradient from its upstream gradient x (any layout), read once."""
    _tensors.check_activation("x", x)
    op = _channel_sum_op if _eager.needs_custom_op(x) else _channel_sum_kernels
    return op(x, dtype)


@_tensors.launches_on_input_device
def _sum_kernels(grads: typing.Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _launch_backward(list(grads), grads[0], None, None, True, False, silu=False, dz_dtype=dtype)[0]


_sum_op = torch.library.custom_op("liquiddiff::gradient_sum", mutates_args=())(_sum_kernels)


@_sum_op.register_fake
def _(grads, dtype):
    return _tensors.empty_activation(grads[0], dtype)


def sum_gradients(grads: typing.Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The sum of two or three gradients of one tensor (any dtypes; after the first, any strides:
    a per-channel gradient expanded over the pixels is read without being materialised), in
    ``dtype`` and the first one's layout: one pass where eager adds pairwise (the spatial mix's
    input, after cuDNN's input gradient)."""
    if not 2 <= len(grads) <= 3:
        raise ValueError(f"grads: expected two or three gradients, got {len(grads)}")
    op = _sum_op if _eager.needs_custom_op(grads[0]) else _sum_kernels
    return op(grads, dtype)


class _ModulatedSilu(torch.autograd.Function):
    """The op on the launchers, saving its inputs; under torch.compile they are custom ops."""

    @staticmethod
    def forward(ctx, z, scale, shift):
        ctx.save_for_backward(z, scale, shift)
        return forward(z, scale, shift, _tensors.result_dtype(z, scale, shift))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, scale, shift = ctx.saved_tensors
        return backward(grad_out, z, scale, shift, ctx.needs_input_grad)


def modulated_silu(z, scale, shift):
    """Fused :func:`liquiddiff.functional.modulated_silu` (same signature, value and gradients,
    the result in the promoted dtype of the inputs)."""
    _tensors.check_activation("z", z)
    _tensors.check_vector("scale", scale, z.shape[:2], z.device)
    _tensors.check_vector("shift", shift, z.shape[:2], z.device)
    if not runtime.use_triton("modulated_silu", z.device.type):
        return functional.modulated_silu(z, scale, shift)
    return _ModulatedSilu.apply(z, scale, shift)

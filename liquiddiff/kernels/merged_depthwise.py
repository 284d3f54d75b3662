"""The spatial mix's depthwise kernels merged into one, in Triton, forward and backward: the op
:func:`liquiddiff.functional.merged_depthwise_weight` (public: :func:`merged_depthwise_weight`).

    weight[c, 0, i, j] = sum_n w_n[c, 0, i - o_n, j - o_n]  (taps inside w_n; o_n = (K - k_n) / 2)
    bias[c] = sum_n b_n[c]
    d w_n = d weight[:, :, o_n : o_n + k_n, o_n : o_n + k_n],   d b_n = d bias

Why a kernel for a few KB: the merged kernel depends on parameters that change every step, so
each forward makes it. Eager PyTorch zero-pads each smaller kernel and adds (six launches for
three branches), and its backward crops each pad and copies the gradients that autograd hands
to several parameters (five more): per block of the model, ten launches of almost no work. Here
one launch each way.

Memory moved: the branch weights and biases read once and the merged ones written once (the
reverse in backward). The branches are added in the order given, rounding to the result dtype
after each add as the reference's adds do: bitwise its result (a padded zero adds nothing) when
the branches share a dtype, as a model's do. Mixed dtypes (fp32 and fp64 branches) round each
partial sum to the final dtype, where the reference rounds to the dtype promoted so far: within
a rounding of it.

Layout: weights [C, 1, k, k] with any strides (channels_last's included), biases [C]; outputs
in contiguous order (the branch gradients with their weights' strides where those address
memory in that order, as a channels_last kernel's do). One to MAX_BRANCHES branches of odd
sizes (more: the reference runs); one program holds a block of channels and all K*K taps of
the largest kernel.
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

__all__ = ["merged_depthwise_weight", "MAX_BRANCHES"]

MAX_BRANCHES = 4
_BLOCK_C = 32
OP_NAME = "merged_depthwise_weight"


if triton is not None:

    @triton.jit
    def _branch_taps(w_ptr, cs, c_mask, rows, cols, taps_mask, s_c, s_h, s_w,
                     K: tl.constexpr, k: tl.constexpr, COMPUTE: tl.constexpr):
        """[BLOCK_C, TAPS] values of the k x k kernel at the K x K grid's (rows, cols): zero
        outside its centred window."""
        o = (K - k) // 2
        inside = taps_mask & (rows >= o) & (rows < o + k) & (cols >= o) & (cols < o + k)
        r, q = tl.where(inside, rows - o, 0), tl.where(inside, cols - o, 0)
        ptrs = w_ptr + cs[:, None] * s_c + (r * s_h + q * s_w)[None, :]
        return tl.load(ptrs, mask=c_mask[:, None] & inside[None, :], other=0.0).to(COMPUTE)

    @triton.jit
    def _merge_fwd_kernel(
        w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, out_w_ptr, out_b_ptr, C,
        sw0_c, sw0_h, sw0_w, sw1_c, sw1_h, sw1_w, sw2_c, sw2_h, sw2_w, sw3_c, sw3_h, sw3_w,
        sb0, sb1, sb2, sb3,
        N: tl.constexpr, K: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
        K3: tl.constexpr, TAPS: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        taps = tl.arange(0, TAPS)
        taps_mask = taps < K * K
        rows, cols = taps // K, taps % K
        # Round after each add, as the reference adds tensors of the result dtype.
        out_ty = out_w_ptr.dtype.element_ty
        acc = _branch_taps(w0_ptr, cs, c_mask, rows, cols, taps_mask, sw0_c, sw0_h, sw0_w, K, K0, COMPUTE)
        bias = tl.load(b0_ptr + cs * sb0, mask=c_mask, other=0.0).to(COMPUTE)
        bias_ty = out_b_ptr.dtype.element_ty
        if N > 1:
            acc += _branch_taps(w1_ptr, cs, c_mask, rows, cols, taps_mask, sw1_c, sw1_h, sw1_w, K, K1, COMPUTE)
            acc = acc.to(out_ty).to(COMPUTE)
            bias = (bias + tl.load(b1_ptr + cs * sb1, mask=c_mask, other=0.0).to(COMPUTE)).to(bias_ty).to(COMPUTE)
        if N > 2:
            acc += _branch_taps(w2_ptr, cs, c_mask, rows, cols, taps_mask, sw2_c, sw2_h, sw2_w, K, K2, COMPUTE)
            acc = acc.to(out_ty).to(COMPUTE)
            bias = (bias + tl.load(b2_ptr + cs * sb2, mask=c_mask, other=0.0).to(COMPUTE)).to(bias_ty).to(COMPUTE)
        if N > 3:
            acc += _branch_taps(w3_ptr, cs, c_mask, rows, cols, taps_mask, sw3_c, sw3_h, sw3_w, K, K3, COMPUTE)
            acc = acc.to(out_ty).to(COMPUTE)
            bias = (bias + tl.load(b3_ptr + cs * sb3, mask=c_mask, other=0.0).to(COMPUTE)).to(bias_ty).to(COMPUTE)
        tl.store(out_w_ptr + cs[:, None] * (K * K) + taps[None, :], acc.to(out_ty),
                 mask=c_mask[:, None] & taps_mask[None, :])
        tl.store(out_b_ptr + cs, bias.to(bias_ty), mask=c_mask)

    @triton.jit
    def _crop(d_w_ptr, d_b, out_ptr, out_b_ptr, cs, c_mask, sd_c, sd_h, sd_w,
              K: tl.constexpr, k: tl.constexpr, TAPS: tl.constexpr):
        """One branch's gradients: the centred k x k window of d weight, and d bias."""
        o = (K - k) // 2
        taps = tl.arange(0, TAPS)
        taps_mask = taps < k * k
        mask = c_mask[:, None] & taps_mask[None, :]
        offsets = cs[:, None] * sd_c + ((taps // k + o) * sd_h + (taps % k + o) * sd_w)[None, :]
        window = tl.load(d_w_ptr + offsets, mask=mask, other=0.0)
        tl.store(out_ptr + cs[:, None] * (k * k) + taps[None, :], window.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_b_ptr + cs, d_b.to(out_b_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _merge_bwd_kernel(
        d_w_ptr, d_b_ptr, dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr, db0_ptr, db1_ptr, db2_ptr, db3_ptr, C,
        sd_c, sd_h, sd_w, sdb,
        N: tl.constexpr, K: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
        K3: tl.constexpr, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, T3: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        d_b = tl.load(d_b_ptr + cs * sdb, mask=c_mask, other=0.0)
        _crop(d_w_ptr, d_b, dw0_ptr, db0_ptr, cs, c_mask, sd_c, sd_h, sd_w, K, K0, T0)
        if N > 1:
            _crop(d_w_ptr, d_b, dw1_ptr, db1_ptr, cs, c_mask, sd_c, sd_h, sd_w, K, K1, T1)
        if N > 2:
            _crop(d_w_ptr, d_b, dw2_ptr, db2_ptr, cs, c_mask, sd_c, sd_h, sd_w, K, K2, T2)
        if N > 3:
            _crop(d_w_ptr, d_b, dw3_ptr, db3_ptr, cs, c_mask, sd_c, sd_h, sd_w, K, K3, T3)


def _padded(items: list, filler) -> list:
    """``items`` with ``filler`` up to MAX_BRANCHES (the kernels' fixed arguments; unused)."""
    return list(items) + [filler] * (MAX_BRANCHES - len(items))


def _sizes(weights) -> list[int]:
    return _padded([w.shape[-1] for w in weights], 1)


def _kernel_strides(w: torch.Tensor) -> tuple[int, int, int]:
    """(channel, row, column) strides of a [C, 1, k, k] tensor."""
    return w.stride(0), w.stride(2), w.stride(3)


def _forward_buffers(weights, biases) -> tuple[torch.Tensor, torch.Tensor]:
    size = max(w.shape[-1] for w in weights)
    channels = weights[0].shape[0]
    device = weights[0].device
    return (_tensors.empty_buffer((channels, 1, size, size), _tensors.result_dtype(*weights), device),
            _tensors.empty_buffer((channels,), _tensors.result_dtype(*biases), device))


@_tensors.launches_on_input_device
def _forward_kernels(weights: typing.Sequence[torch.Tensor],
                     biases: typing.Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = _forward_buffers(weights, biases)
    channels, size = weight.shape[0], weight.shape[-1]
    if channels:
        strides = [s for w in _padded(weights, weights[0]) for s in _kernel_strides(w)]
        bias_strides = [b.stride(0) for b in _padded(biases, biases[0])]
        sizes = _sizes(weights)
        _merge_fwd_kernel[(_tensors.cdiv(channels, _BLOCK_C),)](
            *_padded(weights, weights[0]), *_padded(biases, biases[0]), weight, bias, channels,
            *strides, *bias_strides,
            N=len(weights), K=size, K0=sizes[0], K1=sizes[1], K2=sizes[2], K3=sizes[3],
            TAPS=_tensors.next_power_of_2(size * size),
            COMPUTE=_tensors.compute_dtype(*weights, *biases), BLOCK_C=_BLOCK_C, **_tensors.COMPILE_OPTIONS,
        )
    return weight, bias


def _backward_buffers(weights, biases) -> tuple[list, list]:
    """The branch gradients, each in its parameter's dtype, with its strides when its memory is in
    contiguous order (a channels_last [C, 1, k, k] kernel's is: DDP warns when a gradient's
    strides differ from its parameter's), else contiguous."""
    return ([_tensors.empty_buffer(tuple(w.shape), w.dtype, w.device, like=w if w.is_contiguous() else None)
             for w in weights],
            [_tensors.empty_buffer(tuple(b.shape), b.dtype, b.device) for b in biases])


@_tensors.launches_on_input_device
def _backward_kernels(d_weight: torch.Tensor, d_bias: torch.Tensor, weights: typing.Sequence[torch.Tensor],
                      biases: typing.Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[d w_0, ..., d w_n, d b_0, ..., d b_n] (:func:`_backward_buffers`)."""
    d_ws, d_bs = _backward_buffers(weights, biases)
    channels, size = d_weight.shape[0], d_weight.shape[-1]
    if channels:
        sizes = _sizes(weights)
        _merge_bwd_kernel[(_tensors.cdiv(channels, _BLOCK_C),)](
            d_weight, d_bias, *_padded(d_ws, d_ws[0]), *_padded(d_bs, d_bs[0]), channels,
            *_kernel_strides(d_weight), d_bias.stride(0),
            N=len(weights), K=size, K0=sizes[0], K1=sizes[1], K2=sizes[2], K3=sizes[3],
            T0=_tensors.next_power_of_2(sizes[0] ** 2), T1=_tensors.next_power_of_2(sizes[1] ** 2),
            T2=_tensors.next_power_of_2(sizes[2] ** 2), T3=_tensors.next_power_of_2(sizes[3] ** 2),
            BLOCK_C=_BLOCK_C, **_tensors.COMPILE_OPTIONS,
        )
    return d_ws + d_bs


_forward_op = torch.library.custom_op("liquiddiff::merged_depthwise_weight", mutates_args=())(_forward_kernels)
_backward_op = torch.library.custom_op("liquiddiff::merged_depthwise_weight_backward",
                                       mutates_args=())(_backward_kernels)


@_forward_op.register_fake
def _(weights, biases):
    return _forward_buffers(weights, biases)


@_backward_op.register_fake
def _(d_weight, d_bias, weights, biases):
    d_ws, d_bs = _backward_buffers(weights, biases)
    return d_ws + d_bs


def _setup_context(ctx, inputs, output):
    weights, biases = inputs
    ctx.save_for_backward(*weights, *biases)
    ctx.branches = len(weights)


def _backward(ctx, d_weight, d_bias, launch=_backward_op):
    saved = ctx.saved_tensors
    weights, biases = saved[:ctx.branches], saved[ctx.branches:]
    grads = launch(d_weight, d_bias, list(weights), list(biases))
    return grads[:ctx.branches], grads[ctx.branches:]


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerMerge(torch.autograd.Function):
    """The op on the launchers in eager mode (no custom-op dispatch): the branch tensors as
    separate arguments, as autograd.Function needs them."""

    @staticmethod
    def forward(ctx, branches, *tensors):
        weights, biases = tensors[:branches], tensors[branches:]
        output = _forward_kernels(weights, biases)
        _setup_context(ctx, (weights, biases), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_weight, d_bias):
        d_ws, d_bs = _backward(ctx, d_weight, d_bias, launch=_backward_kernels)
        return (None, *d_ws, *d_bs)


def _check(weights, biases) -> None:
    if not weights or len(weights) != len(biases):
        raise ValueError(f"weights, biases: expected equally many (at least one), got {len(weights)} and "
                         f"{len(biases)}")
    channels = weights[0].shape[0] if isinstance(weights[0], torch.Tensor) else None
    device = weights[0].device if isinstance(weights[0], torch.Tensor) else None
    for i, (w, b) in enumerate(zip(weights, biases)):
        _tensors.check_floating(f"weights[{i}]", w)
        square = w.dim() == 4 and w.shape[2] == w.shape[3]
        if not square or w.shape[1] != 1 or w.shape[0] != channels or w.shape[3] % 2 == 0:
            raise ValueError(f"weights[{i}]: expected a depthwise kernel [{channels}, 1, k, k] with k odd, got shape "
                             f"{tuple(w.shape)}")
        _tensors.check_device(f"weights[{i}]", w, device)
        if b is not None or any(other is not None for other in biases):  # all biases or none
            _tensors.check_vector(f"biases[{i}]", b, (channels,), device)


def merged_depthwise_weight(weights, biases):
    """Fused :func:`liquiddiff.functional.merged_depthwise_weight`: the same (weight, bias),
    bitwise for branches of one dtype, and gradients; one kernel launch each way. One branch, or
    branches without biases (the kernel merges both): the reference's."""
    weights, biases = list(weights), list(biases)
    _check(weights, biases)
    if (len(weights) == 1 or len(weights) > MAX_BRANCHES or biases[0] is None
            or not runtime.use_triton(OP_NAME, weights[0].device.type)):
        return functional.merged_depthwise_weight(weights, biases)
    if _eager.needs_custom_op(weights[0]):
        return _forward_op(weights, biases)
    return _EagerMerge.apply(len(weights), *weights, *biases)

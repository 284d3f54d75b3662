"""Depthwise convolution (odd k x k, 'same' zero padding, stride 1) in Triton: the forward, the
input gradient and the weight and bias gradients of :func:`liquiddiff.functional.depthwise_conv`.

    out[b, c, i, j] = bias[c] + sum_{u, v} w[c, u, v] * x[b, c, i + u - P, j + v - P],  P = k // 2

The input gradient is the same convolution of grad_out with the kernel flipped, so one kernel
serves both. The weight gradient dw[c, u, v] = sum_{b, i, j} grad_out[b, c, i, j] *
x[b, c, i + u - P, j + v - P] (and dbias, the sum of grad_out) leaves each program as fp32
partial sums over its pixels that torch adds up: deterministic, no atomics.

Memory moved: the forward reads x and writes out once each: a program walks down a strip of
rows, loads each input row k times (its horizontal shifts, cache hits after the first) and adds
it to the k output rows it feeds (a sliding window; the strip's halo is k - 1 rows and columns).
The input gradient the same; the weight gradient reads x and grad_out once (k*k shifted reads
per row, cache hits) and writes [programs, k*k, C] fp32 partials.

Layout: a program owns BLOCK_C channels of a strip. In channels_last the channels of a pixel
are one contiguous run, so every load is a vector load; NCHW runs through the same strides
(runs along W), correct but not tuned. Precision: the reference convolves in one dtype (autocast's,
else the promoted one), so x and w are rounded to it in registers (no cast copy in memory), the
products accumulate in fp32 (fp64 for fp64) and the output is stored in that dtype.

Opt-in (runtime.OPT_IN): cuDNN runs these convolutions until the GPU report shows this kernel
faster (``LIQUIDDIFF_KERNELS=auto,depthwise_conv=triton`` turns it on).
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors

__all__ = ["forward", "backward", "is_depthwise"]

# Tile sizes from the compiler alone (no GPU has run these kernels yet): registers per thread
# and spills of the sm_90 compile of the launches at [8, 64, 256, 256]
# (``python -m benchmarks.kernel_resources``), the same with the GPU image's Triton 3.6 and this
# project's 3.9. Forward / input gradient: strips of 32 rows x 16 columns x 32 channels on 8
# warps, the horizontal taps a runtime loop: 58-64 registers, no spill; the accumulator's slot
# axis lies within each thread, so completing a row is an in-register sum, but each tap's
# [slots, channels] weight tile crosses warps through 1 KB of shared memory. (Unrolled taps
# spilled; an earlier design, one shifted tile load per tap, read the input k*k times from L1
# instead of k.) Weight gradient: a [taps (padded to a power of 2), W run, 32 channels] product
# of 2048 elements (one pixel per row step for 7x7), 8 warps: 46-48 registers.
_FWD_ROWS, _FWD_BLOCK_W = 32, 16
_MAX_BLOCK_C = 32
_FWD_WARPS = 8
_WGRAD_WARPS = 8
_WGRAD_ELEMENTS = 2048
_WGRAD_MIN_PROGRAMS = 1024


if triton is not None:

    @triton.jit
    def _strip(C, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's strip: batch item (int64, for offsets past 2**31), first row, columns,
        channels and channel mask. Grid: (row strips x column runs, channel blocks, B)."""
        tiles_w = tl.cdiv(W, BLOCK_W)
        pid_p = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ow = (pid_p % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        return tl.program_id(2).to(tl.int64), (pid_p // tiles_w) * ROWS, ow, cs, cs < C

    @triton.jit
    def _dwconv_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr,
        C, H, W,
        sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w, sw_c, sw_h, sw_w,
        K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
        CONV: tl.constexpr, ACC: tl.constexpr,
        ROWS: tl.constexpr, SLOTS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Sliding window down a [ROWS, BLOCK_W] strip: each input row is loaded once per
        # horizontal tap (K loads, not K*K) and added to the K output rows it feeds, which live
        # in SLOTS (>= K, a power of 2) accumulator rows: output row o in slot o % SLOTS. When
        # input row r is in, output row r - P is complete: it is stored and its slot cleared.
        P: tl.constexpr = K // 2
        pid_b, row0, ow, cs, c_mask = _strip(C, W, ROWS, BLOCK_W, BLOCK_C)
        slots = tl.arange(0, SLOTS)
        x_base = x_ptr + pid_b * sx_b + cs[None, :] * sx_c
        o_base = out_ptr + pid_b * so_b + cs[None, :] * so_c + ow[:, None] * so_w
        w_base = w_ptr + cs[None, :] * sw_c
        store_cols = (ow < W)[:, None] & c_mask[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=c_mask, other=0.0).to(CONV).to(ACC)
        acc = tl.zeros([SLOTS, BLOCK_W, BLOCK_C], dtype=ACC)
        for i in range(ROWS + K - 1):
            r = row0 - P + i  # the input row this step reads
            # Vectors, not scalars: the interpreter rejects a scalar mask & a tensor mask.
            row_ok = ((ow * 0 + r) >= 0) & ((ow * 0 + r) < H)
            # Slot s holds the output row o = s (mod SLOTS) of the window [r - P, r - P + SLOTS);
            # input row r reaches it through the kernel row u = r + P - o (when 0 <= u < K).
            u = K - 1 - ((slots - (r - P)) & (SLOTS - 1))
            u_ok = (u >= 0)[:, None] & c_mask[None, :]
            if FLIP:
                u = K - 1 - u
            for v in range(K):  # a runtime loop: unrolled taps keep too many loads live
                iw = ow + (v - P)
                ok = (row_ok & (iw >= 0) & (iw < W))[:, None] & c_mask[None, :]
                xv = tl.load(x_base + r * sx_h + iw[:, None] * sx_w, mask=ok, other=0.0).to(CONV).to(ACC)
                wv_col = (K - 1 - v) if FLIP else v
                wt = tl.load(w_base + u[:, None] * sw_h + wv_col * sw_w, mask=u_ok, other=0.0)
                acc += wt.to(CONV).to(ACC)[:, None, :] * xv[None, :, :]
            o = r - P  # complete now
            done = (slots == (o & (SLOTS - 1)))[:, None, None]
            out = tl.sum(tl.where(done, acc, 0.0), axis=0)
            if HAS_BIAS:
                out += bias[None, :]
            o_vec = ow * 0 + o
            keep = (o_vec >= row0) & (o_vec < row0 + ROWS) & (o_vec < H)
            tl.store(o_base + o * so_h, out.to(out_ptr.dtype.element_ty), mask=store_cols & keep[:, None])
            acc = tl.where(done, 0.0, acc)


    @triton.jit
    def _dwconv_wgrad_kernel(
        x_ptr, go_ptr, part_ptr,
        B, C, H, W,
        sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w,
        # constexpr: Triton 3.6's interpreter cannot loop over a runtime int (with NumPy 2).
        ROWS: tl.constexpr, K: tl.constexpr, TAPS: tl.constexpr, NEED_BIAS: tl.constexpr,
        CONV: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Program (row chunk, W run) x channel block x batch item. The k*k taps are the first
        # axis of one [TAPS, BLOCK_W, BLOCK_C] product, so a row costs one gather load and one
        # reduction over the W run, not k*k of each.
        pid_b, row0, ow, cs, c_mask = _strip(C, W, ROWS, BLOCK_W, BLOCK_C)
        taps = tl.arange(0, TAPS)
        du = (taps // K - K // 2)[:, None, None]
        dv = (taps % K - K // 2)[:, None, None]
        iw = ow[None, :, None] + dv
        # Lanes past the image's edge load nothing: 0 * an inf there would poison a tap's sum.
        col_ok = ((taps < K * K)[:, None, None] & (iw >= 0) & (iw < W) & (ow < W)[None, :, None]
                  & c_mask[None, None, :])
        x_base = x_ptr + pid_b * sx_b + cs[None, None, :] * sx_c + iw * sx_w
        g_base = go_ptr + pid_b * sg_b + cs[None, :] * sg_c + ow[:, None] * sg_w
        g_mask = (ow < W)[:, None] & c_mask[None, :]
        acc = tl.zeros([TAPS, BLOCK_C], dtype=ACC)
        acc_bias = tl.zeros([BLOCK_C], dtype=ACC)
        for r in range(ROWS):
            oh = row0 + r
            # A vector, not a scalar: the interpreter rejects a scalar mask & a tensor mask.
            row_ok = (ow * 0 + oh) < H
            go = tl.load(g_base + oh * sg_h, mask=g_mask & row_ok[:, None], other=0.0).to(CONV).to(ACC)
            ih = oh + du
            x_ok = col_ok & (ih >= 0) & (ih < H) & row_ok[None, :, None]
            xv = tl.load(x_base + ih * sx_h, mask=x_ok, other=0.0)
            acc += tl.sum(xv.to(CONV).to(ACC) * go[None, :, :], axis=1)
            if NEED_BIAS:
                acc_bias += tl.sum(go, axis=0)
        # partials: [programs over pixels, B, TAPS + 1, C]; the last tap row holds dbias.
        part = part_ptr + ((tl.program_id(0) * B + pid_b) * (TAPS + 1)) * C
        tl.store(part + taps[:, None] * C + cs[None, :], acc, mask=(taps < K * K)[:, None] & c_mask[None, :])
        if NEED_BIAS:
            tl.store(part + TAPS * C + cs, acc_bias, mask=c_mask)


def is_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """A convolution these kernels compute: one channel per group, odd square k > 1."""
    k = weight.shape[-1]
    return (groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
            and weight.shape[-2] == k and k > 1 and k % 2 == 1)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tl(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _channel_block(C: int) -> int:
    return min(_tensors.next_power_of_2(C), _MAX_BLOCK_C)


def _convolve(x, weight, bias, dtype, flip: bool) -> torch.Tensor:
    B, C, H, W = x.shape
    k = weight.shape[-1]
    out = _tensors.empty_activation(x, dtype)
    block_c = _channel_block(C)
    block_w = min(_tensors.next_power_of_2(W), _FWD_BLOCK_W)
    rows = min(_tensors.next_power_of_2(H), _FWD_ROWS)
    grid = (_tensors.cdiv(H, rows) * _tensors.cdiv(W, block_w), _tensors.cdiv(C, block_c), B)
    _dwconv_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        C, H, W, *x.stride(), *out.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, CONV=_tl(dtype), ACC=_acc(dtype),
        ROWS=rows, SLOTS=_tensors.next_power_of_2(k), BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_FWD_WARPS,
    )
    return out


def _forward_kernels(x: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                     dtype: torch.dtype) -> torch.Tensor:
    return _convolve(x, weight, bias, dtype, flip=False)


_forward_op = torch.library.custom_op("liquiddiff::depthwise_conv_forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(x, weight, bias, dtype):
    return _tensors.empty_activation(x, dtype)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """The convolution in ``dtype`` (inputs rounded to it in registers), in x's memory format.
    No autograd: the caller's autograd.Function calls :func:`backward` (recompute.py)."""
    op = _forward_op if _eager.needs_custom_op(x) else _forward_kernels
    return op(x, weight, bias, dtype)


def _weight_grad(grad_out, x, k: int, dtype, need_bias: bool):
    B, C, H, W = x.shape
    taps = _tensors.next_power_of_2(k * k)
    block_c = _channel_block(C)
    block_w = max(1, min(_tensors.next_power_of_2(W), _WGRAD_ELEMENTS // (taps * block_c)))
    others = _tensors.cdiv(W, block_w) * _tensors.cdiv(C, block_c) * B
    # A power of 2 (ROWS is a constexpr: few variants to compile).
    rows = min(_tensors.next_power_of_2(H), _tensors.next_power_of_2(_tensors.cdiv(H * others, _WGRAD_MIN_PROGRAMS)))
    grid = (_tensors.cdiv(H, rows) * _tensors.cdiv(W, block_w), _tensors.cdiv(C, block_c), B)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    part = _tensors.empty_buffer((grid[0], B, taps + 1, C), acc, x.device)
    _dwconv_wgrad_kernel[grid](
        x, grad_out, part, B, C, H, W, *x.stride(), *grad_out.stride(),
        ROWS=rows, K=k, TAPS=taps, NEED_BIAS=need_bias, CONV=_tl(dtype), ACC=_acc(dtype),
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_WGRAD_WARPS,
    )
    # Two fresh reductions (custom-op outputs may not alias), d_w made [C, 1, k, k]-contiguous.
    d_w = part[:, :, : k * k].sum((0, 1)).t().contiguous().view(C, 1, k, k).to(dtype)
    d_b = part[:, :, taps].sum((0, 1)).to(dtype) if need_bias else d_w.new_empty(0)
    return d_w, d_b


def _backward_kernels(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                      needs: typing.Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = weight.shape[-1]
    d_x = _convolve(grad_out, weight, None, dtype, flip=True) if needs[0] else x.new_empty(0, dtype=dtype)
    d_w, d_b = weight.new_empty(0, dtype=dtype), weight.new_empty(0, dtype=dtype)
    if needs[1] or needs[2]:
        d_w, d_b = _weight_grad(grad_out, x, k, dtype, needs[2])
    return d_x, d_w, d_b


_backward_op = torch.library.custom_op("liquiddiff::depthwise_conv_backward", mutates_args=())(_backward_kernels)


@_backward_op.register_fake
def _(grad_out, x, weight, dtype, needs):
    C, k = weight.shape[0], weight.shape[-1]
    return (
        _tensors.empty_activation(grad_out, dtype) if needs[0] else x.new_empty(0, dtype=dtype),
        weight.new_empty((C, 1, k, k) if needs[1] or needs[2] else (0,), dtype=dtype),
        weight.new_empty((C,) if needs[2] else (0,), dtype=dtype),
    )


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
             needs: typing.Sequence[bool]):
    """(d_x, d_weight, d_bias) in ``dtype``, as ``aten.convolution_backward`` returns them for
    the convolution in that dtype; None where ``needs`` (three flags) says so."""
    op = _backward_op if _eager.needs_custom_op(x) else _backward_kernels
    d_x, d_w, d_b = op(grad_out, x, weight, dtype, list(needs))
    return tuple(d if need else None for d, need in zip((d_x, d_w, d_b), needs))

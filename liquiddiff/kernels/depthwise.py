"""Depthwise convolution (odd k x k, 'same' zero padding, stride 1) in Triton: the forward, the
input gradient and the weight and bias gradients of :func:`liquiddiff.functional.depthwise_conv`.

    out[b, c, i, j] = bias[c] + sum_{u, v} w[c, u, v] * x[b, c, i + u - P, j + v - P],  P = k // 2

The input gradient is the same convolution of grad_out with the kernel flipped, so one kernel
serves both. The weight gradient dw[c, u, v] = sum_{b, i, j} grad_out[b, c, i, j] *
x[b, c, i + u - P, j + v - P] (and dbias, the sum of grad_out) leaves each program as fp32
partial sums over its pixels that torch adds up: deterministic, no atomics.

Two heads (the CfC's g and h: two 3x3 kernels over the same backbone activation a = silu(z)) are
one launch each way: the forward reads a once and writes both outputs; the input gradient reads
both heads' grad_out and writes their sum, to which its epilogue adds the gradient a receives
from its other consumers (the f head's 1x1 conv) and applies SiLU's backward, so it writes z's
gradient directly; the weight gradient reads a once for both heads.

The spatial mix's input stage (``input_stage``): the model's fp32 residual stream x, under
autocast, is convolved in bf16 and kept for backward as a bf16 copy, and summed over its pixels
(its context). One launch does all three: the centre tap's load of a strip's own pixels also
writes them, rounded, to the copy and adds them, unrounded, to fp32 per-program partial sums.
Where a cast (read 4 bytes, write 2) and a sum (read 4) ran besides the conv, the conv reads 4
bytes where it read 2 and writes the copy's 2: 6 bytes an element less, and two launches.

Memory moved: the forward reads x and writes out once each: a program walks down a strip of
rows, loads each input row k times (its horizontal shifts, cache hits after the first) and adds
it to the k output rows it feeds (a sliding window; the strip's halo is k - 1 rows and columns).
The input gradient the same; the weight gradient reads x and grad_out once (k*k shifted reads
per row, cache hits) and writes [programs, k*k, C] fp32 partials. The g/h pair's backward,
counted in passes over a bf16 activation: 8 (input gradient: 2 grad_outs, f's gradient, z, d_z;
weight gradient: a and 2 grad_outs), against about 35 for the heads run one by one (two input
and two weight gradients, the fp32 sum of three input gradients, a cast, SiLU's backward).

Layout: a program owns BLOCK_C channels of a strip. In channels_last the channels of a pixel
are one contiguous run, so every load is a vector load; NCHW runs through the same strides
(runs along W), correct but not tuned. Precision: the reference convolves in one dtype (autocast's,
else the promoted one), so x and w are rounded to it in registers (no cast copy in memory), the
products accumulate in fp32 (fp64 for fp64) and the output is stored in that dtype.

Opt-in (runtime.OPT_IN): cuDNN runs these convolutions, which the first GPU report (H100) measured
faster: 3x3 forward+backward 0.58 ms against this kernel's 5.3 ms, 7x7 1.37 against 1.69, at
[8, 64, 256, 256] bf16 (``LIQUIDDIFF_KERNELS=auto,depthwise_conv=triton`` turns it on).
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors

__all__ = ["forward", "input_stage", "backward", "is_depthwise"]

# Tile sizes from the compiler alone (no GPU has run these kernels yet): registers per thread
# and spills of the sm_90 compile of the launches at [8, 64, 256, 256]
# (``python -m benchmarks.kernel_resources``), the same with the GPU image's Triton 3.6 and this
# project's 3.9. Forward / input gradient: strips of 32 rows x 16 columns x 32 channels on 8
# warps, the horizontal taps a runtime loop: 58-64 registers, no spill; the accumulator's slot
# axis lies within each thread, so completing a row is an in-register sum, but each tap's
# [slots, channels] weight tile crosses warps through 1 KB of shared memory. (Unrolled taps
# spilled; an earlier design, one shifted tile load per tap, read the input k*k times from L1
# instead of k.) The g/h pair's forward and input gradient: 80-90 registers. Weight gradient:
# a [taps (padded to a power of 2), W run, 32 channels] product of 2048 elements per launch (one
# pixel per row step for 7x7; the pair halves the W run), 8 warps: 46-48 registers, 61-62 for
# the pair.
_FWD_ROWS, _FWD_BLOCK_W = 32, 16
_MAX_BLOCK_C = 32
_FWD_WARPS = 8
_WGRAD_WARPS = 8
_WGRAD_ELEMENTS = 2048
_WGRAD_MIN_PROGRAMS = 1024


if triton is not None:

    @triton.jit
    def _strip(batch_start, C, W, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
               SPLIT_BATCH: tl.constexpr):
        """This program's strip: batch item (int64, for offsets past 2**31), first row, columns,
        channels and channel mask; WIDE (a batch item of 2**30 elements or more): rows, columns
        and channels int64 too. Grid: (row strips x column runs, channel blocks, batch items from
        batch_start)."""
        tiles_w = tl.cdiv(W, BLOCK_W)
        pid_p = tl.program_id(0)
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ow = (pid_p % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        row0 = (pid_p // tiles_w) * ROWS
        if WIDE:
            cs, ow, row0 = cs.to(tl.int64), ow.to(tl.int64), row0.to(tl.int64)
        return _tensors.batch_item(2, batch_start, SPLIT_BATCH), row0, ow, cs, cs < C

    @triton.jit
    def _dwconv_kernel(
        x_ptr, x2_ptr, w_ptr, w2_ptr, bias_ptr, bias2_ptr, out_ptr, out2_ptr, add_ptr, cadd_ptr, z_ptr,
        copy_ptr, psum_ptr, B, C, H, W,
        sx_b, sx_c, sx_h, sx_w, sx2_b, sx2_c, sx2_h, sx2_w, so_b, so_c, so_h, so_w,
        sa_b, sa_c, sa_h, sa_w, sca_b, sca_c, sz_b, sz_c, sz_h, sz_w, scp_b, scp_c, scp_h, scp_w,
        sw_c, sw_h, sw_w, sw2_c, sw2_h, sw2_w, s_bias, s_bias2, batch_start,
        K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
        PAIR_OUT: tl.constexpr, PAIR_IN: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_CHANNEL_ADDEND: tl.constexpr,
        SILU_GRAD: tl.constexpr, COPY: tl.constexpr, PIXEL_SUM: tl.constexpr,
        CONV: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr,
        ROWS: tl.constexpr, SLOTS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Sliding window down a [ROWS, BLOCK_W] strip: each input row is loaded once per
        # horizontal tap (K loads, not K*K) and added to the K output rows it feeds, which live
        # in SLOTS (>= K, a power of 2) accumulator rows: output row o in slot o % SLOTS. When
        # input row r is in, output row r - P is complete and stored. A slot is cleared when its
        # row's window opens (input row o - P), not when its last row was stored: the rows between
        # meet it with weight 0, and 0 * inf or NaN must not reach a row those rows do not feed.
        # PAIR_OUT: a second kernel (w2, bias2 if HAS_BIAS2) on the same input rows, into out2 (the forward
        # of two heads). PAIR_IN: a second input x2 with its kernel w2, summed into out (their
        # input gradient). Epilogue at the store: + addend (+ a per-(b, c) channel addend, unrounded
        # unlike the bias), then times SiLU'(z). COPY / PIXEL_SUM (the spatial mix's input): the
        # centre tap's load of the strip's own pixels also writes x rounded to CONV into copy
        # (what backward keeps) / adds x, unrounded, to this program's per-channel partial sums.
        P: tl.constexpr = K // 2
        pid_b, row0, ow, cs, c_mask = _strip(batch_start, C, W, ROWS, BLOCK_W, BLOCK_C, WIDE, SPLIT_BATCH)
        slots = tl.arange(0, SLOTS)
        x_base = x_ptr + pid_b * sx_b + cs[None, :] * sx_c
        x2_base = x2_ptr + pid_b * sx2_b + cs[None, :] * sx2_c
        o_off = pid_b * so_b + cs[None, :] * so_c + ow[:, None] * so_w
        w_base = w_ptr + cs[None, :] * sw_c
        w2_base = w2_ptr + cs[None, :] * sw2_c
        store_cols = (ow < W)[:, None] & c_mask[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs * s_bias, mask=c_mask, other=0.0).to(CONV).to(ACC)
        if HAS_BIAS2:
            bias2 = tl.load(bias2_ptr + cs * s_bias2, mask=c_mask, other=0.0).to(CONV).to(ACC)
        if HAS_CHANNEL_ADDEND:
            cadd = tl.load(cadd_ptr + pid_b * sca_b + cs * sca_c, mask=c_mask, other=0.0).to(ACC)
        acc = tl.zeros([SLOTS, BLOCK_W, BLOCK_C], dtype=ACC)
        acc2 = tl.zeros([SLOTS, BLOCK_W, BLOCK_C], dtype=ACC)  # PAIR_OUT only (else folded away)
        psum = tl.zeros([BLOCK_C], dtype=ACC)  # PIXEL_SUM only
        for i in range(ROWS + K - 1):
            r = row0 - P + i  # the input row this step reads
            # Vectors, not scalars: the interpreter rejects a scalar mask & a tensor mask.
            row_ok = ((ow * 0 + r) >= 0) & ((ow * 0 + r) < H)
            # Slot s holds the output row o = s (mod SLOTS) of the window [r - P, r - P + SLOTS);
            # input row r reaches it through the kernel row u = r + P - o (when 0 <= u < K).
            u = K - 1 - ((slots - (r - P)) & (SLOTS - 1))
            u_ok = (u >= 0)[:, None] & c_mask[None, :]
            opens = (slots == ((r + P) & (SLOTS - 1)))[:, None, None]  # output row r + P's window
            acc = tl.where(opens, 0.0, acc)
            if PAIR_OUT:
                acc2 = tl.where(opens, 0.0, acc2)
            if FLIP:
                u = K - 1 - u
            for v in range(K):  # a runtime loop: unrolled taps keep too many loads live
                iw = ow + (v - P)
                ok = (row_ok & (iw >= 0) & (iw < W))[:, None] & c_mask[None, :]
                wv_col = (K - 1 - v) if FLIP else v
                x_raw = tl.load(x_base + r * sx_h + iw[:, None] * sx_w, mask=ok, other=0.0)
                xv = x_raw.to(CONV).to(ACC)
                if COPY or PIXEL_SUM:
                    if v == P:  # the strip's own pixels of row r, each once
                        own = ok & ((ow * 0 + r) >= row0)[:, None] & ((ow * 0 + r) < row0 + ROWS)[:, None]
                        if COPY:
                            tl.store(copy_ptr + pid_b * scp_b + cs[None, :] * scp_c + r * scp_h + ow[:, None] * scp_w,
                                     x_raw.to(CONV), mask=own)
                        if PIXEL_SUM:
                            psum += tl.sum(tl.where(own, x_raw.to(ACC), 0.0), axis=0)
                wt = tl.load(w_base + u[:, None] * sw_h + wv_col * sw_w, mask=u_ok, other=0.0)
                acc += wt.to(CONV).to(ACC)[:, None, :] * xv[None, :, :]
                if PAIR_OUT or PAIR_IN:
                    wt2 = tl.load(w2_base + u[:, None] * sw2_h + wv_col * sw2_w, mask=u_ok, other=0.0)
                    wt2 = wt2.to(CONV).to(ACC)[:, None, :]
                    if PAIR_IN:
                        xv2 = tl.load(x2_base + r * sx2_h + iw[:, None] * sx2_w, mask=ok, other=0.0)
                        acc += wt2 * xv2.to(CONV).to(ACC)[None, :, :]
                    else:
                        acc2 += wt2 * xv[None, :, :]
            o = r - P  # complete now
            done = (slots == (o & (SLOTS - 1)))[:, None, None]
            o_vec = ow * 0 + o
            keep = (o_vec >= row0) & (o_vec < row0 + ROWS) & (o_vec < H)
            mask = store_cols & keep[:, None]
            out = tl.sum(tl.where(done, acc, 0.0), axis=0)
            if HAS_BIAS:
                out += bias[None, :]
            if HAS_CHANNEL_ADDEND:
                out += cadd[None, :]
            if HAS_ADDEND:
                out += tl.load(add_ptr + pid_b * sa_b + cs[None, :] * sa_c + o * sa_h + ow[:, None] * sa_w,
                               mask=mask, other=0.0).to(ACC)
            if SILU_GRAD:  # d silu(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
                zv = tl.load(z_ptr + pid_b * sz_b + cs[None, :] * sz_c + o * sz_h + ow[:, None] * sz_w,
                             mask=mask, other=0.0).to(ACC)
                sig = 1.0 / (1.0 + tl.exp(-zv))
                out = out * (sig * (1.0 + zv * (1.0 - sig)))
            tl.store(out_ptr + o_off + o * so_h, out.to(out_ptr.dtype.element_ty), mask=mask)
            if PAIR_OUT:
                out2 = tl.sum(tl.where(done, acc2, 0.0), axis=0)
                if HAS_BIAS2:
                    out2 += bias2[None, :]
                tl.store(out2_ptr + o_off + o * so_h, out2.to(out2_ptr.dtype.element_ty), mask=mask)
        if PIXEL_SUM:  # partials [programs along the pixels, B, C]
            tl.store(psum_ptr + (tl.program_id(0) * B + pid_b) * C + cs, psum, mask=c_mask)


    @triton.jit
    def _dwconv_wgrad_kernel(
        x_ptr, go_ptr, go2_ptr, part_ptr,
        B, C, H, W,
        sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, sg2_b, sg2_c, sg2_h, sg2_w, batch_start,
        # constexpr: Triton 3.6's interpreter cannot loop over a runtime int (with NumPy 2).
        ROWS: tl.constexpr, K: tl.constexpr, TAPS: tl.constexpr, NEED_BIAS: tl.constexpr, HEADS: tl.constexpr,
        CONV: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # Program (row chunk, W run) x channel block x batch item. The k*k taps are the first
        # axis of one [TAPS, BLOCK_W, BLOCK_C] product, so a row costs one gather load and one
        # reduction over the W run, not k*k of each. HEADS == 2: a second head's grad_out (go2)
        # on the same input, whose x loads both heads share.
        pid_b, row0, ow, cs, c_mask = _strip(batch_start, C, W, ROWS, BLOCK_W, BLOCK_C, WIDE, SPLIT_BATCH)
        taps = tl.arange(0, TAPS)
        du = (taps // K - K // 2)[:, None, None]
        dv = (taps % K - K // 2)[:, None, None]
        iw = ow[None, :, None] + dv
        # Lanes past the image's edge load nothing: 0 * an inf there would poison a tap's sum.
        col_ok = ((taps < K * K)[:, None, None] & (iw >= 0) & (iw < W) & (ow < W)[None, :, None]
                  & c_mask[None, None, :])
        x_base = x_ptr + pid_b * sx_b + cs[None, None, :] * sx_c + iw * sx_w
        g_base = go_ptr + pid_b * sg_b + cs[None, :] * sg_c + ow[:, None] * sg_w
        g2_base = go2_ptr + pid_b * sg2_b + cs[None, :] * sg2_c + ow[:, None] * sg2_w
        g_mask = (ow < W)[:, None] & c_mask[None, :]
        acc = tl.zeros([TAPS, BLOCK_C], dtype=ACC)
        acc2 = tl.zeros([TAPS, BLOCK_C], dtype=ACC)  # HEADS == 2 only (else folded away)
        acc_bias = tl.zeros([BLOCK_C], dtype=ACC)
        acc_bias2 = tl.zeros([BLOCK_C], dtype=ACC)
        for r in range(ROWS):
            oh = row0 + r
            # A vector, not a scalar: the interpreter rejects a scalar mask & a tensor mask.
            row_ok = (ow * 0 + oh) < H
            ih = oh + du
            x_ok = col_ok & (ih >= 0) & (ih < H) & row_ok[None, :, None]
            xv = tl.load(x_base + ih * sx_h, mask=x_ok, other=0.0).to(CONV).to(ACC)
            go = tl.load(g_base + oh * sg_h, mask=g_mask & row_ok[:, None], other=0.0).to(CONV).to(ACC)
            acc += tl.sum(xv * go[None, :, :], axis=1)
            if NEED_BIAS:
                acc_bias += tl.sum(go, axis=0)
            if HEADS == 2:
                go2 = tl.load(g2_base + oh * sg2_h, mask=g_mask & row_ok[:, None], other=0.0).to(CONV).to(ACC)
                acc2 += tl.sum(xv * go2[None, :, :], axis=1)
                if NEED_BIAS:
                    acc_bias2 += tl.sum(go2, axis=0)
        # partials: [programs over pixels, B, heads, TAPS + 1, C]; the last tap row holds dbias.
        part = part_ptr + ((tl.program_id(0) * B + pid_b) * HEADS * (TAPS + 1)) * C
        tap_mask = (taps < K * K)[:, None] & c_mask[None, :]
        tl.store(part + taps[:, None] * C + cs[None, :], acc, mask=tap_mask)
        if NEED_BIAS:
            tl.store(part + TAPS * C + cs, acc_bias, mask=c_mask)
        if HEADS == 2:
            part2 = part + (TAPS + 1) * C
            tl.store(part2 + taps[:, None] * C + cs[None, :], acc2, mask=tap_mask)
            if NEED_BIAS:
                tl.store(part2 + TAPS * C + cs, acc_bias2, mask=c_mask)


def is_depthwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """A convolution these kernels compute: one channel per group, odd square k > 1."""
    k = weight.shape[-1]
    return (groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1
            and weight.shape[-2] == k and k > 1 and k % 2 == 1)


def _check_heads(weights: typing.Sequence[torch.Tensor], per_head: typing.Sequence, name: str) -> None:
    """One or two heads, the second with the first's weight shape (one launch serves both)."""
    if not 1 <= len(weights) <= 2 or any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"weights: expected one or two depthwise weights of one shape, got "
                         f"{[tuple(w.shape) for w in weights]}")
    if len(per_head) != len(weights):
        raise ValueError(f"{name}: expected one per weight ({len(weights)}), got {len(per_head)}")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _channel_block(C: int) -> int:
    return min(_tensors.next_power_of_2(C), _MAX_BLOCK_C)


def _convolve(xs, weights, biases, dtype, flip: bool, out_dtype=None, addend=None, silu_input=None,
              channel_addend=None, copy=None, pixel_sums=False):
    """One launch of the sliding-window kernel. ``xs``: one input, or two (their convolutions
    summed, ``flip``: the input gradient); ``weights``: one or two (with one input: one output
    each). Epilogue: + ``channel_addend`` ([B, C]) + ``addend``, then times SiLU'(``silu_input``).
    ``copy``: a tensor of x's shape that gets x in its dtype (rounded in registers);
    ``pixel_sums``: the partial sums of x over pixels too. Returns the outputs (then the
    partials, [programs, B, C] in fp32 or fp64, when asked)."""
    x = xs[0]
    B, C, H, W = x.shape
    k = weights[0].shape[-1]
    pair_in, pair_out = len(xs) == 2, len(xs) == 1 and len(weights) == 2
    outs = [_tensors.empty_activation(x, out_dtype or dtype) for _ in range(2 if pair_out else 1)]
    block_c = _channel_block(C)
    block_w = min(_tensors.next_power_of_2(W), _FWD_BLOCK_W)
    rows = min(_tensors.next_power_of_2(H), _FWD_ROWS)
    strips = _tensors.cdiv(H, rows) * _tensors.cdiv(W, block_w)
    # Unused pointers and strides (an absent second head, addend or silu_input) repeat the first.
    x2, w2 = xs[-1], weights[-1]
    bias, bias2 = biases[0], biases[-1] if pair_out else None
    add, z = (addend if addend is not None else x), (silu_input if silu_input is not None else x)
    cadd, cadd_strides = (x, (0, 0)) if channel_addend is None else (channel_addend, channel_addend.stride())
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    partials = _tensors.empty_buffer((strips, B, C), part_dtype, x.device) if pixel_sums else x
    copy_to = x if copy is None else copy
    _tensors.launch_over_batch(
        _dwconv_kernel, (strips, _tensors.cdiv(C, block_c)), B,
        x, x2, weights[0], w2, w2 if bias is None else bias, w2 if bias2 is None else bias2, outs[0], outs[-1],
        add, cadd, z, copy_to, partials, B, C, H, W, *x.stride(), *x2.stride(), *outs[0].stride(),
        *add.stride(), *cadd_strides, *z.stride(), *copy_to.stride(),
        weights[0].stride(0), weights[0].stride(2), weights[0].stride(3), w2.stride(0), w2.stride(2), w2.stride(3),
        *(0 if b is None else b.stride(0) for b in (bias, bias2)),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None, PAIR_OUT=pair_out,
        PAIR_IN=pair_in, HAS_ADDEND=addend is not None, HAS_CHANNEL_ADDEND=channel_addend is not None,
        SILU_GRAD=silu_input is not None, COPY=copy is not None, PIXEL_SUM=pixel_sums,
        CONV=_tensors.tl_dtype(dtype), ACC=_acc(dtype), WIDE=_tensors.wide_offsets(x, x2, *outs, add, z, copy_to),
        ROWS=rows, SLOTS=_tensors.next_power_of_2(k), BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_FWD_WARPS,
        **_tensors.COMPILE_OPTIONS,
    )
    return outs + [partials] if pixel_sums else outs


@_tensors.launches_on_input_device
def _forward_kernels(x: torch.Tensor, weights: typing.Sequence[torch.Tensor],
                     biases: typing.Sequence[typing.Optional[torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor]:
    return _convolve([x], weights, biases, dtype, flip=False)


_forward_op = torch.library.custom_op("liquiddiff::depthwise_conv_forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(x, weights, biases, dtype):
    return [_tensors.empty_activation(x, dtype) for _ in weights]


def forward(x: torch.Tensor, weights: typing.Sequence[torch.Tensor],
            biases: typing.Sequence[typing.Optional[torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor]:
    """The convolution of ``x`` with each of one or two weights (the CfC's g and h heads: one
    launch, x read once), in ``dtype`` (inputs rounded to it in registers), in x's memory
    format. No autograd: the caller's autograd.Function calls :func:`backward` (recompute.py)."""
    _check_heads(weights, biases, "biases")
    op = _forward_op if _eager.needs_custom_op(x) else _forward_kernels
    return op(x, weights, biases, dtype)


@_tensors.launches_on_input_device
def _input_stage_kernels(x: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    copy = _tensors.empty_activation(x, dtype)
    out, partials = _convolve([x], [weight], [bias], dtype, flip=False, out_dtype=dtype, copy=copy, pixel_sums=True)
    # Fresh tensors (custom-op outputs may not alias): the sum, in x's dtype as x.sum would give.
    return out, copy, partials.sum(0).to(x.dtype)


_input_stage_op = torch.library.custom_op("liquiddiff::depthwise_conv_input_stage", mutates_args=())(
    _input_stage_kernels)


@_input_stage_op.register_fake
def _(x, weight, bias, dtype):
    return _tensors.empty_activation(x, dtype), _tensors.empty_activation(x, dtype), x.new_empty(x.shape[:2])


def input_stage(x: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv(x), x in ``dtype``, x summed over its pixels) in one pass over an fp32 x: the spatial
    mix's input stage (recompute.py), where x was cast to ``dtype`` (the copy backward keeps)
    and summed (its context) by two more passes. The sum in x's dtype, from fp32 per-program
    partials. No autograd: the caller makes the backward."""
    op = _input_stage_op if _eager.needs_custom_op(x) else _input_stage_kernels
    return op(x, weight, bias, dtype)


def _weight_grads(grad_outs, x, k: int, dtype, need_bias: bool):
    """(d_ws, d_bs), one per head, from one launch that reads x once for both heads."""
    B, C, H, W = x.shape
    heads = len(grad_outs)
    taps = _tensors.next_power_of_2(k * k)
    block_c = _channel_block(C)
    block_w = max(1, min(_tensors.next_power_of_2(W), _WGRAD_ELEMENTS // (taps * block_c * heads)))
    others = _tensors.cdiv(W, block_w) * _tensors.cdiv(C, block_c) * B
    # A power of 2 (ROWS is a constexpr: few variants to compile).
    rows = min(_tensors.next_power_of_2(H), _tensors.next_power_of_2(_tensors.cdiv(H * others, _WGRAD_MIN_PROGRAMS)))
    strips = _tensors.cdiv(H, rows) * _tensors.cdiv(W, block_w)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    part = _tensors.empty_buffer((strips, B, heads, taps + 1, C), acc, x.device)
    _tensors.launch_over_batch(
        _dwconv_wgrad_kernel, (strips, _tensors.cdiv(C, block_c)), B,
        x, grad_outs[0], grad_outs[-1], part, B, C, H, W,
        *x.stride(), *grad_outs[0].stride(), *grad_outs[-1].stride(),
        ROWS=rows, K=k, TAPS=taps, NEED_BIAS=need_bias, HEADS=heads, CONV=_tensors.tl_dtype(dtype),
        ACC=_acc(dtype), WIDE=_tensors.wide_offsets(x, *grad_outs), BLOCK_W=block_w, BLOCK_C=block_c,
        num_warps=_WGRAD_WARPS, **_tensors.COMPILE_OPTIONS,
    )
    # Fresh reductions per output (custom-op outputs may not alias), d_w made [C, 1, k, k]-contiguous.
    d_ws = [part[:, :, i, : k * k].sum((0, 1)).t().contiguous().view(C, 1, k, k).to(dtype) for i in range(heads)]
    d_bs = [part[:, :, i, taps].sum((0, 1)).to(dtype) if need_bias else part.new_empty(0, dtype=dtype)
            for i in range(heads)]
    return d_ws, d_bs


def _input_grad_dtype(dtype, silu_input, addends) -> torch.dtype:
    """d_x's dtype: silu_input's (it is that tensor's gradient), else the widest of the conv's and
    the addends' (a sum of x's gradients, as autograd would form it in x's dtype)."""
    if silu_input is not None:
        return silu_input.dtype
    for addend in addends:
        if addend is not None:
            dtype = torch.promote_types(dtype, addend.dtype)
    return dtype


@_tensors.launches_on_input_device
def _backward_kernels(grad_outs: typing.Sequence[torch.Tensor], x: torch.Tensor,
                      weights: typing.Sequence[torch.Tensor], dtype: torch.dtype, needs: typing.Sequence[bool],
                      silu_input: typing.Optional[torch.Tensor], addend: typing.Optional[torch.Tensor],
                      channel_addend: typing.Optional[torch.Tensor]) -> list[torch.Tensor]:
    k = weights[0].shape[-1]
    d_x = x.new_empty(0, dtype=dtype)
    if needs[0]:
        out_dtype = _input_grad_dtype(dtype, silu_input, (addend, channel_addend))
        d_x = _convolve(grad_outs, weights, [None], dtype, True, out_dtype, addend, silu_input, channel_addend)[0]
    d_ws = [weights[0].new_empty(0, dtype=dtype) for _ in weights]  # outputs may not alias
    d_bs = [weights[0].new_empty(0, dtype=dtype) for _ in weights]
    if needs[1] or needs[2]:
        d_ws, d_bs = _weight_grads(grad_outs, x, k, dtype, needs[2])
    return [d_x, *d_ws, *d_bs]


_backward_op = torch.library.custom_op("liquiddiff::depthwise_conv_backward", mutates_args=())(_backward_kernels)


@_backward_op.register_fake
def _(grad_outs, x, weights, dtype, needs, silu_input, addend, channel_addend):
    C, k = weights[0].shape[0], weights[0].shape[-1]
    d_x = x.new_empty(0, dtype=dtype)
    if needs[0]:
        d_x = _tensors.empty_activation(grad_outs[0], _input_grad_dtype(dtype, silu_input, (addend, channel_addend)))
    d_ws = [weights[0].new_empty((C, 1, k, k) if needs[1] or needs[2] else (0,), dtype=dtype) for _ in weights]
    d_bs = [weights[0].new_empty((C,) if needs[2] else (0,), dtype=dtype) for _ in weights]
    return [d_x, *d_ws, *d_bs]


def backward(grad_outs: typing.Sequence[torch.Tensor], x: torch.Tensor, weights: typing.Sequence[torch.Tensor],
             dtype: torch.dtype, needs: typing.Sequence[bool], silu_input: typing.Optional[torch.Tensor] = None,
             addend: typing.Optional[torch.Tensor] = None, channel_addend: typing.Optional[torch.Tensor] = None):
    """``(d_x, d_weights, d_biases)`` of :func:`forward` for its heads' ``grad_outs``, in ``dtype``
    as ``aten.convolution_backward`` returns them for the convolution in that dtype; None where
    ``needs`` (three flags, for all heads) says so. d_x sums the heads' input gradients (one
    launch) and, given them, adds ``addend`` and ``channel_addend`` ([B, C], broadcast over the
    pixels): x's gradient from its other consumers; then applies SiLU's backward for
    ``x = silu(silu_input)``: then it is ``silu_input``'s gradient, in its dtype; without
    ``silu_input``, d_x is in the widest of ``dtype`` and the addends' dtypes (an fp32 input's
    summed gradient stays fp32)."""
    _check_heads(weights, grad_outs, "grad_outs")
    op = _backward_op if _eager.needs_custom_op(x) else _backward_kernels
    d_x, *rest = op(grad_outs, x, weights, dtype, list(needs), silu_input, addend, channel_addend)
    heads = len(weights)
    d_ws, d_bs = rest[:heads], rest[heads:]
    return (d_x if needs[0] else None, d_ws if needs[1] else [None] * heads, d_bs if needs[2] else [None] * heads)

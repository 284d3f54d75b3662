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

Memory moved: the forward reads x and writes out once each from DRAM. A program owns a tile of
TILE_H rows x TILE_W columns x BLOCK_C channels as row pairs (a thread holds the same pixels of
two adjacent rows): each of a pair's K + 1 input rows is loaded once per horizontal tap and
feeds both rows, K*(K + 1) loads for 2*K*K multiply-adds, where a row alone takes a load per
multiply-add (all but the first L1 or L2 hits; the tile's halo, K - 1 rows and columns, is read
from DRAM by its neighbours too). The input gradient the same; the weight gradient reads x and
grad_out once (k*k shifted reads per row, cache hits) and writes [programs, k*k, C] fp32
partials. The g/h pair's backward, counted in passes over a bf16 activation: 8 (input gradient:
2 grad_outs, f's gradient, z, d_z; weight gradient: a and 2 grad_outs), against about 35 for the
heads run one by one (two input and two weight gradients, the fp32 sum of three input
gradients, a cast, SiLU's backward).

Layout: in channels_last the channels of a pixel are one contiguous run, so every load is a
vector load; NCHW runs through the same strides (runs along W), correct but not tuned. The
weights are read as [k, k, C] in fp32 (``_taps_by_channel``, a copy of C*k*k elements per
call), so that a tap's channels are one vector load too, with no conversion and no mask.
Precision: the reference convolves in one dtype (autocast's, else the promoted one): the public
functions cast an input in another dtype (the model's fp32 stream under autocast) by one pass,
as autocast does, since a rounding in registers would be one conversion per tap (49 per element
for a 7x7, on a GPU's slow conversion unit); the products accumulate in fp32 (fp64 for fp64)
and the output is stored in that dtype.

Opt-in (runtime.OPT_IN): cuDNN runs these convolutions, which the GPU reports (H100) measured
faster than this file's earlier design (strips with a sliding window of accumulator rows, a
per-row sum in the weight gradient): 3x3 forward+backward 0.58 ms against 5.3 ms, 7x7 1.37
against 1.69, at [8, 64, 256, 256] bf16. The tile kernel has not been timed on a GPU yet
(``LIQUIDDIFF_KERNELS=auto,depthwise_conv=triton`` turns it on).
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

# Tile sizes from the compiler alone (no GPU has timed the tile kernel yet; the strip design
# before it measured 0.47 ms for the 7x7 forward at [8, 64, 256, 256], cuDNN 0.32): registers per
# thread and spills of the sm_90 compile of the launches at that size
# (``python -m benchmarks.kernel_resources``) with the GPU image's Triton 3.6 and this project's
# 3.9, and the instructions of the compiled tap loop (its ``--loops``). Forward / input
# gradient: tiles of 16 rows (8 row pairs) x 16 columns x 32 channels on 8 warps, 16 elements of
# each of the pair's rows a thread, taps in runtime loops (unrolled ones keep too many loads
# live): 80-104 registers, no spill, no shared memory in the forward; per input row, tap and
# thread two 16-byte loads of x, four of the two rows' weights and 32 FMAs, 89 instructions in
# all (a row alone took 75 for 16 FMAs, half of them widening, masking and addressing its
# loads). The g/h pair (two heads or two inputs): a quarter of the rows, 79-120 registers.
# Weight gradient: a [taps (padded to a power of 2), W run, 32 channels] product of 2048
# elements per row step (one pixel for 7x7; the pair halves the W run), 8 warps: 40-48
# registers, 60-61 for the pair; its sum over the W run after the rows.
_FWD_TILE_H, _FWD_TILE_W = 16, 16
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
    def _pixel_tile(batch_start, C, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
                    WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr):
        """This program's tile of TILE_H rows x TILE_W columns, as TILE_H / 2 row pairs: batch
        item (int64), each pair's first row and its column, flattened; channels and channel
        mask; WIDE: rows, columns and channels int64 too. Grid: (pixel tiles, channel blocks,
        batch items from batch_start)."""
        tiles_w = tl.cdiv(W, TILE_W)
        pid_p = tl.program_id(0)
        p = tl.arange(0, TILE_H // 2 * TILE_W)
        oh = (pid_p // tiles_w) * TILE_H + 2 * (p // TILE_W)
        ow = (pid_p % tiles_w) * TILE_W + p % TILE_W
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if WIDE:
            oh, ow, cs = oh.to(tl.int64), ow.to(tl.int64), cs.to(tl.int64)
        return _tensors.batch_item(2, batch_start, SPLIT_BATCH), oh, ow, cs, cs < C

    @triton.jit
    def _tap(acc, acc2, xv, xv2, w_ptrs, w2_ptrs, PAIR_OUT: tl.constexpr, PAIR_IN: tl.constexpr):
        """One tap's loads times its weights (one vector load each: [K, K, C], no mask) into one
        row of the pairs: acc (and acc2, PAIR_OUT's second kernel; PAIR_IN: x2's, into acc)."""
        acc += tl.load(w_ptrs)[None, :] * xv
        if PAIR_OUT or PAIR_IN:
            w2 = tl.load(w2_ptrs)[None, :]
            if PAIR_IN:
                acc += w2 * xv2
            else:
                acc2 += w2 * xv
        return acc, acc2

    @triton.jit
    def _input_row(acc_a, acc2_a, acc_b, acc2_b, x_base, x2_base, w_base, w2_base, ih, ow, c_mask, H, W,
                   sx_h, sx_w, sx2_h, sx2_w, sw_h, sw_w, sw2_h, sw2_w, u_a, u_b,
                   K: tl.constexpr, FLIP: tl.constexpr, PAIR_OUT: tl.constexpr, PAIR_IN: tl.constexpr,
                   FEED_A: tl.constexpr, FEED_B: tl.constexpr, CONV: tl.constexpr, ACC: tl.constexpr):
        """One input row's K taps: each load of the row shifted by a tap, rounded and widened
        once, feeds the first rows of the pairs (FEED_A, kernel row u_a) and the second ones
        (FEED_B, kernel row u_b). PAIR_OUT: a second kernel on the same loads, into acc2;
        PAIR_IN: a second input x2 with its kernel, summed into acc."""
        row_ok = (ih >= 0) & (ih < H)
        for v in range(K):  # a runtime loop: unrolled taps keep too many loads live (spills)
            iw = ow + (v - K // 2)
            ok = (row_ok & (iw >= 0) & (iw < W))[:, None] & c_mask[None, :]
            w_col = (K - 1 - v) if FLIP else v
            xv = tl.load(x_base + ih[:, None] * sx_h + iw[:, None] * sx_w, mask=ok, other=0.0).to(CONV).to(ACC)
            xv2 = xv  # PAIR_IN's second input, else unused
            if PAIR_IN:
                xv2 = tl.load(x2_base + ih[:, None] * sx2_h + iw[:, None] * sx2_w, mask=ok, other=0.0)
                xv2 = xv2.to(CONV).to(ACC)
            if FEED_A:
                acc_a, acc2_a = _tap(acc_a, acc2_a, xv, xv2, w_base + u_a * sw_h + w_col * sw_w,
                                     w2_base + u_a * sw2_h + w_col * sw2_w, PAIR_OUT, PAIR_IN)
            if FEED_B:
                acc_b, acc2_b = _tap(acc_b, acc2_b, xv, xv2, w_base + u_b * sw_h + w_col * sw_w,
                                     w2_base + u_b * sw2_h + w_col * sw2_w, PAIR_OUT, PAIR_IN)
        return acc_a, acc2_a, acc_b, acc2_b

    @triton.jit
    def _store_rows(acc, acc2, oh, ow, cs, c_mask, pid_b, H, W, bias, bias2, cadd, out_ptr, out2_ptr, add_ptr, z_ptr,
                    so_b, so_c, so_h, so_w, sa_b, sa_c, sa_h, sa_w, sz_b, sz_c, sz_h, sz_w,
                    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, PAIR_OUT: tl.constexpr, HAS_ADDEND: tl.constexpr,
                    HAS_CHANNEL_ADDEND: tl.constexpr, SILU_GRAD: tl.constexpr, ACC: tl.constexpr):
        """The epilogue of one row of each pair (rows oh): + bias, + channel addend (unrounded),
        + addend, then times SiLU'(z); the second head's output with its bias (PAIR_OUT)."""
        mask = ((oh < H) & (ow < W))[:, None] & c_mask[None, :]
        out = acc
        if HAS_BIAS:
            out += bias[None, :]
        if HAS_CHANNEL_ADDEND:
            out += cadd[None, :]
        if HAS_ADDEND:
            out += tl.load(add_ptr + pid_b * sa_b + cs[None, :] * sa_c + oh[:, None] * sa_h + ow[:, None] * sa_w,
                           mask=mask, other=0.0).to(ACC)
        if SILU_GRAD:  # d silu(z) / dz = sig(z) * (1 + z * (1 - sig(z)))
            zv = tl.load(z_ptr + pid_b * sz_b + cs[None, :] * sz_c + oh[:, None] * sz_h + ow[:, None] * sz_w,
                         mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-zv))
            out = out * (sig * (1.0 + zv * (1.0 - sig)))
        o_off = pid_b * so_b + cs[None, :] * so_c + oh[:, None] * so_h + ow[:, None] * so_w
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)
        if PAIR_OUT:
            out2 = acc2
            if HAS_BIAS2:
                out2 += bias2[None, :]
            tl.store(out2_ptr + o_off, out2.to(out2_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dwconv_kernel(
        x_ptr, x2_ptr, w_ptr, w2_ptr, bias_ptr, bias2_ptr, out_ptr, out2_ptr, add_ptr, cadd_ptr, z_ptr,
        B, C, H, W,
        sx_b, sx_c, sx_h, sx_w, sx2_b, sx2_c, sx2_h, sx2_w, so_b, so_c, so_h, so_w,
        sa_b, sa_c, sa_h, sa_w, sca_b, sca_c, sz_b, sz_c, sz_h, sz_w,
        sw_c, sw_h, sw_w, sw2_c, sw2_h, sw2_w, s_bias, s_bias2, batch_start,
        K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
        PAIR_OUT: tl.constexpr, PAIR_IN: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_CHANNEL_ADDEND: tl.constexpr,
        SILU_GRAD: tl.constexpr, CONV: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # A thread owns the same pixels of two adjacent output rows (a row pair), so each load
        # of an input row shifted by a tap, [pixels, channels] (in channels_last a vector load
        # per thread; the tile's halo and the other taps' loads are L1 and L2 hits), is rounded,
        # widened and masked once for both rows: the K + 1 input rows of a pair are K*(K + 1)
        # loads for 2*K*K FMAs per element, where a row alone took one load per FMA. The weights
        # (one vector load per tap: [K, K, C], rounded to CONV and held in ACC) accumulate in
        # fp32: no shared memory, no barrier, and each output meets exactly its own window, as
        # in the reference (a NaN or inf meets only the outputs it feeds). x and x2 come in CONV
        # from the public functions (rounded here otherwise). PAIR_OUT: a second kernel (w2,
        # bias2 if HAS_BIAS2) on the same loads, into out2 (the forward of two heads). PAIR_IN:
        # a second input x2 with its kernel w2, summed into out (their input gradient).
        # Epilogue: + bias (rounded to CONV, as the reference's), + addend (+ a per-(b, c)
        # channel addend, unrounded), then times SiLU'(z).
        P: tl.constexpr = K // 2
        pid_b, oh, ow, cs, c_mask = _pixel_tile(batch_start, C, W, TILE_H, TILE_W, BLOCK_C, WIDE, SPLIT_BATCH)
        x_base = x_ptr + pid_b * sx_b + cs[None, :] * sx_c
        x2_base = x2_ptr + pid_b * sx2_b + cs[None, :] * sx2_c
        w_base = w_ptr + cs * sw_c
        w2_base = w2_ptr + cs * sw2_c
        acc_a = tl.zeros([TILE_H // 2 * TILE_W, BLOCK_C], dtype=ACC)
        acc_b = tl.zeros([TILE_H // 2 * TILE_W, BLOCK_C], dtype=ACC)
        acc2_a = tl.zeros([TILE_H // 2 * TILE_W, BLOCK_C], dtype=ACC)  # PAIR_OUT only (else folded away)
        acc2_b = tl.zeros([TILE_H // 2 * TILE_W, BLOCK_C], dtype=ACC)
        # Input row oh - P + i feeds the pair's first row through kernel row i (i < K) and its
        # second through kernel row i - 1 (i >= 1): the first and last input rows feed one row.
        acc_a, acc2_a, acc_b, acc2_b = _input_row(
            acc_a, acc2_a, acc_b, acc2_b, x_base, x2_base, w_base, w2_base, oh - P, ow, c_mask, H, W,
            sx_h, sx_w, sx2_h, sx2_w, sw_h, sw_w, sw2_h, sw2_w, (K - 1) if FLIP else 0, 0,
            K, FLIP, PAIR_OUT, PAIR_IN, True, False, CONV, ACC)
        for i in range(1, K):
            acc_a, acc2_a, acc_b, acc2_b = _input_row(
                acc_a, acc2_a, acc_b, acc2_b, x_base, x2_base, w_base, w2_base, oh - P + i, ow, c_mask, H, W,
                sx_h, sx_w, sx2_h, sx2_w, sw_h, sw_w, sw2_h, sw2_w, (K - 1 - i) if FLIP else i,
                (K - i) if FLIP else (i - 1), K, FLIP, PAIR_OUT, PAIR_IN, True, True, CONV, ACC)
        acc_a, acc2_a, acc_b, acc2_b = _input_row(
            acc_a, acc2_a, acc_b, acc2_b, x_base, x2_base, w_base, w2_base, oh - P + K, ow, c_mask, H, W,
            sx_h, sx_w, sx2_h, sx2_w, sw_h, sw_w, sw2_h, sw2_w, 0, 0 if FLIP else (K - 1),
            K, FLIP, PAIR_OUT, PAIR_IN, False, True, CONV, ACC)
        bias = tl.load(bias_ptr + cs * s_bias, mask=c_mask, other=0.0).to(CONV).to(ACC) if HAS_BIAS else 0.0
        bias2 = tl.load(bias2_ptr + cs * s_bias2, mask=c_mask, other=0.0).to(CONV).to(ACC) if HAS_BIAS2 else 0.0
        cadd = tl.load(cadd_ptr + pid_b * sca_b + cs * sca_c, mask=c_mask, other=0.0).to(ACC) if HAS_CHANNEL_ADDEND else 0.0
        for r in tl.static_range(2):
            _store_rows(acc_b if r else acc_a, acc2_b if r else acc2_a, oh + r, ow, cs, c_mask, pid_b, H, W,
                        bias, bias2, cadd, out_ptr, out2_ptr, add_ptr, z_ptr, so_b, so_c, so_h, so_w,
                        sa_b, sa_c, sa_h, sa_w, sz_b, sz_c, sz_h, sz_w, HAS_BIAS, HAS_BIAS2, PAIR_OUT, HAS_ADDEND,
                        HAS_CHANNEL_ADDEND, SILU_GRAD, ACC)

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
        # axis of one [TAPS, BLOCK_W, BLOCK_C] product, so a row costs one gather load, not k*k;
        # the products accumulate at that shape and the W run is summed once, after the rows
        # (a sum per row crossed threads: shuffles and a barrier each row). HEADS == 2: a second
        # head's grad_out (go2) on the same input, whose x loads both heads share.
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
        acc = tl.zeros([TAPS, BLOCK_W, BLOCK_C], dtype=ACC)
        acc2 = tl.zeros([TAPS, BLOCK_W, BLOCK_C], dtype=ACC)  # HEADS == 2 only (else folded away)
        acc_bias = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        acc_bias2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        for r in range(ROWS):
            oh = row0 + r
            # A vector, not a scalar: the interpreter rejects a scalar mask & a tensor mask.
            row_ok = (ow * 0 + oh) < H
            ih = oh + du
            x_ok = col_ok & (ih >= 0) & (ih < H) & row_ok[None, :, None]
            xv = tl.load(x_base + ih * sx_h, mask=x_ok, other=0.0).to(CONV).to(ACC)
            go = tl.load(g_base + oh * sg_h, mask=g_mask & row_ok[:, None], other=0.0).to(CONV).to(ACC)
            acc += xv * go[None, :, :]
            if NEED_BIAS:
                acc_bias += go
            if HEADS == 2:
                go2 = tl.load(g2_base + oh * sg2_h, mask=g_mask & row_ok[:, None], other=0.0).to(CONV).to(ACC)
                acc2 += xv * go2[None, :, :]
                if NEED_BIAS:
                    acc_bias2 += go2
        # partials: [programs over pixels, B, heads, TAPS + 1, C]; the last tap row holds dbias.
        part = part_ptr + ((tl.program_id(0) * B + pid_b) * HEADS * (TAPS + 1)) * C
        tap_mask = (taps < K * K)[:, None] & c_mask[None, :]
        tl.store(part + taps[:, None] * C + cs[None, :], tl.sum(acc, axis=1), mask=tap_mask)
        if NEED_BIAS:
            tl.store(part + TAPS * C + cs, tl.sum(acc_bias, axis=0), mask=c_mask)
        if HEADS == 2:
            part2 = part + (TAPS + 1) * C
            tl.store(part2 + taps[:, None] * C + cs[None, :], tl.sum(acc2, axis=1), mask=tap_mask)
            if NEED_BIAS:
                tl.store(part2 + TAPS * C + cs, tl.sum(acc_bias2, axis=0), mask=c_mask)


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


def _taps_by_channel(weight: torch.Tensor, dtype: torch.dtype, block_c: int) -> torch.Tensor:
    """A [C, 1, k, k] weight as [k, k, C'], C' the channels padded with zeros to a multiple of
    ``block_c``, rounded to ``dtype`` (as the reference convolves with it) and held in the
    accumulation dtype (fp32, fp64 for fp64): each tap's channels are one contiguous run of
    values the kernel multiplies as they are, loaded without a mask, where the [C, 1, k, k]
    layout in ``dtype`` took a load per channel, or a vector load and a conversion per value,
    every tap of every program. A copy of about C*k*k elements per call."""
    C, k = weight.shape[0], weight.shape[-1]
    taps = weight.reshape(C, k, k).permute(1, 2, 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    padded = _tensors.cdiv(C, block_c) * block_c
    out = weight.new_empty((k, k, padded), dtype=acc) if padded == C else weight.new_zeros((k, k, padded), dtype=acc)
    out[:, :, :C].copy_(taps.to(dtype))  # the rounding; no copy when the weight is in dtype already
    return out


def _in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A convolution's input in its dtype, as the reference convolves it: an fp32 input under
    autocast (the model's residual stream) cast by one pass before the op (seen by
    torch.compile and the traffic ledger), where rounding it in the kernel's registers would cost
    a conversion per tap, 49 per element for a 7x7."""
    return x.to(dtype)


def _convolve(xs, weights, biases, dtype, flip: bool, out_dtype=None, addend=None, silu_input=None,
              channel_addend=None):
    """One launch of the tile kernel. ``xs``: one input, or two (their convolutions
    summed, ``flip``: the input gradient), in ``dtype``; ``weights``: one or two (with one
    input: one output each). Epilogue: + ``channel_addend`` ([B, C]) + ``addend``, then times
    SiLU'(``silu_input``). Returns the outputs."""
    x = xs[0]
    B, C, H, W = x.shape
    k = weights[0].shape[-1]
    pair_in, pair_out = len(xs) == 2, len(xs) == 1 and len(weights) == 2
    outs = [_tensors.empty_activation(x, out_dtype or dtype) for _ in range(2 if pair_out else 1)]
    block_c = _channel_block(C)
    # Row pairs: at least two rows (the second one masked off in an image of one row). Two
    # heads or two inputs: half the rows, for twice the accumulators or loads per element.
    rows = _FWD_TILE_H // 4 if pair_in or pair_out else _FWD_TILE_H
    tile_h = max(2, min(_tensors.next_power_of_2(H), rows))
    tile_w = min(_tensors.next_power_of_2(W), _FWD_TILE_W)
    tiles = _tensors.cdiv(H, tile_h) * _tensors.cdiv(W, tile_w)
    # Unused pointers and strides (an absent second head, addend or silu_input) repeat the first.
    weights = [_taps_by_channel(w, dtype, block_c) for w in weights]
    x2, w2 = xs[-1], weights[-1]
    bias, bias2 = biases[0], biases[-1] if pair_out else None
    add, z = (addend if addend is not None else x), (silu_input if silu_input is not None else x)
    cadd, cadd_strides = (x, (0, 0)) if channel_addend is None else (channel_addend, channel_addend.stride())
    _tensors.launch_over_batch(
        _dwconv_kernel, (tiles, _tensors.cdiv(C, block_c)), B,
        x, x2, weights[0], w2, w2 if bias is None else bias, w2 if bias2 is None else bias2, outs[0], outs[-1],
        add, cadd, z, B, C, H, W, *x.stride(), *x2.stride(), *outs[0].stride(),
        *add.stride(), *cadd_strides, *z.stride(),
        weights[0].stride(2), weights[0].stride(0), weights[0].stride(1), w2.stride(2), w2.stride(0), w2.stride(1),
        *(0 if b is None else b.stride(0) for b in (bias, bias2)),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None, PAIR_OUT=pair_out,
        PAIR_IN=pair_in, HAS_ADDEND=addend is not None, HAS_CHANNEL_ADDEND=channel_addend is not None,
        SILU_GRAD=silu_input is not None, CONV=_tensors.tl_dtype(dtype), ACC=_acc(dtype),
        WIDE=_tensors.wide_offsets(x, x2, *outs, add, z),
        TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c, num_warps=_FWD_WARPS,
        **_tensors.COMPILE_OPTIONS,
    )
    return outs


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
    return op(_in_dtype(x, dtype), weights, biases, dtype)


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
    grad_outs = [_in_dtype(g, dtype) for g in grad_outs]
    x = _in_dtype(x, dtype) if needs[1] or needs[2] else x  # the weight gradient's input
    d_x, *rest = op(grad_outs, x, weights, dtype, list(needs), silu_input, addend, channel_addend)
    heads = len(weights)
    d_ws, d_bs = rest[:heads], rest[heads:]
    return (d_x if needs[0] else None, d_ws if needs[1] else [None] * heads, d_bs if needs[2] else [None] * heads)

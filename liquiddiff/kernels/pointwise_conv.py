""":func:`liquiddiff.functional.silu_conv1x1` in Triton, forward and backward: the (modulated)
SiLU computed in the 1x1 convolution's prologue, as its input tile is loaded, and its backward
in the input gradient's epilogue.

    y = z[b, k, p] * (1 + scale[b, k]) + shift[b, k]   (when modulated; else y = z)
    a = round(silu(y));   out[b, n, p] = bias[n] + sum_k a[b, k, p] * weight[n, k]
    (+ residual[b, n, p], added to round(out) in the promotion of the two, when given)
    d_a = round(grad_out @ weight);   d_y = d_a * silu'(y);   d_z = d_y * (1 + scale)
    d_weight[n, k] = sum_{b,p} grad_out[b, n, p] * a[b, k, p];   d_bias[n] = sum_{b,p} grad_out
    d_scale[b, k] = sum_p d_y * z;   d_shift[b, k] = sum_p d_y

cuDNN takes no activation on its input, so the reference (and the fused model on cuDNN) writes
silu(y) in the convolution's dtype and reads it back, in forward and again in backward (remade
for the weight gradient), and writes d_a for SiLU's backward to read. These kernels make none
of those passes: the forward reads z and writes out; the input-gradient kernel reads grad_out
and z and writes d_z (with d_scale and d_shift as per-program fp32 partials); the
weight-gradient kernel reads grad_out and z and leaves per-program fp32 partial tiles over
ranges of the batch's pixel tiles (as many ranges as fill the GPU, whatever the batch: a
partial per batch item would take B * N * K * 4 bytes, more than the activations of small
images at large batches), which torch sums (no atomics). Used by the FeedForward's last conv, whose forward
also adds the block's residual (the fp32 stream: read, and out written in fp32, where the conv's
bf16 output was written, read back and added), the spatial mix's output conv (modulated by t)
and the backward of the CfC's g and h 1x1 heads (their forward: ``cfc_heads.py``).

Rounding as the reference: silu(y) and the upstream gradient's product with the weight rounded
to the conv's dtype, as cuDNN's input and input gradient are; products accumulated in fp32
(``input_precision="ieee"``: no TF32 for fp32 inputs); the rest in fp32 (fp64 for fp64). Under
bf16 autocast that is the reference up to the order of the sums: within bf16 rounding, not
bitwise.

Layout: [B, K, H*W] through strides (``_tensors.flat_pixels``): channels_last (k stride 1) and
NCHW (pixel stride 1) without a copy; outputs take z's memory format. Channel counts are
constexprs (a few values per model). Tiles chosen without a GPU. Timed on an H100 (bf16
[8, 64, 256, 256]): the forward beats SiLU + cuDNN, forward+backward does not, so ``auto`` runs
the forward in calls that record no gradient (``runtime.FORWARD_ONLY``) and leaves training to
cuDNN unless ``LIQUIDDIFF_KERNELS=auto,pointwise_conv=triton`` (``runtime.OPT_IN``).

The forward also takes a depthwise conv in its prologue (``depthwise_forward``: the CfC's g and
h heads, conv1x1(silu(depthwise3x3(x) + b_dw)), in calls without gradient when the Triton
depthwise kernels are chosen): each k x k tap a load of the input tile shifted by a scalar
offset, masked at the image's border, so x is read (from L1 after its first tap) and out written,
where cuDNN's 3x3 wrote its output and the SiLU -> 1x1 kernel read it back: 4 of the 8 bytes an
element moves in bf16. Its weight goes in as [k, k, K] fp32 vectors (``_depthwise_taps``).
Compiled for sm_90 (``benchmarks.kernel_resources``): 7.8 instructions per tap FMA (the bf16
input's conversion, the tap's address and mask included), whose issue time at the model's
sizes is estimated under cuDNN's 3x3 plus this forward's up to 128 channels and over it at 256
(``MAX_DEPTHWISE_HEAD_CHANNELS``); not timed on a GPU yet. And the FeedForward's two convs in one
forward (``feedforward_forward``, opt-in, without gradient): the hidden tensor, written and read
back between them on the default path, stays in registers a chunk at a time.

Without the prologue's SiLU, the forward is a plain 1x1 conv (``conv1x1_forward``), or, with
SiLU in the epilogue, writes the conv's output and its SiLU both (``conv1x1_and_silu_forward``:
the CfC backbone's z, which backward needs, and silu(z) for its heads; the FeedForward's hidden
tensor and its SiLU, remade in backward from the plain conv's tiles, bit for bit), where a SiLU
pass read the conv's output back.
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors

__all__ = ["forward", "depthwise_forward", "conv1x1_silu_forward", "conv1x1_and_silu_forward", "conv1x1_forward",
           "feedforward_forward", "backward", "OP_NAME"]

OP_NAME = "pointwise_conv"
_BLOCK_P = 64
_MAX_BLOCK_N = 128
_MAX_BLOCK_K = 32
_MAX_WGRAD_BLOCK = 64
_WGRAD_MIN_PROGRAMS = 1024
_WARPS = 4
# The plain conv and the conv writing its output and SiLU both (the FeedForward's first conv and
# its remake in backward, whose outputs must agree bit for bit: the same tiles): at most this many
# output channels a program. Both outputs of a 128-wide tile took 134 registers (3 blocks of 4
# warps per SM, sm_90, Triton 3.6 and 3.9), 64 wide 72 (7 blocks); a 128-channel output reads
# the input tile twice (the second time from L2).
_PLAIN_BLOCK_N = 64
# The backward tiles hold a product tile and two operand tiles of up to 64 x 128: 8 warps keep
# them under 128 registers a thread (benchmarks.kernel_resources).
_BWD_WARPS = 8
# The depthwise prologue's nine taps are loads the compiler keeps in flight together: 16
# channels a step on 8 warps hold 79-106 registers (64-256 channels), 32 on 4 warps 168-255.
_DEPTHWISE_BLOCK_K = 16
_DEPTHWISE_WARPS = 8
# sm_90 instruction counts (benchmarks.kernel_resources) put the depthwise prologue's issue time
# under cuDNN's 3x3 and the SiLU -> 1x1 kernel's up to 128 channels, over them at 256 (the
# output's two channel blocks each compute the taps): the CfC takes it up to this many.
MAX_DEPTHWISE_HEAD_CHANNELS = 128


if triton is not None:

    @triton.jit
    def _activation(z_ptr, scale_ptr, shift_ptr, pid_b, rows, ks, mask, k_mask, sz_b, sz_k, sz_p,
                    ss_b, ss_k, sh_b, sh_k, MODULATED: tl.constexpr, ACC: tl.constexpr):
        """(y, z, 1 + scale) of a [pixels, channels] tile: y = z * (1 + scale) + shift, or z."""
        z = tl.load(z_ptr + pid_b * sz_b + rows * sz_p + ks[None, :] * sz_k, mask=mask, other=0.0).to(ACC)
        if MODULATED:
            one_plus = 1.0 + tl.load(scale_ptr + pid_b * ss_b + ks * ss_k, mask=k_mask, other=0.0).to(ACC)[None, :]
            y = z * one_plus + tl.load(shift_ptr + pid_b * sh_b + ks * sh_k, mask=k_mask, other=0.0).to(ACC)[None, :]
        else:
            one_plus = 1.0
            y = z
        return y, z, one_plus

    @triton.jit
    def _depthwise_input(x_ptr, dw_ptr, dwb_ptr, pid_b, rows, ks, k_mask, sx_b, sx_k, sx_p,
                         sdw_k, sdw_y, sdw_x, s_dwb, height, width, KSIZE: tl.constexpr, HAS_DW_BIAS: tl.constexpr,
                         CONV: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """The [pixels, channels] tile of depthwise_conv(x) (KSIZE x KSIZE, zero padding, stride
        1), rounded to CONV as cuDNN writes it, then its bias added in ACC (as the fused model's
        modulated SiLU adds it, shift = bias). Each tap is a load of the tile shifted by (dy, dx)
        pixels, a scalar added to one pointer tile, masked by the source pixel's row and column
        being in the image: x is read from L1/L2, never written. A lane past the image's last
        pixel reads a pixel inside it (its row is past the last, minus at most KSIZE // 2): the
        caller selects it away."""
        R: tl.constexpr = KSIZE // 2
        pixel = rows.to(tl.int32)  # an image's pixel index: int32 division (H * W < 2**31)
        hh = pixel // width
        ww = pixel - hh * width
        # 32-bit offsets inside the batch item unless WIDE (then ks and rows are int64).
        at = x_ptr + pid_b * sx_b + ((rows if WIDE else pixel) * sx_p + ks[None, :] * sx_k)
        acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=ACC)
        for dy in tl.static_range(KSIZE):
            h_src = hh + (dy - R)
            row_ok = (h_src >= 0) & (h_src < height)
            for dx in tl.static_range(KSIZE):
                w_src = ww + (dx - R)
                ok = row_ok & (w_src >= 0) & (w_src < width)
                tap = (dy - R) * width + (dx - R)
                if WIDE:
                    tap = tap.to(tl.int64)
                x = tl.load(at + tap * sx_p, mask=ok & k_mask[None, :], other=0.0)
                w = tl.load(dw_ptr + ks * sdw_k + dy * sdw_y + dx * sdw_x, mask=k_mask, other=0.0)
                acc += x.to(CONV).to(ACC) * w.to(ACC)[None, :]
        y = acc.to(CONV).to(ACC)
        if HAS_DW_BIAS:
            y += tl.load(dwb_ptr + ks * s_dwb, mask=k_mask, other=0.0).to(ACC)[None, :]
        return y

    @triton.jit
    def silu_conv1x1_tile(z_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, dw_ptr, dwb_ptr, pid_b, rows, p_mask, ns,
                          n_mask, sz_b, sz_k, sz_p, sw_n, sw_k, s_bias, ss_b, ss_k, sh_b, sh_k,
                          sdw_k, sdw_y, sdw_x, s_dwb, height, width,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATED: tl.constexpr, ACTIVATE: tl.constexpr,
                          KSIZE: tl.constexpr, HAS_DW_BIAS: tl.constexpr,
                          CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The [BLOCK_P, BLOCK_N] tile ``rows`` x ``ns`` of conv1x1(silu(y)) + bias (of conv1x1(y)
        without ACTIVATE), accumulated in ACC, before its rounding to the conv's dtype; with
        KSIZE > 0, y = depthwise_conv(z) + its bias (``_depthwise_input``: the dw_ and height,
        width arguments; never modulated), else y is z, modulated when MODULATED. Also the CfC
        heads' kernel's (cfc_heads.py). WIDE: int64 channel offsets (``ns`` comes so)."""
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if WIDE:
                ks = ks.to(tl.int64)
            k_mask = ks < K
            mask = p_mask[:, None] & k_mask[None, :]
            if KSIZE > 0:
                y = _depthwise_input(z_ptr, dw_ptr, dwb_ptr, pid_b, rows, ks, k_mask, sz_b, sz_k, sz_p,
                                     sdw_k, sdw_y, sdw_x, s_dwb, height, width, KSIZE, HAS_DW_BIAS, CONV, ACC, WIDE,
                                     BLOCK_P, BLOCK_K)
            else:
                y, _, _ = _activation(z_ptr, scale_ptr, shift_ptr, pid_b, rows, ks, mask, k_mask, sz_b, sz_k, sz_p,
                                      ss_b, ss_k, sh_b, sh_k, MODULATED, ACC)
            if ACTIVATE:
                y = y * tl.sigmoid(y)
            # Masked lanes are selected away: a shift there would give silu(shift) * 0, NaN * 0 = NaN.
            a = tl.where(mask, y, 0.0).to(CONV).to(DOT)
            w = tl.load(w_ptr + ns[None, :] * sw_n + ks[:, None] * sw_k, mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0).to(CONV).to(DOT)
            acc += tl.dot(a, w, input_precision="ieee", out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ns * s_bias, mask=n_mask, other=0.0).to(ACC)[None, :]
        return acc

    @triton.jit
    def _silu_conv1x1_kernel(
        z_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, dw_ptr, dwb_ptr, res_ptr, out_ptr, pre_ptr, P,
        sz_b, sz_k, sz_p, so_b, so_n, so_p, sw_n, sw_k, s_bias, ss_b, ss_k, sh_b, sh_k,
        sdw_k, sdw_y, sdw_x, s_dwb, height, width, sr_b, sr_n, sr_p, batch_start,
        K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATED: tl.constexpr,
        KSIZE: tl.constexpr, HAS_DW_BIAS: tl.constexpr, ACTIVATE: tl.constexpr, SILU_OUT: tl.constexpr,
        STORE_PRE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CONV: tl.constexpr,
        DOT: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # int64 batch and pixel offsets: B * K * H * W may pass 2**31 (WIDE: so does one batch
        # item, and a channel's offset, k * H * W in NCHW, is int64 too).
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        if WIDE:
            ns = ns.to(tl.int64)
        p_mask, n_mask = ps < P, ns < N
        rows = ps.to(tl.int64)[:, None]
        acc = silu_conv1x1_tile(z_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, dw_ptr, dwb_ptr, pid_b, rows, p_mask, ns,
                                n_mask, sz_b, sz_k, sz_p, sw_n, sw_k, s_bias, ss_b, ss_k, sh_b, sh_k,
                                sdw_k, sdw_y, sdw_x, s_dwb, height, width, K, HAS_BIAS, MODULATED, ACTIVATE,
                                KSIZE, HAS_DW_BIAS, CONV, DOT, ACC, WIDE, BLOCK_P, BLOCK_N, BLOCK_K)
        mask = p_mask[:, None] & n_mask[None, :]
        out = acc.to(CONV)  # the conv's output, as cuDNN writes it
        if STORE_PRE:  # that output too (pre_ptr: out's layout and dtype), before the SiLU below
            tl.store(pre_ptr + pid_b * so_b + rows * so_p + ns[None, :] * so_n, out, mask=mask)
        if SILU_OUT:  # then SiLU of it, rounded again, as aten's SiLU of the conv's output
            out = out.to(ACC)
            out = (out * tl.sigmoid(out)).to(CONV)
        if HAS_RESIDUAL:  # then the block's add, in ACC (PyTorch's fp32 opmath for low precision)
            res = tl.load(res_ptr + pid_b * sr_b + rows * sr_p + ns[None, :] * sr_n, mask=mask)
            out = res.to(ACC) + out.to(ACC)
        tl.store(out_ptr + pid_b * so_b + rows * so_p + ns[None, :] * so_n, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _feedforward_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, res_ptr, out_ptr, P,
        sx_b, sx_k, sx_p, so_b, so_n, so_p, sw1_n, sw1_k, sb1, sw2_n, sw2_k, sb2, sr_b, sr_n, sr_p, batch_start,
        C: tl.constexpr, HIDDEN: tl.constexpr, N: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # A program owns BLOCK_P pixels and all N output channels; the hidden channels go by in
        # chunks of BLOCK_H, each made (x's tile re-read from L1/L2), activated and multiplied
        # into the output tile while in registers.
        pid_b = _tensors.batch_item(1, batch_start, SPLIT_BATCH)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns = tl.arange(0, BLOCK_N)
        if WIDE:
            ns = ns.to(tl.int64)
        p_mask, n_mask = ps < P, ns < N
        rows = ps.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
        for h0 in range(0, HIDDEN, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < HIDDEN
            # No modulation, activation or depthwise prologue: their arguments are never read.
            hidden = silu_conv1x1_tile(x_ptr, w1_ptr, b1_ptr, x_ptr, x_ptr, x_ptr, x_ptr, pid_b, rows, p_mask, hs,
                                       h_mask, sx_b, sx_k, sx_p, sw1_n, sw1_k, sb1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                                       C, HAS_B1, False, False, 0, False,
                                       CONV, DOT, ACC, WIDE, BLOCK_P, BLOCK_H, BLOCK_K)
            hidden = hidden.to(CONV).to(ACC)  # the inner conv's output, as cuDNN writes it
            # Masked lanes are selected away (a pixel past the last holds silu(b1)).
            a = tl.where(p_mask[:, None] & h_mask[None, :], hidden * tl.sigmoid(hidden), 0.0).to(CONV).to(DOT)
            w = tl.load(w2_ptr + ns[None, :] * sw2_n + hs[:, None] * sw2_k, mask=h_mask[:, None] & n_mask[None, :],
                        other=0.0).to(CONV).to(DOT)
            acc += tl.dot(a, w, input_precision="ieee", out_dtype=ACC)
        if HAS_B2:
            acc += tl.load(b2_ptr + ns * sb2, mask=n_mask, other=0.0).to(ACC)[None, :]
        mask = p_mask[:, None] & n_mask[None, :]
        out = acc.to(CONV)  # the last conv's output, as cuDNN writes it
        if HAS_RESIDUAL:  # then the block's add, in ACC
            res = tl.load(res_ptr + pid_b * sr_b + rows * sr_p + ns[None, :] * sr_n, mask=mask)
            out = res.to(ACC) + out.to(ACC)
        tl.store(out_ptr + pid_b * so_b + rows * so_p + ns[None, :] * so_n, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_conv1x1_input_grad_kernel(
        go_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, dz_ptr, part_ptr, B, P,
        sgo_b, sgo_n, sgo_p, sw_n, sw_k, sz_b, sz_k, sz_p, sdz_b, sdz_k, sdz_p, ss_b, ss_k, sh_b, sh_k, batch_start,
        K: tl.constexpr, N: tl.constexpr, MODULATED: tl.constexpr, NEED_DZ: tl.constexpr,
        NEED_PARAMS: tl.constexpr, CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
        SPLIT_BATCH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # d_a = grad_out @ weight (K columns of this program), rounded to the conv's dtype as
        # cuDNN's input gradient is; then SiLU's (and the modulation's) backward in registers.
        pid_p = tl.program_id(0)
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        if WIDE:  # int64 channel offsets: k * H * W in NCHW
            ks = ks.to(tl.int64)
        p_mask, k_mask = ps < P, ks < K
        rows = ps.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            if WIDE:
                ns = ns.to(tl.int64)
            n_mask = ns < N
            go = tl.load(go_ptr + pid_b * sgo_b + rows * sgo_p + ns[None, :] * sgo_n,
                         mask=p_mask[:, None] & n_mask[None, :], other=0.0).to(CONV).to(DOT)
            w = tl.load(w_ptr + ns[:, None] * sw_n + ks[None, :] * sw_k, mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0).to(CONV).to(DOT)
            acc += tl.dot(go, w, input_precision="ieee", out_dtype=ACC)
        d_a = acc.to(CONV).to(ACC)
        mask = p_mask[:, None] & k_mask[None, :]
        y, z, one_plus = _activation(z_ptr, scale_ptr, shift_ptr, pid_b, rows, ks, mask, k_mask, sz_b, sz_k, sz_p,
                                     ss_b, ss_k, sh_b, sh_k, MODULATED, ACC)
        sig = tl.sigmoid(y)
        # Masked lanes are selected away (inf * 0 is NaN).
        d_y = tl.where(mask, d_a * (sig * (1.0 + y * (1.0 - sig))), 0.0)
        if NEED_DZ:
            tl.store(dz_ptr + pid_b * sdz_b + rows * sdz_p + ks[None, :] * sdz_k,
                     (d_y * one_plus).to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:  # per-program partial sums over the pixels, [2, programs, B, K]
            at = part_ptr + (pid_p * B + pid_b) * K + ks
            tl.store(at, tl.sum(d_y * z, axis=0), mask=k_mask)
            tl.store(at + tl.num_programs(0).to(tl.int64) * B * K, tl.sum(d_y, axis=0), mask=k_mask)

    @triton.jit
    def _silu_conv1x1_weight_grad_kernel(
        go_ptr, z_ptr, scale_ptr, shift_ptr, part_ptr, bias_part_ptr, P, total_tiles,
        sgo_b, sgo_n, sgo_p, sz_b, sz_k, sz_p, ss_b, ss_k, sh_b, sh_k,
        K: tl.constexpr, N: tl.constexpr, MODULATED: tl.constexpr, NEED_BIAS: tl.constexpr,
        CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr, ITERS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # d_weight[n, k] = sum over batch items and pixels of grad_out[n] * silu(y)[k], silu(y)
        # remade from z in the prologue: this program's ITERS consecutive tiles of the B * cdiv(P,
        # BLOCK_P) pixel tiles of the batch (total_tiles; one item's tiles, then the next's), an
        # fp32 partial tile [BLOCK_N, BLOCK_K] in part [splits, N, K] (and the bias's, [splits, N]):
        # partials as many as it takes to fill the GPU, whatever the batch.
        # One grid axis, channel blocks first (one range's channel blocks run together and share
        # its tiles in L2), then the ranges: none of the 65535 programs of axes 1 and 2 to mind.
        K_BLOCKS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        CHANNEL_PROGRAMS: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N * K_BLOCKS
        pid_c, pid_s = tl.program_id(0) % CHANNEL_PROGRAMS, tl.program_id(0) // CHANNEL_PROGRAMS
        pid_n, pid_k = pid_c // K_BLOCKS, pid_c % K_BLOCKS
        item_tiles = tl.cdiv(P, BLOCK_P)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        if WIDE:  # int64 channel offsets: k * H * W in NCHW
            ns, ks = ns.to(tl.int64), ks.to(tl.int64)
        n_mask, k_mask = ns < N, ks < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC)
        bias_acc = tl.zeros([BLOCK_N], dtype=ACC)
        for i in range(ITERS):
            tile = pid_s * ITERS + i
            # A tile past the last is the last again, all masked: its item's scale and shift
            # exist (they are loaded for every k of the tile).
            last = tl.minimum(tile, total_tiles - 1)
            pid_b = (last // item_tiles).to(tl.int64)
            ps = (last % item_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
            p_mask = ps < P * (tile < total_tiles).to(tl.int32)  # no pixel of a tile past the last
            rows = ps.to(tl.int64)[:, None]
            go = tl.load(go_ptr + pid_b * sgo_b + ps.to(tl.int64)[None, :] * sgo_p + ns[:, None] * sgo_n,
                         mask=n_mask[:, None] & p_mask[None, :], other=0.0)
            mask = p_mask[:, None] & k_mask[None, :]
            y, _, _ = _activation(z_ptr, scale_ptr, shift_ptr, pid_b, rows, ks, mask, k_mask, sz_b, sz_k, sz_p,
                                  ss_b, ss_k, sh_b, sh_k, MODULATED, ACC)
            a = tl.where(mask, y * tl.sigmoid(y), 0.0).to(CONV).to(DOT)
            acc += tl.dot(go.to(CONV).to(DOT), a, input_precision="ieee", out_dtype=ACC)
            if NEED_BIAS:
                bias_acc += tl.sum(go.to(CONV).to(ACC), axis=1)
        tl.store(part_ptr + (pid_s * N + ns[:, None]) * K + ks[None, :], acc, mask=n_mask[:, None] & k_mask[None, :])
        if NEED_BIAS:
            if pid_k == 0:  # one program per output channel block writes the bias's partial
                tl.store(bias_part_ptr + pid_s * N + ns, bias_acc, mask=n_mask)


def _blocks(reduced: int, kept: int) -> tuple[int, int]:
    """(block of the kept channels, block of the reduced ones) of a product tile: powers of 2 of
    at least 16 (tl.dot's smallest tile)."""
    return (max(16, min(_tensors.next_power_of_2(kept), _MAX_BLOCK_N)),
            max(16, min(_tensors.next_power_of_2(reduced), _MAX_BLOCK_K)))


def dot_dtypes(dtype: torch.dtype, device: torch.device):
    """(CONV, DOT, ACC) constexprs. The interpreter's tl.dot knows no bf16 or fp16 (numpy has
    neither): there the operands, rounded to the conv's dtype, are multiplied in fp32, which is
    exact for them, so the sum is what the GPU's bf16 dot with fp32 accumulation computes."""
    conv, acc = _tensors.tl_dtype(dtype), tl.float64 if dtype == torch.float64 else tl.float32
    return conv, acc if device.type == "cpu" else conv, acc


def _modulation_args(scale, shift, z):
    """The scale and shift pointers and strides; absent, z's (never read)."""
    if scale is None:
        return (z, z), (0,) * 4
    return (scale, shift), (*scale.stride(), *shift.stride())


def _allocate_out(z, weight, residual, dtype):
    """The output in z's memory format: ``dtype``, or its promotion with the residual's."""
    out_dtype = dtype if residual is None else torch.promote_types(dtype, residual.dtype)
    return _tensors.empty_activation(z, out_dtype, channels=weight.shape[0])


def _depthwise_taps(dw_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The depthwise weight [K, 1, k, k] as the prologue reads it: [k, k, K], each tap a vector
    over the channels (16-byte loads, where a [K, 1, k, k] weight is a 2-byte gather per channel),
    rounded to ``dtype`` (as the conv's operands are) and held in the accumulation dtype (no
    conversion in the tap loop); one small copy."""
    rounded = dw_weight if dw_weight.dtype == dtype else dw_weight.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = dw_weight.shape[-1]
    return torch.empty((k, k, dw_weight.shape[0]), dtype=acc, device=dw_weight.device).copy_(
        rounded[:, 0].permute(1, 2, 0))


def _launch_forward(z, weight, bias, scale, shift, dtype, residual, dw_weight=None, dw_bias=None,
                    silu_out: bool = False, activate: bool = True, keep_pre: bool = False):
    """The forward kernel: with ``dw_weight`` ([K, 1, k, k]), conv1x1(silu(depthwise_conv(z) +
    dw_bias)) (no modulation, no residual); with ``silu_out``, silu(conv1x1(z)) (no modulation,
    no residual), and with ``keep_pre`` (conv1x1(z), that) both; without ``activate``,
    conv1x1(z) (no modulation, no residual); else conv1x1(silu(z modulated)) + residual."""
    B, K, H, W = z.shape
    N = weight.shape[0]
    out = _allocate_out(z, weight, residual, dtype)
    pre = _allocate_out(z, weight, None, dtype) if keep_pre else out
    result = (pre, out) if keep_pre else out
    params, param_strides = _modulation_args(scale, shift, z)
    (z, out, pre), (sz, so, _) = _tensors.flat_all(z, out, pre)
    res, sr = (out, (0, 0, 0)) if residual is None else _tensors.flat_pixels(residual)
    block_n, block_k = _blocks(K, N)
    if keep_pre or not (activate or silu_out):
        block_n = min(block_n, _PLAIN_BLOCK_N)
    options = {"num_warps": _WARPS}
    if dw_weight is None:
        dw_args, dw_strides = (z, z), (0, 0, 0, 0)
    else:
        taps = _depthwise_taps(dw_weight, dtype)
        dw_args = taps, taps if dw_bias is None else dw_bias
        dw_strides = (taps.stride(2), taps.stride(0), taps.stride(1), 0 if dw_bias is None else dw_bias.stride(0))
        # Unpipelined: the taps' loads hit L1 (a tile's nine shifts share their lines), where the
        # pipeliner's asynchronous copies bypass it and fetch each shift from L2 into shared memory.
        options.update(num_stages=1, num_warps=_DEPTHWISE_WARPS)
        block_k = min(block_k, _DEPTHWISE_BLOCK_K)
    conv, dot, acc = dot_dtypes(dtype, z.device)
    _tensors.launch_over_batch(
        _silu_conv1x1_kernel, (_tensors.cdiv(H * W, _BLOCK_P), _tensors.cdiv(N, block_n)), B,
        z, weight, weight if bias is None else bias, *params, *dw_args, res, out, pre, H * W,
        *sz, *so, weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0), *param_strides,
        *dw_strides, H, W, *sr,
        K=K, N=N, HAS_BIAS=bias is not None, MODULATED=scale is not None,
        KSIZE=0 if dw_weight is None else dw_weight.shape[-1], HAS_DW_BIAS=dw_bias is not None,
        ACTIVATE=activate and not silu_out, SILU_OUT=silu_out, STORE_PRE=keep_pre,
        HAS_RESIDUAL=residual is not None, CONV=conv, DOT=dot, ACC=acc,
        WIDE=_tensors.wide_offsets(z, out, res),
        BLOCK_P=_BLOCK_P, BLOCK_N=block_n, BLOCK_K=block_k, **options, **_tensors.COMPILE_OPTIONS,
    )
    return result


@_tensors.launches_on_input_device
def _forward_kernels(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                     scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
                     dtype: torch.dtype, residual: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_forward(z, weight, bias, scale, shift, dtype, residual)


_forward_op = torch.library.custom_op("liquiddiff::silu_conv1x1_forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(z, weight, bias, scale, shift, dtype, residual=None):
    return _allocate_out(z, weight, residual, dtype)


def forward(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
            scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
            dtype: torch.dtype, residual: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv1x1(silu(z * (1 + scale) + shift)) (the modulation when given), in ``dtype``, then
    ``residual`` + that (in their promotion) when given, in z's memory format; ``weight``
    [N, K, 1, 1] and ``bias`` as the conv runs them. No autograd: the caller's
    autograd.Function keeps z and makes the backward (recompute.py): the residual's gradient is
    the upstream one, which the backward kernels round to ``dtype`` as they load it."""
    op = _forward_op if _eager.needs_custom_op(z) else _forward_kernels
    return op(z, weight, bias, scale, shift, dtype, residual)


@_tensors.launches_on_input_device
def _depthwise_forward_kernels(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: typing.Optional[torch.Tensor],
                               weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                               dtype: torch.dtype) -> torch.Tensor:
    return _launch_forward(x, weight, bias, None, None, dtype, None, dw_weight, dw_bias)


_depthwise_forward_op = torch.library.custom_op(
    "liquiddiff::depthwise_silu_conv1x1_forward", mutates_args=())(_depthwise_forward_kernels)


@_depthwise_forward_op.register_fake
def _(x, dw_weight, dw_bias, weight, bias, dtype):
    return _allocate_out(x, weight, None, dtype)


def depthwise_forward(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: typing.Optional[torch.Tensor],
                      weight: torch.Tensor, bias: typing.Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """:func:`liquiddiff.functional.depthwise_silu_conv1x1` in ``dtype`` (the CfC's g and h heads
    without gradient): the depthwise conv ([K, 1, k, k], odd k, zero padding) computed in the
    1x1 conv's prologue from taps of x read in place, so that its output (cuDNN's, written and
    read back by the SiLU -> 1x1 kernel) is never written; in x's memory format. No autograd: a
    forward for calls that record no gradient. The depthwise output is rounded to ``dtype``
    before its bias is added (the fused model's order: the bias goes in with the SiLU)."""
    op = _depthwise_forward_op if _eager.needs_custom_op(x) else _depthwise_forward_kernels
    return op(x, dw_weight, dw_bias, weight, bias, dtype)


@_tensors.launches_on_input_device
def _conv1x1_kernels(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                     dtype: torch.dtype, silu: bool) -> torch.Tensor:
    return _launch_forward(z, weight, bias, None, None, dtype, None, silu_out=silu, activate=False)


_conv1x1_op = torch.library.custom_op("liquiddiff::conv1x1_forward", mutates_args=())(_conv1x1_kernels)


@_conv1x1_op.register_fake
def _(z, weight, bias, dtype, silu):
    return _allocate_out(z, weight, None, dtype)


def conv1x1_forward(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """:func:`liquiddiff.functional.conv1x1` in ``dtype``, in z's memory format, on this file's
    forward kernel without its SiLU: the FeedForward's first conv, so that its backward's remake
    (:func:`conv1x1_and_silu_forward`) gives the same bits. No autograd."""
    op = _conv1x1_op if _eager.needs_custom_op(z) else _conv1x1_kernels
    return op(z, weight, bias, dtype, False)


def conv1x1_silu_forward(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                         dtype: torch.dtype) -> torch.Tensor:
    """:func:`liquiddiff.functional.conv1x1_silu` in ``dtype`` (the CfC backbone's 1x1 conv and
    its SiLU, without gradient): SiLU in the conv's epilogue, of its output rounded to ``dtype``
    (as cuDNN writes it and aten's SiLU reads it), where a SiLU pass read the conv's output back;
    in z's memory format. No autograd: a forward for calls that record no gradient."""
    op = _conv1x1_op if _eager.needs_custom_op(z) else _conv1x1_kernels
    return op(z, weight, bias, dtype, True)


@_tensors.launches_on_input_device
def _conv1x1_and_silu_kernels(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(z, weight, bias, None, None, dtype, None, silu_out=True, keep_pre=True)


_conv1x1_and_silu_op = torch.library.custom_op("liquiddiff::conv1x1_and_silu_forward", mutates_args=())(
    _conv1x1_and_silu_kernels)


@_conv1x1_and_silu_op.register_fake
def _(z, weight, bias, dtype):
    return _allocate_out(z, weight, None, dtype), _allocate_out(z, weight, None, dtype)


def conv1x1_and_silu_forward(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv1x1(z), its SiLU), both in ``dtype`` and z's memory format, by one pass: the conv
    output as :func:`conv1x1_forward` writes it (the same tiles, so the same bits) and its SiLU
    as :func:`conv1x1_silu_forward` does, where a SiLU pass read the conv's output back (the
    CfC backbone's 1x1 in training, which backward needs z of; the FeedForward's first conv
    remade in backward). No autograd."""
    op = _conv1x1_and_silu_op if _eager.needs_custom_op(z) else _conv1x1_and_silu_kernels
    return op(z, weight, bias, dtype)


# The FeedForward kernel holds all output channels of its pixel tile: up to this many (126-127
# registers at 64 and 128, benchmarks.kernel_resources; 198 at 256, where the two GEMMs, 2 x 256
# x 512 multiply-adds a pixel, are compute-bound and cuBLAS's), else the two convs run apart.
MAX_FEEDFORWARD_CHANNELS = 128
_FEEDFORWARD_BLOCK_H = 64
# The output tile, a hidden chunk and x's tile: on 4 warps 127-168 registers at 64 channels
# (Triton 3.9 to 3.4), on 8 under 128 at 64 and 128 channels.
_FEEDFORWARD_WARPS = 8


@_tensors.launches_on_input_device
def _feedforward_kernels(x: torch.Tensor, w1: torch.Tensor, b1: typing.Optional[torch.Tensor], w2: torch.Tensor,
                         b2: typing.Optional[torch.Tensor], dtype: torch.dtype,
                         residual: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    B, C, H, W = x.shape
    hidden, N = w1.shape[0], w2.shape[0]
    out = _allocate_out(x, w2, residual, dtype)
    (x, out), (sx, so) = _tensors.flat_all(x, out)
    res, sr = (out, (0, 0, 0)) if residual is None else _tensors.flat_pixels(residual)
    block_n = max(16, _tensors.next_power_of_2(N))
    block_h = max(16, min(_tensors.next_power_of_2(hidden), _FEEDFORWARD_BLOCK_H))
    block_k = max(16, min(_tensors.next_power_of_2(C), _MAX_BLOCK_K))
    conv, dot, acc = dot_dtypes(dtype, x.device)
    _tensors.launch_over_batch(
        _feedforward_kernel, (_tensors.cdiv(H * W, _BLOCK_P),), B,
        x, w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2, res, out, H * W,
        *sx, *so, w1.stride(0), w1.stride(1), 0 if b1 is None else b1.stride(0),
        w2.stride(0), w2.stride(1), 0 if b2 is None else b2.stride(0), *sr,
        C=C, HIDDEN=hidden, N=N, HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_RESIDUAL=residual is not None,
        CONV=conv, DOT=dot, ACC=acc, WIDE=_tensors.wide_offsets(x, out, res), BLOCK_P=_BLOCK_P, BLOCK_H=block_h,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_FEEDFORWARD_WARPS,
        **_tensors.COMPILE_OPTIONS,
    )
    return out


_feedforward_op = torch.library.custom_op("liquiddiff::feedforward_forward", mutates_args=())(_feedforward_kernels)


@_feedforward_op.register_fake
def _(x, w1, b1, w2, b2, dtype, residual=None):
    return _allocate_out(x, w2, residual, dtype)


def feedforward_forward(x: torch.Tensor, w1: torch.Tensor, b1: typing.Optional[torch.Tensor], w2: torch.Tensor,
                        b2: typing.Optional[torch.Tensor], dtype: torch.dtype,
                        residual: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`liquiddiff.functional.feedforward` in ``dtype`` (the FeedForward without gradient):
    both 1x1 convs in one pass, the hidden tensor ([B, hidden, H, W], cuDNN's output written and
    read back by the SiLU -> 1x1 kernel) never written; rounded as that path rounds it (the
    hidden to ``dtype``, SiLU's output to ``dtype``, the last conv's output to ``dtype`` before
    the residual's add in the promotion of the two). ``w2``'s output channels at most
    ``MAX_FEEDFORWARD_CHANNELS``. No autograd: a forward for calls that record no gradient."""
    op = _feedforward_op if _eager.needs_custom_op(x) else _feedforward_kernels
    return op(x, w1, b1, w2, b2, dtype, residual)


def _input_grads(go, z, weight, scale, shift, dtype, need_z: bool, need_params: bool):
    """(d_z or an empty tensor, d scale and d shift partials [2, programs, B, K] or None)."""
    B, K, H, W = z.shape
    N, P = weight.shape[0], H * W
    d_z = _tensors.empty_activation(z, z.dtype) if need_z else z.new_empty(0)
    params, param_strides = _modulation_args(scale, shift, z)
    (go, zf, dzf), (sgo, sz, sdz) = _tensors.flat_all(go, z, d_z if need_z else z)
    block_k, block_n = _blocks(N, K)
    pixel_programs = _tensors.cdiv(P, _BLOCK_P)
    conv, dot, acc = dot_dtypes(dtype, z.device)
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    partials = _tensors.empty_buffer((2, pixel_programs, B, K), part_dtype, z.device) if need_params else None
    _tensors.launch_over_batch(
        _silu_conv1x1_input_grad_kernel, (pixel_programs, _tensors.cdiv(K, block_k)), B,
        go, weight, zf, *params, dzf, zf if partials is None else partials, B, P,
        *sgo, weight.stride(0), weight.stride(1), *sz, *sdz, *param_strides,
        K=K, N=N, MODULATED=scale is not None, NEED_DZ=need_z, NEED_PARAMS=need_params, CONV=conv, DOT=dot,
        ACC=acc, WIDE=_tensors.wide_offsets(go, zf, dzf), BLOCK_P=_BLOCK_P, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=_BWD_WARPS, **_tensors.COMPILE_OPTIONS,
    )
    return d_z, partials


def _weight_grads(go, z, scale, shift, N: int, dtype, need_bias: bool):
    """(d_weight [N, K, 1, 1], d_bias [N] or an empty tensor), in ``dtype`` as cuDNN's are:
    per-program fp32 partial tiles over pixel ranges, summed by torch (no atomics)."""
    B, K, H, W = z.shape
    P = H * W
    params, param_strides = _modulation_args(scale, shift, z)
    (go, zf), (sgo, sz) = _tensors.flat_all(go, z)
    block_n, block_k = (max(16, min(_tensors.next_power_of_2(c), _MAX_WGRAD_BLOCK)) for c in (N, K))
    tiles = B * _tensors.cdiv(P, _BLOCK_P)  # over the whole batch: the partials do not grow with it
    channel_programs = _tensors.cdiv(N, block_n) * _tensors.cdiv(K, block_k)
    # Pixel tiles per program a power of 2 (a constexpr: few variants), enough programs to fill a GPU.
    iters = _tensors.next_power_of_2(_tensors.cdiv(tiles, max(1, _WGRAD_MIN_PROGRAMS // channel_programs)))
    iters = min(iters, _tensors.next_power_of_2(tiles))
    splits = _tensors.cdiv(tiles, iters)
    part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    part = _tensors.empty_buffer((splits, N, K), part_dtype, z.device)
    bias_part = _tensors.empty_buffer((splits, N), part_dtype, z.device) if need_bias else part
    conv, dot, acc = dot_dtypes(dtype, z.device)
    _silu_conv1x1_weight_grad_kernel[(channel_programs * splits,)](
        go, zf, *params, part, bias_part, P, tiles, *sgo, *sz, *param_strides,
        K=K, N=N, MODULATED=scale is not None, NEED_BIAS=need_bias, CONV=conv, DOT=dot, ACC=acc,
        WIDE=_tensors.wide_offsets(go, zf), ITERS=iters,
        BLOCK_P=_BLOCK_P, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_BWD_WARPS, **_tensors.COMPILE_OPTIONS,
    )
    d_w = part.sum(0).to(dtype).view(N, K, 1, 1)
    d_b = bias_part.sum(0).to(dtype) if need_bias else go.new_empty(0, dtype=dtype)
    return d_w, d_b


@_tensors.launches_on_input_device
def _backward_kernels(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                      scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
                      dtype: torch.dtype, needs: typing.Sequence[bool],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_z, d_weight, d_bias, d scale and d shift stacked [2, B, K]); a skipped one is an empty
    tensor. d_weight and d_bias in ``dtype``; the stack in scale's and shift's dtype when they
    share it (``_tensors.stacked_dtype``)."""
    need_z, need_w, need_b, need_scale, need_shift = needs
    need_params = scale is not None and (need_scale or need_shift)
    d_z, d_params = z.new_empty(0), z.new_empty(0)
    if need_z or need_params:
        d_z, partials = _input_grads(grad_out, z, weight, scale, shift, dtype, need_z, need_params)
        if need_params:
            d_params = partials.sum(1).to(_tensors.stacked_dtype(partials.dtype, (scale.dtype, shift.dtype)))
    d_w, d_b = z.new_empty(0, dtype=dtype), z.new_empty(0, dtype=dtype)
    if need_w or need_b:
        d_w, d_b = _weight_grads(grad_out, z, scale, shift, weight.shape[0], dtype, need_b)
        if not need_w:
            d_w = z.new_empty(0, dtype=dtype)
    return d_z, d_w, d_b, d_params


_backward_op = torch.library.custom_op("liquiddiff::silu_conv1x1_backward", mutates_args=())(_backward_kernels)


@_backward_op.register_fake
def _(grad_out, z, weight, scale, shift, dtype, needs):
    need_z, need_w, need_b, need_scale, need_shift = needs
    N, K = weight.shape[:2]
    stacked = None
    if scale is not None and (need_scale or need_shift):
        part_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        stacked = scale.new_empty((2, *scale.shape), dtype=_tensors.stacked_dtype(part_dtype, (scale.dtype, shift.dtype)))
    return (_tensors.empty_activation(z, z.dtype) if need_z else z.new_empty(0),
            z.new_empty((N, K, 1, 1), dtype=dtype) if need_w else z.new_empty(0, dtype=dtype),
            z.new_empty((N,), dtype=dtype) if need_b else z.new_empty(0, dtype=dtype),
            z.new_empty(0) if stacked is None else stacked)


def backward(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
             scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
             dtype: torch.dtype, needs: typing.Sequence[bool]):
    """(d_z, d_weight, d_bias, d_scale, d_shift) of :func:`forward` for ``grad_out``; None where
    ``needs`` (five flags) says so. SiLU (and the modulation) is remade in registers from z in
    both kernels: neither silu(y) nor its gradient is written. d_weight and d_bias in ``dtype``
    (as cuDNN's), d_z in z's dtype, d_scale and d_shift in their inputs' dtypes."""
    op = _backward_op if _eager.needs_custom_op(z) else _backward_kernels
    d_z, d_w, d_b, d_params = op(grad_out, z, weight, scale, shift, dtype, list(needs))
    need_z, need_w, need_b, need_scale, need_shift = needs
    d_scale = d_shift = None
    if scale is not None:
        d_scale, d_shift = _tensors.unstack_grads(
            d_params, (scale.dtype if need_scale else None, shift.dtype if need_shift else None))
    return d_z if need_z else None, d_w if need_w else None, d_b if need_b else None, d_scale, d_shift

""":func:`liquiddiff.functional.cfc_heads_relax` in Triton: the CfC's three 1x1 heads and its
gate + relaxation in one kernel each way, f, g and h never leaving registers.

    f = round(backbone @ W_f + b_f);   g = round(silu(g_hidden) @ W_g + b_g);   h likewise
    out = alpha * x + (1 - alpha) * (gate * g + (1 - gate) * h) (+ residual),
    gate = sigmoid(a * f - b),   alpha = exp(-softplus(rho) * |t|)

The backward is the CfC kernel's (cfc_relax.py) with f, g and h remade in its registers: it
writes the gradients of f, g, h and x, and per-program fp32 partial sums for a, b, rho and t,
which torch adds up (no atomics). The caller (``parallel_cfc.py``) takes d f, d g and d h on
through the heads' own backward (cuDNN for f, the pointwise kernels for g and h).

Memory moved per activation element, in the model's dtypes (bf16 heads, the fp32 residual
stream): the forward reads backbone, g_hidden and h_hidden (6 bytes), x and the residual (8) and
writes out (4): 18 bytes, where the three 1x1 convolutions and the CfC kernel move 30 (f, g and
h written and read back; the g and h heads' SiLU already in the pointwise kernels' prologue).
The backward reads the upstream gradient (4), the heads' inputs (6) and x (4) and writes four
gradients (10): 24 bytes, where remaking f, g and h and the CfC backward move 36. Where C is
above one output-channel block, the heads' inputs are read once per block; the grid runs a pixel
tile's blocks next to one another, so the repeats come from L2.

Rounding as the reference: f, g and h accumulate in fp32 (``input_precision="ieee"``) and are
rounded to the conv's dtype, as cuDNN writes them; the gate and relaxation and their backward
then run in fp32 (fp64 for fp64), as the CfC kernels' do. Within bf16 rounding of the
reference, not bitwise (the order of the sums).

Opt-in with the pointwise kernels (``LIQUIDDIFF_KERNELS=auto,pointwise_conv=triton``); the first
GPU report (H100) timed it only inside the model, whose train step took 298 ms with both opt-in
kernel sets against 255 ms without (tiny preset, 256 px, batch 8, bf16). Layout: [B, C, H*W]
through strides (``_tensors.flat_pixels``), channels_last and NCHW without a copy; out and d x
take x's memory format, d f, d g and d h backbone's. A program owns [pixels, output channels]
tiles of one batch item and computes the three heads over all C input channels, in K blocks.
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors
from .cfc_relax import fake_parameter_grads, reduce_parameter_partials, unpack_grads
from .pointwise_conv import dot_dtypes

__all__ = ["forward", "backward"]

# Tiles chosen without a GPU (``benchmarks.tune_kernels`` sweeps them), by registers a thread on
# sm_90 (``benchmarks.kernel_resources``; Triton 3.6 / 3.9). The forward holds three fp32 head
# tiles: [32, 64] on 8 warps take 61 / 60 ([64, 64]: 128). The backward holds about ten (the
# heads, the upstream gradient, the gate, four gradients): [16, 64] on 8 warps take 80 / 70 with
# one tile per program, but 170 / 128 walking several (as the CfC kernel's backward does to keep
# its partial sums few), so it takes one: its [4, C] gate-parameter partials per 16 pixels are
# 1 byte per activation element written and read again, against the 24 the kernel moves.
_BLOCK_P = 32
_BWD_BLOCK_P = 16
_MAX_BLOCK_N = 64
_MAX_BLOCK_K = 32
_WARPS = 8
_BWD_WARPS = 8
# The backward's pixel tiles per program, at most; and the grid keeps at least this many programs.
_BWD_MAX_TILES = 1
_BWD_MIN_PROGRAMS = 1024


if triton is not None:
    from .cfc_relax import relax, relaxation_weight, store_parameter_partials
    from .cfc_relax import _softplus as softplus
    from .pointwise_conv import silu_conv1x1_tile

    @triton.jit
    def _heads(bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr,
                              pid_b, rows, p_mask, ns, n_mask,                sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p, swf_n, swf_k, sbf, swg_n, swg_k, sbg, swh_n, swh_k, sbh,
               C: tl.constexpr, HAS_BF: tl.constexpr, HAS_BG: tl.constexpr, HAS_BH: tl.constexpr,
               CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, COMPUTE: tl.constexpr, WIDE: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """(f, g, h) tiles [BLOCK_P, BLOCK_N], each rounded to the conv's dtype as cuDNN writes it
        (no modulation: the scale and shift arguments are never read)."""
        # No depthwise prologue (KSIZE 0): its pointers, strides, height and width are never read.
        f = silu_conv1x1_tile(bb_ptr, wf_ptr, bf_ptr, bb_ptr, bb_ptr, bb_ptr, bb_ptr, pid_b, rows, p_mask, ns, n_mask,
                              sbb_b, sbb_k, sbb_p, swf_n, swf_k, sbf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                              C, HAS_BF, False, False, 0, False,
                              CONV, DOT, ACC, WIDE, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
        g = silu_conv1x1_tile(gh_ptr, wg_ptr, bg_ptr, gh_ptr, gh_ptr, gh_ptr, gh_ptr, pid_b, rows, p_mask, ns, n_mask,
                              sgh_b, sgh_k, sgh_p, swg_n, swg_k, sbg, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                              C, HAS_BG, False, True, 0, False,
                              CONV, DOT, ACC, WIDE, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
        h = silu_conv1x1_tile(hh_ptr, wh_ptr, bh_ptr, hh_ptr, hh_ptr, hh_ptr, hh_ptr, pid_b, rows, p_mask, ns, n_mask,
                              shh_b, shh_k, shh_p, swh_n, swh_k, sbh, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                              C, HAS_BH, False, True, 0, False,
                              CONV, DOT, ACC, WIDE, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
        return f, g, h

    @triton.jit
    def _cfc_heads_relax_kernel(
        bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr,
        x_ptr, res_ptr, a_ptr, b_ptr, rho_ptr, t_ptr, out_ptr, P,
        sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p,
        swf_n, swf_k, sbf, swg_n, swg_k, sbg, swh_n, swh_k, sbh,
        sx_b, sx_c, sx_p, sr_b, sr_c, sr_p, so_b, so_c, so_p, sa_b, sa_c, sb_b, sb_c, s_rho, s_t, batch_start,
        C: tl.constexpr, HAS_BF: tl.constexpr, HAS_BG: tl.constexpr, HAS_BH: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
        COMPUTE: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Axis 0 walks a pixel tile's output-channel blocks, then the next tile: a tile's blocks
        # run together and share its inputs in L2, and the pixel tiles are not bound by the
        # 65535 programs of axes 1 and 2 (65536 tiles of 32 pixels at 2048 x 1024).
        n_blocks: tl.constexpr = (C + BLOCK_N - 1) // BLOCK_N
        ns = tl.program_id(0) % n_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
        ps = tl.program_id(0) // n_blocks * BLOCK_P + tl.arange(0, BLOCK_P)
        # int64 batch and pixel offsets: B * C * H * W may pass 2**31 (WIDE: so does one batch
        # item, and a channel's offset, c * H * W in NCHW, is int64 too).
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        if WIDE:
            ns = ns.to(tl.int64)
        p_mask, n_mask = ps < P, ns < C
        rows = ps.to(tl.int64)[:, None]
        cols = ns[None, :]
        f, g, h = _heads(bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr, pid_b, rows, p_mask,
                         ns, n_mask, sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p,
                         swf_n, swf_k, sbf, swg_n, swg_k, sbg, swh_n, swh_k, sbh, C, HAS_BF, HAS_BG, HAS_BH,
                         CONV, DOT, ACC, COMPUTE, WIDE, BLOCK_P, BLOCK_N, BLOCK_K)
        av = tl.load(a_ptr + pid_b * sa_b + ns * sa_c, mask=n_mask).to(COMPUTE)[None, :]
        bv = tl.load(b_ptr + pid_b * sb_b + ns * sb_c, mask=n_mask).to(COMPUTE)[None, :]
        rho = tl.load(rho_ptr + ns * s_rho, mask=n_mask).to(COMPUTE)
        alpha = relaxation_weight(rho, tl.load(t_ptr + pid_b * s_t).to(COMPUTE))[None, :]
        mask = p_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + pid_b * sx_b + rows * sx_p + cols * sx_c, mask=mask).to(COMPUTE)
        out = relax(f, g, h, x, av, bv, alpha)
        if HAS_RESIDUAL:
            out += tl.load(res_ptr + pid_b * sr_b + rows * sr_p + cols * sr_c, mask=mask).to(COMPUTE)
        tl.store(out_ptr + pid_b * so_b + rows * so_p + cols * so_c, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cfc_heads_relax_bwd_kernel(
        go_ptr, bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr,
        x_ptr, a_ptr, b_ptr, rho_ptr, t_ptr, df_ptr, dg_ptr, dh_ptr, dx_ptr, part_ptr, B, P,
        sgo_b, sgo_c, sgo_p, sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p,
        swf_n, swf_k, sbf, swg_n, swg_k, sbg, swh_n, swh_k, sbh, sx_b, sx_c, sx_p,
        sdf_b, sdf_c, sdf_p, sdg_b, sdg_c, sdg_p, sdh_b, sdh_c, sdh_p, sdx_b, sdx_c, sdx_p,
        sa_b, sa_c, sb_b, sb_c, s_rho, s_t, batch_start,
        C: tl.constexpr, HAS_BF: tl.constexpr, HAS_BG: tl.constexpr, HAS_BH: tl.constexpr,
        NEED_DF: tl.constexpr, NEED_DG: tl.constexpr, NEED_DH: tl.constexpr, NEED_DX: tl.constexpr,
        NEED_PARAMS: tl.constexpr, CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
        COMPUTE: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
    ):
        # The CfC kernel's backward (cfc_relax.py) with f, g and h remade in registers: TILES
        # pixel tiles of one batch item and channel block, the gate parameters' gradients summed
        # over them into one partial per program.
        n_blocks: tl.constexpr = (C + BLOCK_N - 1) // BLOCK_N  # on axis 0 with the pixel tiles, as forward
        ns = tl.program_id(0) % n_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
        pid_p = tl.program_id(0) // n_blocks
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        if WIDE:
            ns = ns.to(tl.int64)
        n_mask = ns < C
        cols = ns[None, :]
        av = tl.load(a_ptr + pid_b * sa_b + ns * sa_c, mask=n_mask).to(COMPUTE)[None, :]
        bv = tl.load(b_ptr + pid_b * sb_b + ns * sb_c, mask=n_mask).to(COMPUTE)[None, :]
        rho = tl.load(rho_ptr + ns * s_rho, mask=n_mask).to(COMPUTE)
        tv = tl.load(t_ptr + pid_b * s_t).to(COMPUTE)
        alpha_c = relaxation_weight(rho, tv)
        alpha = alpha_c[None, :]
        sum_da = tl.zeros([BLOCK_N], dtype=COMPUTE)
        sum_db = tl.zeros([BLOCK_N], dtype=COMPUTE)
        sum_dalpha = tl.zeros([BLOCK_N], dtype=COMPUTE)
        for i in range(TILES):
            ps = (pid_p * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            p_mask = ps < P
            rows = ps.to(tl.int64)[:, None]
            mask = p_mask[:, None] & n_mask[None, :]
            go = tl.load(go_ptr + pid_b * sgo_b + rows * sgo_p + cols * sgo_c, mask=mask).to(COMPUTE)
            f, g, h = _heads(bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr, pid_b, rows,
                             p_mask, ns, n_mask, sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p,
                             swf_n, swf_k, sbf, swg_n, swg_k, sbg, swh_n, swh_k, sbh, C, HAS_BF, HAS_BG, HAS_BH,
                             CONV, DOT, ACC, COMPUTE, WIDE, BLOCK_P, BLOCK_N, BLOCK_K)
            gate = tl.sigmoid(av * f - bv)
            dy = (1.0 - alpha) * go
            dz = dy * (g - h) * gate * (1.0 - gate)
            if NEED_PARAMS:
                x = tl.load(x_ptr + pid_b * sx_b + rows * sx_p + cols * sx_c, mask=mask).to(COMPUTE)
                y = gate * g + (1.0 - gate) * h
                # Masked lanes hold garbage (inf * 0 is NaN): select, don't rely on zeros.
                sum_da += tl.sum(tl.where(mask, dz * f, 0.0), axis=0)
                sum_db += tl.sum(tl.where(mask, dz, 0.0), axis=0)
                sum_dalpha += tl.sum(tl.where(mask, go * (x - y), 0.0), axis=0)
            if NEED_DF:
                tl.store(df_ptr + pid_b * sdf_b + rows * sdf_p + cols * sdf_c, (dz * av).to(df_ptr.dtype.element_ty),
                         mask=mask)
            if NEED_DG:
                tl.store(dg_ptr + pid_b * sdg_b + rows * sdg_p + cols * sdg_c, (gate * dy).to(dg_ptr.dtype.element_ty),
                         mask=mask)
            if NEED_DH:
                tl.store(dh_ptr + pid_b * sdh_b + rows * sdh_p + cols * sdh_c,
                         ((1.0 - gate) * dy).to(dh_ptr.dtype.element_ty), mask=mask)
            if NEED_DX:
                tl.store(dx_ptr + pid_b * sdx_b + rows * sdx_p + cols * sdx_c, (alpha * go).to(dx_ptr.dtype.element_ty),
                         mask=mask)
        if NEED_PARAMS:
            store_parameter_partials(part_ptr, pid_p, tl.cdiv(P, BLOCK_P * TILES), pid_b, B, C, ns, n_mask,
                                     sum_da, sum_db, sum_dalpha, alpha_c, softplus(rho), rho, tv)


def _allocate_out(x, a, b, rho, t, residual, dtype):
    """out in the reference's dtype: f, g and h are in ``dtype`` (the conv's)."""
    return _tensors.empty_activation(x, torch.promote_types(dtype, _tensors.result_dtype(x, a, b, rho, t, residual)))


def _allocate_grads(backbone, x, dtype, needs):
    """d f, d g, d h in ``dtype`` (f, g and h's) and backbone's memory format, d x like x; empty
    where not needed."""
    return [_tensors.empty_activation(like, dt) if need else like.new_empty(0)
            for like, dt, need in zip((backbone,) * 3 + (x,), (dtype,) * 3 + (x.dtype,), needs)]


def _head_args(backbone, g_hidden, h_hidden, heads, dtype, device):
    """The heads' part of both kernels' arguments: (pointers, strides, constexprs)."""
    flat, strides = _tensors.flat_all(backbone, g_hidden, h_hidden)
    pointers = [*flat, *(t for w, bias in heads for t in (w, w if bias is None else bias))]
    C = backbone.shape[1]
    conv, dot, acc = dot_dtypes(dtype, device)
    constexprs = dict(C=C, HAS_BF=heads[0][1] is not None, HAS_BG=heads[1][1] is not None,
                      HAS_BH=heads[2][1] is not None, CONV=conv, DOT=dot, ACC=acc,
                      BLOCK_N=max(16, min(_tensors.next_power_of_2(C), _MAX_BLOCK_N)),
                      BLOCK_K=max(16, min(_tensors.next_power_of_2(C), _MAX_BLOCK_K)))
    head_strides = [s for w, bias in heads for s in (*w.stride()[:2], 0 if bias is None else bias.stride(0))]
    return pointers, [*(s for st in strides for s in st), *head_strides], constexprs


def _gate_args(a, b, rho, t):
    return [a, b, rho, t], [*a.stride(), *b.stride(), rho.stride(0), t.stride(0)]


@_tensors.launches_on_input_device
def _forward_kernels(
    backbone: torch.Tensor, g_hidden: torch.Tensor, h_hidden: torch.Tensor,
    f_weight: torch.Tensor, f_bias: typing.Optional[torch.Tensor],
    g_weight: torch.Tensor, g_bias: typing.Optional[torch.Tensor],
    h_weight: torch.Tensor, h_bias: typing.Optional[torch.Tensor],
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor,
    residual: typing.Optional[torch.Tensor], dtype: torch.dtype,
) -> torch.Tensor:
    out = _allocate_out(x, a, b, rho, t, residual, dtype)
    B, C, H, W = x.shape
    pointers, strides, constexprs = _head_args(
        backbone, g_hidden, h_hidden, ((f_weight, f_bias), (g_weight, g_bias), (h_weight, h_bias)), dtype, x.device)
    gate, gate_strides = _gate_args(a, b, rho, t)
    (xf, outf), (sx, so) = _tensors.flat_all(x, out)
    res, sr = (x, (0, 0, 0)) if residual is None else _tensors.flat_pixels(residual)
    programs = _tensors.cdiv(C, constexprs["BLOCK_N"]) * _tensors.cdiv(H * W, _BLOCK_P)
    _tensors.launch_over_batch(
        _cfc_heads_relax_kernel, (programs, 1), B,
        *pointers, xf, res, *gate, outf, H * W, *strides, *sx, *sr, *so, *gate_strides,
        HAS_RESIDUAL=residual is not None, COMPUTE=_tensors.compute_dtype(backbone, x, a, b, rho, t, residual),
        WIDE=_tensors.wide_offsets(*pointers[:3], xf, res, outf), BLOCK_P=_BLOCK_P, num_warps=_WARPS,
        **constexprs, **_tensors.COMPILE_OPTIONS,
    )
    return out


_forward_op = torch.library.custom_op("liquiddiff::cfc_heads_relax", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(backbone, g_hidden, h_hidden, f_weight, f_bias, g_weight, g_bias, h_weight, h_bias, x, a, b, rho, t,
      residual, dtype):
    return _allocate_out(x, a, b, rho, t, residual, dtype)


@_tensors.launches_on_input_device
def _backward_kernels(
    grad_out: torch.Tensor, backbone: torch.Tensor, g_hidden: torch.Tensor, h_hidden: torch.Tensor,
    f_weight: torch.Tensor, f_bias: typing.Optional[torch.Tensor],
    g_weight: torch.Tensor, g_bias: typing.Optional[torch.Tensor],
    h_weight: torch.Tensor, h_bias: typing.Optional[torch.Tensor],
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor,
    dtype: torch.dtype, needs: typing.Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(df, dg, dh, dx, d(a, b), drho, dt) as the CfC kernel's backward op returns them
    (cfc_relax.py), f, g and h remade in registers; ``needs``: 8 flags, df .. dt."""
    grads = _allocate_grads(backbone, x, dtype, needs)
    need_params = any(needs[4:])
    B, C, H, W = x.shape
    P = H * W
    pointers, strides, constexprs = _head_args(
        backbone, g_hidden, h_hidden, ((f_weight, f_bias), (g_weight, g_bias), (h_weight, h_bias)), dtype, x.device)
    gate, gate_strides = _gate_args(a, b, rho, t)
    (go, xf), (sgo, sx) = _tensors.flat_all(grad_out, x)
    # A skipped gradient is passed as x (never touched), with zero strides.
    d_args, d_strides = [], []
    for grad, need in zip(grads, needs):
        d_args.append(grad if need else xf)
        d_strides.extend(_tensors.flat_pixels(grad)[1] if need else (0, 0, 0))
    compute, part_dtype = _tensors.compute_dtypes(grad_out, backbone, x, a, b, rho, t)
    block_n = constexprs["BLOCK_N"]
    tiles = _tensors.tiles_per_program(C, P, B, block_n, _BWD_BLOCK_P, _BWD_MAX_TILES, _BWD_MIN_PROGRAMS)
    pixel_programs = _tensors.cdiv(P, _BWD_BLOCK_P * tiles)
    partials = _tensors.empty_buffer((4, pixel_programs, B, C), part_dtype, x.device) if need_params else xf
    _tensors.launch_over_batch(
        _cfc_heads_relax_bwd_kernel, (_tensors.cdiv(C, block_n) * pixel_programs, 1), B,
        go, *pointers, xf, *gate, *d_args, partials, B, P, *sgo, *strides, *sx, *d_strides, *gate_strides,
        NEED_DF=needs[0], NEED_DG=needs[1], NEED_DH=needs[2], NEED_DX=needs[3], NEED_PARAMS=need_params,
        COMPUTE=compute, WIDE=_tensors.wide_offsets(go, *pointers[:3], xf, *d_args), BLOCK_P=_BWD_BLOCK_P,
        TILES=tiles, num_warps=_BWD_WARPS, **constexprs,
        **_tensors.COMPILE_OPTIONS,
    )
    return (*grads, *reduce_parameter_partials(partials, a, b, rho, t, needs))


_backward_op = torch.library.custom_op("liquiddiff::cfc_heads_relax_backward", mutates_args=())(_backward_kernels)


@_backward_op.register_fake
def _(grad_out, backbone, g_hidden, h_hidden, f_weight, f_bias, g_weight, g_bias, h_weight, h_bias, x, a, b, rho, t,
      dtype, needs):
    part_dtype = _tensors.compute_dtypes(grad_out, backbone, x, a, b, rho, t)[1]
    return (*_allocate_grads(backbone, x, dtype, needs), *fake_parameter_grads(a, b, rho, t, needs, part_dtype))


def _flat_heads(heads) -> list:
    (f_weight, f_bias), (g_weight, g_bias), (h_weight, h_bias) = heads
    return [f_weight, f_bias, g_weight, g_bias, h_weight, h_bias]


def forward(backbone, g_hidden, h_hidden, heads, x, a, b, rho, t, residual, dtype: torch.dtype) -> torch.Tensor:
    """:func:`liquiddiff.functional.cfc_heads_relax`, with ``heads`` ((weight, bias) of f_proj,
    g_pw and h_pw) as the convs run them, in ``dtype``. No autograd: the caller's
    autograd.Function (``parallel_cfc.py``) calls :func:`backward`. Arguments as it checked them."""
    op = _forward_op if _eager.needs_custom_op(x) else _forward_kernels
    return op(backbone, g_hidden, h_hidden, *_flat_heads(heads), x, a, b, rho, t, residual, dtype)


def backward(grad_out, backbone, g_hidden, h_hidden, heads, x, a, b, rho, t, dtype: torch.dtype,
             needs: typing.Sequence[bool]) -> list:
    """[df, dg, dh, dx, da, db, drho, dt] of :func:`forward` without its residual (whose gradient
    is grad_out), as ``cfc_relax.backward`` returns them for f, g and h; None where ``needs``
    (8 flags) says so. f, g and h are remade in registers, never written."""
    op = _backward_op if _eager.needs_custom_op(x) else _backward_kernels
    grads = op(grad_out, backbone, g_hidden, h_hidden, *_flat_heads(heads), x, a, b, rho, t, dtype, list(needs))
    return unpack_grads(grads, a, b, needs)

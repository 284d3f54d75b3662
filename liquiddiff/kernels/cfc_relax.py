"""Fused CfC time gate + liquid relaxation (DESIGN.md section 1), forward and backward in Triton.

Computes, per batch item b, channel c and pixel p:

    gate  = sigmoid(a[b,c] * f - b[b,c])
    y     = gate * g + (1 - gate) * h
    alpha = exp(-softplus(rho[c]) * |t[b]|)        (in-kernel, once per program and channel)
    out   = alpha * x + (1 - alpha) * y (+ residual)

Memory moved per activation element (the [B, C] and [C] parameters are noise): the forward reads
f, g, h, x (+ residual) and writes out, 5 (6) tensors: 10 (12) bytes in bf16; asked for the
spatial mix's inputs (``forward(copy_dtype=)``), also out's bf16 copy (2 bytes more) and its
per-channel sums as [B, C] partials per program, where a pass of their own read out back. x may
be remade from the residual whose AdaLN it is (``normalization=``: its [B, H*W] mean and rstd and
[B, C] scale and shift) and not read: the forward reads 4 bytes less in fp32 (it loads the
residual anyway), the backward reads the residual in x's place. The backward
recomputes the gate from the saved inputs, reads grad_out, f, g, h, x and writes df, dg, dh, dx,
9 tensors: 18 bytes in bf16; d(residual) is grad_out itself. The parameter gradients leave the
kernel as per-program partial sums over pixels (four [B, C] values per program, fp32 or fp64)
that torch adds up: deterministic, no atomics.

Layout: every [B, C, H, W] tensor is read through its strides as [B, C, H*W]
(``_tensors.flat_pixels``), so NCHW, channels_last, channel slices and mixes of them run without a
copy. A program owns a [BLOCK_C, BLOCK_P] tile of one batch item (a backward program, several
tiles along the pixels). Triton specialises strides equal
to 1, so the same kernel issues vector loads along pixels (NCHW) or along channels
(channels_last); the tile shape is picked for the layout of ``x``, whose layout the output takes.
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

__all__ = ["cfc_relax", "forward", "backward", "check_gate_parameters"]

# Tile sizes, measured on an H200 (bf16, [8, 64, 256, 256]). The forward streams 4096-element
# tiles at the copy bandwidth. The backward holds five input tiles and three accumulators live and
# is register-bound: at 16 elements per thread ncu showed 200 registers/thread and one block per
# SM, so it takes 1024-element tiles at 8 elements per thread and walks up to 16 of them per
# program, which also keeps the partial-sum buffer small. Measured (CUDA graph, floor = bytes /
# 4152 GB/s copy bandwidth): forward 0.080 ms NCHW, 0.085 channels_last (floor 0.081); backward
# 0.173 NCHW, 0.220 channels_last (floor 0.145).
# The channels_last backward is the exception: its [64 channels, pixels] tile also holds the
# per-channel gate parameters, and at 8 elements per thread the sm_90 compile takes 157
# registers (Triton 3.6, bf16; NCHW: 115), 12 resident warps per SM, which fits its 1.52x-floor
# time against NCHW's 1.19x. At 4 elements per thread it takes 96 (20 warps per SM,
# ``python -m benchmarks.kernel_resources``); not yet timed on a GPU.
_FWD_TILE = 4096
_BWD_TILE = 1024
_BWD_TILE_CHANNELS_LAST = 512
_BWD_PER_THREAD_CHANNELS_LAST = 4
_BWD_MAX_TILES = 16
# ...but a backward grid keeps at least this many programs while it can (small B * C, big H * W).
_BWD_MIN_PROGRAMS = 1024
if triton is not None:
    # torch's softplus switches to the identity above this (F.softplus default threshold).
    _SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


    @triton.jit
    def _softplus(r):
        # Thresholded like torch's; below it log1p(exp(r)) by Kahan's trick (no libdevice log1p in the
        # interpreter): log(u) * e / (u - 1) stays exact where 1 + e rounds, and is e itself once
        # 1 + e == 1, so very negative r gives exp(r), not 0 or a cancellation error. The clamps keep
        # the discarded branches free of overflow and 0 / 0.
        # A select, not tl.minimum: tl.minimum drops a NaN operand (fminf), so softplus(NaN)
        # would be ~20 and a NaN rho would vanish from alpha; r > T is False for NaN, so NaN stays.
        e = tl.exp(tl.where(r > _SOFTPLUS_THRESHOLD, _SOFTPLUS_THRESHOLD, r))
        u = 1.0 + e
        small = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        return tl.where(r > _SOFTPLUS_THRESHOLD, r, small)


    @triton.jit
    def relaxation_weight(rho, tv):
        """alpha = exp(-softplus(rho) * |t|) (also the CfC heads' kernel, cfc_heads.py)."""
        return tl.exp(-_softplus(rho) * tl.abs(tv))


    @triton.jit
    def store_parameter_partials(part_ptr, pid_p, programs_p, pid_b, B, C, cs, c_mask, sum_da, sum_db, sum_dalpha,
                                 alpha_c, softplus, rho, tv):
        """One program's partial sums of the gate parameters' gradients, [4, programs_p, B, C]:
        d a, d b, d rho, d t per channel, from its sums of dz * f, dz and go * (x - y)."""
        dalpha_alpha = sum_dalpha * alpha_c
        # Chain factors folded in here so torch only adds partials: d alpha / d rho and / d t.
        d_softplus = tl.where(rho > _SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(rho))
        sign_t = tl.where(tv > 0, 1.0, 0.0) - tl.where(tv < 0, 1.0, 0.0)
        stride_k = programs_p.to(tl.int64) * B * C  # the buffer may pass 2**31 elements
        part = part_ptr + (pid_p * B + pid_b) * C + cs
        tl.store(part, sum_da, mask=c_mask)
        tl.store(part + stride_k, -sum_db, mask=c_mask)
        tl.store(part + 2 * stride_k, dalpha_alpha * -tl.abs(tv) * d_softplus, mask=c_mask)
        tl.store(part + 3 * stride_k, dalpha_alpha * -softplus * sign_t, mask=c_mask)


    @triton.jit
    def normalized(res, mean_ptr, rstd_ptr, pid_b, P, ps, n_scale, n_shift, X_DTYPE: tl.constexpr,
                   COMPUTE: tl.constexpr):
        """x = AdaLN(res) from the AdaLN kernel's [B, P] statistics and (1 + scale, shift) [C, 1]:
        its own sequence of operations, rounded to X_DTYPE as it stores x, so the same x bit for
        bit in the interpreter (a GPU compile may contract a multiply-add into an FMA in one
        kernel only)."""
        p_mask = ps < P
        mean = tl.load(mean_ptr + pid_b * P + ps, mask=p_mask).to(COMPUTE)[None, :]
        rstd = tl.load(rstd_ptr + pid_b * P + ps, mask=p_mask).to(COMPUTE)[None, :]
        return ((res - mean) * rstd * n_scale + n_shift).to(X_DTYPE).to(COMPUTE)


    @triton.jit
    def relax(f, g, h, x, av, bv, alpha):
        """The gate and the relaxation, elementwise, before the residual."""
        gate = tl.sigmoid(av * f - bv)
        y = gate * g + (1.0 - gate) * h
        return alpha * x + (1.0 - alpha) * y


    @triton.jit
    def _cfc_relax_fwd_kernel(
        f_ptr, g_ptr, h_ptr, x_ptr, res_ptr, a_ptr, b_ptr, rho_ptr, t_ptr, out_ptr, copy_ptr, part_ptr,
        mean_ptr, rstd_ptr, nscale_ptr, nshift_ptr,
        B, C, P,
        sf_b, sf_c, sf_p, sg_b, sg_c, sg_p, sh_b, sh_c, sh_p, sx_b, sx_c, sx_p,
        sr_b, sr_c, sr_p, so_b, so_c, so_p, sc_b, sc_c, sc_p,
        sa_b, sa_c, sb_b, sb_c, s_rho, s_t, sns_b, sns_c, snh_b, snh_c, batch_start,
        HAS_RESIDUAL: tl.constexpr, HAS_COPY: tl.constexpr, X_NORMALIZED: tl.constexpr, X_DTYPE: tl.constexpr,
        COMPUTE: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # HAS_COPY: also out in copy_ptr's dtype (the spatial mix's conv input) and the program's
        # per-channel sums of out as stored, [programs_p, B, C] partials (its pixel sum).
        # X_NORMALIZED: x is not loaded but remade from the residual, whose AdaLN it is (the
        # block's n = AdaLN(u), u the residual): x = (res - mean) * rstd * (1 + scale) + shift
        # with AdaLN's [B, P] statistics and [B, C] modulation, rounded to X_DTYPE as the AdaLN
        # kernel stores it (adaln.normalize).
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        # int64 batch offset: B * C * H * W may pass 2**31 while one batch item does not (WIDE:
        # it does, and the channel and pixel offsets are int64 too).
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        if WIDE:
            cs, ps = cs.to(tl.int64), ps.to(tl.int64)
        c_mask = cs < C
        mask = c_mask[:, None] & (ps < P)[None, :]
        c_col = cs[:, None]
        p_row = ps[None, :]

        av = tl.load(a_ptr + pid_b * sa_b + cs * sa_c, mask=c_mask).to(COMPUTE)[:, None]
        bv = tl.load(b_ptr + pid_b * sb_b + cs * sb_c, mask=c_mask).to(COMPUTE)[:, None]
        rho = tl.load(rho_ptr + cs * s_rho, mask=c_mask).to(COMPUTE)
        tv = tl.load(t_ptr + pid_b * s_t).to(COMPUTE)
        alpha = relaxation_weight(rho, tv)[:, None]

        f = tl.load(f_ptr + pid_b * sf_b + c_col * sf_c + p_row * sf_p, mask=mask).to(COMPUTE)
        g = tl.load(g_ptr + pid_b * sg_b + c_col * sg_c + p_row * sg_p, mask=mask).to(COMPUTE)
        h = tl.load(h_ptr + pid_b * sh_b + c_col * sh_c + p_row * sh_p, mask=mask).to(COMPUTE)
        if X_NORMALIZED:  # with a residual: x is its AdaLN
            res = tl.load(res_ptr + pid_b * sr_b + c_col * sr_c + p_row * sr_p, mask=mask).to(COMPUTE)
            n_scale = 1.0 + tl.load(nscale_ptr + pid_b * sns_b + cs * sns_c, mask=c_mask).to(COMPUTE)[:, None]
            n_shift = tl.load(nshift_ptr + pid_b * snh_b + cs * snh_c, mask=c_mask).to(COMPUTE)[:, None]
            x = normalized(res, mean_ptr, rstd_ptr, pid_b, P, ps, n_scale, n_shift, X_DTYPE, COMPUTE)
        else:
            x = tl.load(x_ptr + pid_b * sx_b + c_col * sx_c + p_row * sx_p, mask=mask).to(COMPUTE)

        out = relax(f, g, h, x, av, bv, alpha)
        if HAS_RESIDUAL:
            if not X_NORMALIZED:  # loaded here, not before: one tile fewer live through relax
                res = tl.load(res_ptr + pid_b * sr_b + c_col * sr_c + p_row * sr_p, mask=mask).to(COMPUTE)
            out += res
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + pid_b * so_b + c_col * so_c + p_row * so_p, out, mask=mask)
        if HAS_COPY:
            tl.store(copy_ptr + pid_b * sc_b + c_col * sc_c + p_row * sc_p, out.to(copy_ptr.dtype.element_ty),
                     mask=mask)
            # Masked lanes hold garbage (an inf residual's 0 * inf): select, don't rely on zeros.
            pixel_sum = tl.sum(tl.where(mask, out.to(COMPUTE), 0.0), axis=1)
            tl.store(part_ptr + (pid_p * B + pid_b) * C + cs, pixel_sum.to(part_ptr.dtype.element_ty), mask=c_mask)


    @triton.jit
    def _cfc_relax_bwd_kernel(
        go_ptr, f_ptr, g_ptr, h_ptr, x_ptr, a_ptr, b_ptr, rho_ptr, t_ptr,
        df_ptr, dg_ptr, dh_ptr, dx_ptr, part_ptr, mean_ptr, rstd_ptr, nscale_ptr, nshift_ptr,
        B, C, P,
        sgo_b, sgo_c, sgo_p, sf_b, sf_c, sf_p, sg_b, sg_c, sg_p, sh_b, sh_c, sh_p,
        sx_b, sx_c, sx_p, sdf_b, sdf_c, sdf_p, sdg_b, sdg_c, sdg_p, sdh_b, sdh_c, sdh_p,
        sdx_b, sdx_c, sdx_p,
        sa_b, sa_c, sb_b, sb_c, s_rho, s_t, sns_b, sns_c, snh_b, snh_c, batch_start,
        NEED_DF: tl.constexpr, NEED_DG: tl.constexpr, NEED_DH: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_PARAMS: tl.constexpr, X_NORMALIZED: tl.constexpr, X_DTYPE: tl.constexpr,
        COMPUTE: tl.constexpr, WIDE: tl.constexpr, SPLIT_BATCH: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, TILES: tl.constexpr,
    ):
        # X_NORMALIZED: x_ptr is the residual whose AdaLN x is, remade as the forward remakes it.
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_b = _tensors.batch_item(2, batch_start, SPLIT_BATCH)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        if WIDE:
            cs = cs.to(tl.int64)
        c_mask = cs < C
        c_col = cs[:, None]

        av = tl.load(a_ptr + pid_b * sa_b + cs * sa_c, mask=c_mask).to(COMPUTE)[:, None]
        bv = tl.load(b_ptr + pid_b * sb_b + cs * sb_c, mask=c_mask).to(COMPUTE)[:, None]
        rho = tl.load(rho_ptr + cs * s_rho, mask=c_mask).to(COMPUTE)
        tv = tl.load(t_ptr + pid_b * s_t).to(COMPUTE)
        if X_NORMALIZED and NEED_PARAMS:
            n_scale = 1.0 + tl.load(nscale_ptr + pid_b * sns_b + cs * sns_c, mask=c_mask).to(COMPUTE)[:, None]
            n_shift = tl.load(nshift_ptr + pid_b * snh_b + cs * snh_c, mask=c_mask).to(COMPUTE)[:, None]
        softplus = _softplus(rho)
        alpha_c = tl.exp(-softplus * tl.abs(tv))
        alpha = alpha_c[:, None]

        # Accumulate whole tiles and reduce once at the end: one cross-thread reduction per program
        # instead of one per tile.
        acc_da = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        acc_db = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        acc_dalpha = tl.zeros([BLOCK_C, BLOCK_P], dtype=COMPUTE)
        for i in range(TILES):
            ps = (pid_p * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
            if WIDE:
                ps = ps.to(tl.int64)
            mask = c_mask[:, None] & (ps < P)[None, :]
            p_row = ps[None, :]
            # Every load is issued before the first store: the compiler cannot prove the outputs
            # don't alias the inputs, so a load after a store would cost another memory round trip.
            go = tl.load(go_ptr + pid_b * sgo_b + c_col * sgo_c + p_row * sgo_p, mask=mask).to(COMPUTE)
            f = tl.load(f_ptr + pid_b * sf_b + c_col * sf_c + p_row * sf_p, mask=mask).to(COMPUTE)
            if NEED_DF or NEED_PARAMS:
                g = tl.load(g_ptr + pid_b * sg_b + c_col * sg_c + p_row * sg_p, mask=mask).to(COMPUTE)
                h = tl.load(h_ptr + pid_b * sh_b + c_col * sh_c + p_row * sh_p, mask=mask).to(COMPUTE)
            if NEED_PARAMS:
                x = tl.load(x_ptr + pid_b * sx_b + c_col * sx_c + p_row * sx_p, mask=mask).to(COMPUTE)
                if X_NORMALIZED:
                    x = normalized(x, mean_ptr, rstd_ptr, pid_b, P, ps, n_scale, n_shift, X_DTYPE, COMPUTE)
            gate = tl.sigmoid(av * f - bv)
            dy = (1.0 - alpha) * go
            if NEED_DF or NEED_PARAMS:
                dz = dy * (g - h) * gate * (1.0 - gate)
            if NEED_PARAMS:
                y = gate * g + (1.0 - gate) * h
                # Masked lanes hold garbage (inf * 0 is NaN): select, don't rely on zeros.
                acc_da += tl.where(mask, dz * f, 0.0)
                acc_db += tl.where(mask, dz, 0.0)
                acc_dalpha += tl.where(mask, go * (x - y), 0.0)
            if NEED_DF:
                tl.store(df_ptr + pid_b * sdf_b + c_col * sdf_c + p_row * sdf_p,
                         (dz * av).to(df_ptr.dtype.element_ty), mask=mask)
            if NEED_DG:
                tl.store(dg_ptr + pid_b * sdg_b + c_col * sdg_c + p_row * sdg_p,
                         (gate * dy).to(dg_ptr.dtype.element_ty), mask=mask)
            if NEED_DH:
                tl.store(dh_ptr + pid_b * sdh_b + c_col * sdh_c + p_row * sdh_p,
                         ((1.0 - gate) * dy).to(dh_ptr.dtype.element_ty), mask=mask)
            if NEED_DX:
                tl.store(dx_ptr + pid_b * sdx_b + c_col * sdx_c + p_row * sdx_p,
                         (alpha * go).to(dx_ptr.dtype.element_ty), mask=mask)

        if NEED_PARAMS:
            store_parameter_partials(part_ptr, pid_p, tl.num_programs(0), pid_b, B, C, cs, c_mask,
                                     tl.sum(acc_da, axis=1), tl.sum(acc_db, axis=1), tl.sum(acc_dalpha, axis=1),
                                     alpha_c, softplus, rho, tv)


def _tile(C: int, P: int, x_strides: tuple[int, int, int], backward: bool):
    """(BLOCK_C, BLOCK_P, num_warps) for the layout of ``x`` (channel stride 1: channels_last)."""
    channels_last = x_strides[1] == 1 and C > 1
    elements = (_BWD_TILE_CHANNELS_LAST if channels_last else _BWD_TILE) if backward else _FWD_TILE
    # Elements per thread and tensor, as measured best: channels_last forward tiles run faster on
    # 4 warps than on 8.
    per_thread = (_BWD_PER_THREAD_CHANNELS_LAST if channels_last else 8) if backward else (32 if channels_last else 16)
    return _tensors.pixel_tile(C, P, channels_last, elements, per_thread)


def _bwd_tiles(C: int, P: int, B: int, block_c: int, block_p: int) -> int:
    """Pixel tiles per backward program."""
    return _tensors.tiles_per_program(C, P, B, block_c, block_p, _BWD_MAX_TILES, _BWD_MIN_PROGRAMS)


def _allocate_out(f, g, h, x, a, b, rho, t, residual, *normalization):
    """out, in x's layout; with ``normalization`` (x is the residual, whose AdaLN x is) in the
    dtype x = AdaLN(residual) would promote to."""
    return _tensors.empty_activation(x, _tensors.result_dtype(f, g, h, x, a, b, rho, t, residual, *normalization[2:]))


def normalized_dtype(residual, normalization) -> torch.dtype:
    """The dtype of x = AdaLN(residual) with ``normalization``'s scale and shift, as the AdaLN
    kernel stores it (``adaln.adaln_modulate``'s out)."""
    return _tensors.result_dtype(residual, *normalization[2:])


def _allocate_activation_grads(f, g, h, x, needs, x_dtype=None):
    """df, dg, dh, dx, each in its input's dtype (dx: ``x_dtype`` when given) and memory format;
    empty where not needed."""
    dtypes = (f.dtype, g.dtype, h.dtype, x_dtype or x.dtype)
    return [
        _tensors.empty_activation(tensor, dtype) if need else tensor.new_empty(0)
        for tensor, dtype, need in zip((f, g, h, x), dtypes, needs)
    ]


def _launch_forward(f, g, h, x, a, b, rho, t, residual, copy_dtype, normalization=None):
    """The forward kernel: out, and with ``copy_dtype`` (else None, None) out's copy in it and
    the [programs_p, B, C] partial pixel sums of out. With ``normalization`` (mean, rstd, scale,
    shift, from ``adaln.normalize``) x is None, remade from the residual in the kernel."""
    x_dtype = None
    if normalization is not None:
        x, x_dtype = residual, normalized_dtype(residual, normalization)
    out = _allocate_out(f, g, h, x, a, b, rho, t, residual, *normalization or ())
    B, C, H, W = x.shape
    P = H * W
    (f, g, h, x, _), (sf, sg, sh, sx, so) = _tensors.flat_all(f, g, h, x, out)
    if residual is None:
        res, sr = x, (0, 0, 0)
    else:
        res, sr = _tensors.flat_pixels(residual)
    compute, part_dtype = _tensors.compute_dtypes(f, g, h, x, a, b, rho, t, residual, *normalization or ())
    mean, rstd, n_scale, n_shift = normalization or (a,) * 4  # never read without X_NORMALIZED
    block_c, block_p, num_warps = _tile(C, P, sx, backward=False)
    pixel_programs = _tensors.cdiv(P, block_p)
    copy = partials = None
    if copy_dtype is not None:
        copy = _tensors.empty_activation(x, copy_dtype)
        partials = _tensors.empty_buffer((pixel_programs, B, C), part_dtype, x.device)
    _tensors.launch_over_batch(
        _cfc_relax_fwd_kernel, (pixel_programs, _tensors.cdiv(C, block_c)), B,
        f, g, h, x, res, a, b, rho, t, out, out if copy is None else copy, out if partials is None else partials,
        mean, rstd, n_scale, n_shift,
        B, C, P,
        *sf, *sg, *sh, *sx, *sr, *so, *(so if copy is None else _tensors.flat_pixels(copy)[1]),
        *a.stride(), *b.stride(), rho.stride(0), t.stride(0), *n_scale.stride(), *n_shift.stride(),
        HAS_RESIDUAL=residual is not None, HAS_COPY=copy is not None, X_NORMALIZED=normalization is not None,
        X_DTYPE=_tensors.tl_dtype(x_dtype or x.dtype), COMPUTE=compute,
        WIDE=_tensors.wide_offsets(f, g, h, x, res, out, copy),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps, **_tensors.COMPILE_OPTIONS,
    )
    return out, copy, partials


@_tensors.launches_on_input_device
def _forward_kernels(
    f: torch.Tensor, g: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor,
    residual: typing.Optional[torch.Tensor],
) -> torch.Tensor:
    return _launch_forward(f, g, h, x, a, b, rho, t, residual, None)[0]


@_tensors.launches_on_input_device
def _forward_with_copy_kernels(
    f: torch.Tensor, g: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor,
    residual: typing.Optional[torch.Tensor], copy_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, copy, partials = _launch_forward(f, g, h, x, a, b, rho, t, residual, copy_dtype)
    return out, copy, partials.sum(0).to(out.dtype)


@_tensors.launches_on_input_device
def _forward_normalized_kernels(
    f: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor, residual: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, copy_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, copy, partials = _launch_forward(f, g, h, None, a, b, rho, t, residual, copy_dtype,
                                          (mean, rstd, scale, shift))
    return out, copy, partials.sum(0).to(out.dtype)


_cfc_relax_op = torch.library.custom_op("liquiddiff::cfc_relax", mutates_args=())(_forward_kernels)
_cfc_relax_with_copy_op = torch.library.custom_op("liquiddiff::cfc_relax_with_copy", mutates_args=())(
    _forward_with_copy_kernels)
_cfc_relax_normalized_op = torch.library.custom_op("liquiddiff::cfc_relax_normalized", mutates_args=())(
    _forward_normalized_kernels)


@_cfc_relax_op.register_fake
def _(f, g, h, x, a, b, rho, t, residual):
    return _allocate_out(f, g, h, x, a, b, rho, t, residual)


@_cfc_relax_with_copy_op.register_fake
def _(f, g, h, x, a, b, rho, t, residual, copy_dtype):
    out = _allocate_out(f, g, h, x, a, b, rho, t, residual)
    return out, _tensors.empty_activation(x, copy_dtype), out.new_empty(x.shape[:2])


@_cfc_relax_normalized_op.register_fake
def _(f, g, h, a, b, rho, t, residual, mean, rstd, scale, shift, copy_dtype):
    out = _allocate_out(f, g, h, residual, a, b, rho, t, residual, mean, rstd, scale, shift)
    return out, _tensors.empty_activation(residual, copy_dtype), out.new_empty(residual.shape[:2])


def _launch_backward(grad_out, f, g, h, x, a, b, rho, t, needs, normalization=None):
    """(df, dg, dh, dx, d(a, b), drho, dt): d(a, b) is da and db stacked [2, B, C], one
    reduction and one cast (``_tensors.stacked_dtype``); ``needs`` (8 flags, for df .. dt)
    skips work, and a skipped gradient comes back as an empty tensor. With ``normalization``
    (residual, mean, rstd, scale, shift) x is None, remade from the residual as the forward
    remakes it, and dx is in its dtype."""
    x_dtype = None
    if normalization is not None:
        x, normalization = normalization[0], normalization[1:]
        x_dtype = normalized_dtype(x, normalization)
    df, dg, dh, dx = _allocate_activation_grads(f, g, h, x, needs, x_dtype)
    need_params = any(needs[4:])
    B, C, H, W = x.shape
    P = H * W
    (go, f, g, h, x), (sgo, sf, sg, sh, sx) = _tensors.flat_all(grad_out, f, g, h, x)
    # A skipped gradient is passed as its (never touched) input, with zero strides.
    d_args, d_strides = [], []
    for grad, tensor, need in zip((df, dg, dh, dx), (f, g, h, x), needs):
        d_args.append(grad if need else tensor)
        d_strides.extend(_tensors.flat_pixels(grad)[1] if need else (0, 0, 0))
    compute, part_dtype = _tensors.compute_dtypes(go, f, g, h, x, a, b, rho, t, *normalization or ())
    block_c, block_p, num_warps = _tile(C, P, sx, backward=True)
    tiles = _bwd_tiles(C, P, B, block_c, block_p)
    pixel_programs = _tensors.cdiv(P, block_p * tiles)
    partials = _tensors.empty_buffer((4, pixel_programs, B, C), part_dtype, x.device) if need_params else x
    mean, rstd, n_scale, n_shift = normalization or (a,) * 4  # never read without X_NORMALIZED
    _tensors.launch_over_batch(
        _cfc_relax_bwd_kernel, (pixel_programs, _tensors.cdiv(C, block_c)), B,
        go, f, g, h, x, a, b, rho, t, *d_args, partials, mean, rstd, n_scale, n_shift,
        B, C, P,
        *sgo, *sf, *sg, *sh, *sx, *d_strides,
        *a.stride(), *b.stride(), rho.stride(0), t.stride(0), *n_scale.stride(), *n_shift.stride(),
        NEED_DF=needs[0], NEED_DG=needs[1], NEED_DH=needs[2], NEED_DX=needs[3],
        NEED_PARAMS=need_params, X_NORMALIZED=normalization is not None,
        X_DTYPE=_tensors.tl_dtype(x_dtype or x.dtype), COMPUTE=compute,
        WIDE=_tensors.wide_offsets(go, f, g, h, x, *d_args),
        BLOCK_C=block_c, BLOCK_P=block_p, TILES=tiles, num_warps=num_warps,
        **_tensors.COMPILE_OPTIONS,
    )
    return (df, dg, dh, dx, *reduce_parameter_partials(partials, a, b, rho, t, needs))


@_tensors.launches_on_input_device
def _backward_kernels(
    grad_out: torch.Tensor, f: torch.Tensor, g: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor,
    needs: typing.Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, f, g, h, x, a, b, rho, t, needs)


@_tensors.launches_on_input_device
def _backward_normalized_kernels(
    grad_out: torch.Tensor, f: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor, t: torch.Tensor, residual: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    needs: typing.Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(grad_out, f, g, h, None, a, b, rho, t, needs, (residual, mean, rstd, scale, shift))


def reduce_parameter_partials(partials, a, b, rho, t, needs: typing.Sequence[bool]) -> tuple:
    """(d(a, b) stacked [2, B, C], d rho, d t) from the kernels' [4, programs, B, C] partials
    (``store_parameter_partials``); an empty tensor where ``needs[4:]`` says so."""
    # Fresh reductions (custom-op outputs may not alias one another); .to is free when the
    # parameter is already in the partials' dtype.
    dab, drho, dt = (tensor.new_empty(0) for tensor in (a, rho, t))
    if needs[4] or needs[5]:
        dab = partials[:2].sum(1).to(_tensors.stacked_dtype(partials.dtype, (a.dtype, b.dtype)))
    if needs[6]:
        drho = partials[2].sum((0, 1)).to(rho.dtype)
    if needs[7]:
        dt = partials[3].sum((0, 2)).to(t.dtype)
    return dab, drho, dt


def unpack_grads(grads, a, b, needs: typing.Sequence[bool]) -> list:
    """The backward op's results as [df, dg, dh, dx, da, db, drho, dt], None where not needed;
    da and db cast from their stack, once when they share a dtype (a and b from one Linear)."""
    df, dg, dh, dx, dab, drho, dt = grads
    da, db = _tensors.unstack_grads(dab, (a.dtype if needs[4] else None, b.dtype if needs[5] else None))
    return [d if need else None for d, need in zip((df, dg, dh, dx, da, db, drho, dt), needs)]


_cfc_relax_backward_op = torch.library.custom_op("liquiddiff::cfc_relax_backward", mutates_args=())(
    _backward_kernels
)
_cfc_relax_normalized_backward_op = torch.library.custom_op("liquiddiff::cfc_relax_normalized_backward",
                                                            mutates_args=())(_backward_normalized_kernels)


@_cfc_relax_backward_op.register_fake
def _(grad_out, f, g, h, x, a, b, rho, t, needs):
    # Parameter grads are fresh contiguous reductions in the real op.
    part_dtype = _tensors.compute_dtypes(grad_out, f, g, h, x, a, b, rho, t)[1]
    return (*_allocate_activation_grads(f, g, h, x, needs), *fake_parameter_grads(a, b, rho, t, needs, part_dtype))


@_cfc_relax_normalized_backward_op.register_fake
def _(grad_out, f, g, h, a, b, rho, t, residual, mean, rstd, scale, shift, needs):
    part_dtype = _tensors.compute_dtypes(grad_out, f, g, h, residual, a, b, rho, t, mean, rstd, scale, shift)[1]
    x_dtype = normalized_dtype(residual, (mean, rstd, scale, shift))
    return (*_allocate_activation_grads(f, g, h, residual, needs, x_dtype),
            *fake_parameter_grads(a, b, rho, t, needs, part_dtype))


def fake_parameter_grads(a, b, rho, t, needs: typing.Sequence[bool], part_dtype: torch.dtype) -> tuple:
    """What :func:`reduce_parameter_partials` returns, for a fake kernel."""
    return (a.new_empty((2, *a.shape), dtype=_tensors.stacked_dtype(part_dtype, (a.dtype, b.dtype)))
            if needs[4] or needs[5] else a.new_empty(0),
            *(p.new_empty(p.shape if need else (0,)) for p, need in zip((rho, t), needs[6:])))


def _setup_context(ctx, inputs, output):
    f, g, h, x, a, b, rho, t, residual = inputs
    ctx.save_for_backward(f, g, h, x, a, b, rho, t)
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, grad_out, launch=_cfc_relax_backward_op):
    needs = list(ctx.needs_input_grad)
    grads = [None] * 9
    if any(needs[:8]):
        saved = ctx.saved_tensors
        grads[:8] = unpack_grads(launch(grad_out, *saved, needs[:8]), saved[4], saved[5], needs[:8])
    if needs[8]:
        grads[8] = grad_out.to(ctx.residual_dtype)
    return tuple(grads)


_cfc_relax_op.register_autograd(_backward, setup_context=_setup_context)
_EagerCfcRelax = _eager.eager_function(
    "_EagerCfcRelax", _forward_kernels, _setup_context,
    lambda ctx, grad_out: _backward(ctx, grad_out, launch=_backward_kernels),
)


def check_gate_parameters(like: torch.Tensor, a, b, rho, t) -> None:
    """a, b: [B, C]; rho: [C]; t: [B], for activations shaped and placed like ``like``."""
    B, C = like.shape[:2]
    _tensors.check_vector("a", a, (B, C), like.device)
    _tensors.check_vector("b", b, (B, C), like.device)
    _tensors.check_vector("rho", rho, (C,), like.device)
    _tensors.check_vector("t", t, (B,), like.device)


def cfc_relax(f, g, h, x, a, b, rho, t, residual=None):
    """Fused :func:`liquiddiff.functional.cfc_relax` (same signature, value and gradients)."""
    _tensors.check_activation("f", f)
    for name, tensor in (("g", g), ("h", h), ("x", x)):
        _tensors.check_activation(name, tensor, like=f)
    if residual is not None:
        _tensors.check_activation("residual", residual, like=f)
    check_gate_parameters(f, a, b, rho, t)
    if not runtime.use_triton("cfc_relax", f.device.type):
        return functional.cfc_relax(f, g, h, x, a, b, rho, t, residual=residual)
    if _eager.needs_custom_op(f):
        return _cfc_relax_op(f, g, h, x, a, b, rho, t, residual)
    return _EagerCfcRelax.apply(f, g, h, x, a, b, rho, t, residual)


def forward(f, g, h, x, a, b, rho, t, residual=None, copy_dtype=None, normalization=None):
    """The forward kernel alone, no autograd node (inside a caller's autograd.Function, which
    calls :func:`backward`); the custom op when traced. Arguments as checked by :func:`cfc_relax`.
    ``copy_dtype``: returns (out, out in ``copy_dtype``, out summed over its pixels in out's dtype,
    from fp32 (fp64) per-program partials), written in the same pass: the spatial mix's inputs,
    which ``modulated_silu.cast_with_pixel_sum`` would make by reading out back.

    ``normalization`` (mean, rstd, scale, shift; with ``copy_dtype`` and ``residual``): x is
    AdaLN(residual) with these statistics (``adaln.normalize``); the kernel remakes x from the
    residual it loads anyway, and ``x`` is not read (the fused block has only n's copy in the
    convolutions' dtype: ``parallel_cfc.normalized_parallel_cfc``)."""
    if normalization is not None:
        op = _cfc_relax_normalized_op if _eager.needs_custom_op(f) else _forward_normalized_kernels
        return op(f, g, h, a, b, rho, t, residual, *normalization, copy_dtype)
    if copy_dtype is None:
        op = _cfc_relax_op if _eager.needs_custom_op(f) else _forward_kernels
        return op(f, g, h, x, a, b, rho, t, residual)
    op = _cfc_relax_with_copy_op if _eager.needs_custom_op(f) else _forward_with_copy_kernels
    return op(f, g, h, x, a, b, rho, t, residual, copy_dtype)


def backward(grad_out, f, g, h, x, a, b, rho, t, needs: typing.Sequence[bool], normalization=None) -> list:
    """(df, dg, dh, dx, da, db, drho, dt) of :func:`forward` (without residual: its gradient is
    grad_out); None where ``needs`` (8 flags) says so. ``normalization`` (residual, mean, rstd,
    scale, shift): x remade as :func:`forward` remakes it from the residual (``x`` not read), dx
    in x's exact dtype."""
    if normalization is not None:
        op = _cfc_relax_normalized_backward_op if _eager.needs_custom_op(f) else _backward_normalized_kernels
        return unpack_grads(op(grad_out, f, g, h, a, b, rho, t, *normalization, list(needs)), a, b, needs)
    op = _cfc_relax_backward_op if _eager.needs_custom_op(f) else _backward_kernels
    return unpack_grads(op(grad_out, f, g, h, x, a, b, rho, t, list(needs)), a, b, needs)

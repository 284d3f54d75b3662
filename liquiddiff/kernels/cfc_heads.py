""":func:`liquiddiff.functional.cfc_heads_relax` in Triton, forward: the CfC's three 1x1 heads
and its gate + relaxation in one kernel, f, g and h never leaving registers.

    f = round(backbone @ W_f + b_f);   g = round(silu(g_hidden) @ W_g + b_g);   h likewise
    out = alpha * x + (1 - alpha) * (gate * g + (1 - gate) * h) (+ residual),
    gate = sigmoid(a * f - b),   alpha = exp(-softplus(rho) * |t|)

Memory moved per activation element: reads backbone, g_hidden and h_hidden (6 bytes in bf16), x
and the residual (8 bytes in the model's fp32 residual stream), writes out (4 bytes): 18 bytes,
where the three 1x1 convolutions and the CfC kernel move 30 (f, g and h written in bf16 and read
back; the two heads' SiLU already in the pointwise kernels' prologue). Where C is above one
output-channel block, the head inputs are read once per block; the grid runs a pixel tile's
blocks next to one another, so the repeats come from L2.

Rounding as the reference: f, g and h accumulate in fp32 (``input_precision="ieee"``) and are
rounded to the conv's dtype, as cuDNN writes them; the gate and relaxation then run in fp32
(fp64 for fp64), as the CfC kernel's do. Within bf16 rounding of the reference, not bitwise (the
order of the sums).

Forward only, for ``kernels/parallel_cfc.py``'s forward when the opt-in pointwise kernels are on
(``LIQUIDDIFF_KERNELS=auto,pointwise_conv=triton``): its backward remakes f, g and h and runs
the CfC and pointwise backward kernels.

Layout: [B, C, H*W] through strides (``_tensors.flat_pixels``), channels_last and NCHW without a
copy; out takes x's memory format. A program owns a [pixels, output channels] tile of one batch
item and computes its three heads over all C input channels, in K blocks.
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors
from .pointwise_conv import dot_dtypes

__all__ = ["forward"]

# Tiles chosen without a GPU (``benchmarks.tune_kernels`` sweeps them): three fp32 head tiles are
# live at once. sm_90, Triton 3.9 (``benchmarks.kernel_resources``): [32, 64] tiles on 8 warps take
# 60 registers a thread (4 blocks per SM), [64, 64] 128 (2 blocks).
_BLOCK_P = 32
_MAX_BLOCK_N = 64
_MAX_BLOCK_K = 32
_WARPS = 8


if triton is not None:
    from .cfc_relax import relax, relaxation_weight
    from .pointwise_conv import silu_conv1x1_tile

    @triton.jit
    def _cfc_heads_relax_kernel(
        bb_ptr, gh_ptr, hh_ptr, wf_ptr, bf_ptr, wg_ptr, bg_ptr, wh_ptr, bh_ptr,
        x_ptr, res_ptr, a_ptr, b_ptr, rho_ptr, t_ptr, out_ptr, P,
        sbb_b, sbb_k, sbb_p, sgh_b, sgh_k, sgh_p, shh_b, shh_k, shh_p,
        swf_n, swf_k, swg_n, swg_k, swh_n, swh_k,
        sx_b, sx_c, sx_p, sr_b, sr_c, sr_p, so_b, so_c, so_p, sa_b, sa_c, sb_b, sb_c, s_rho, s_t,
        C: tl.constexpr, HAS_BF: tl.constexpr, HAS_BG: tl.constexpr, HAS_BH: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
        COMPUTE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Output-channel blocks on axis 0: a pixel tile's blocks run together and share its inputs in L2.
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        # int64 batch and pixel offsets: B * C * H * W may pass 2**31.
        pid_b = tl.program_id(2).to(tl.int64)
        p_mask, n_mask = ps < P, ns < C
        rows = ps.to(tl.int64)[:, None]
        cols = ns[None, :]
        # The heads, each rounded to the conv's dtype as cuDNN writes it (no modulation: the
        # scale and shift arguments are never read).
        f = silu_conv1x1_tile(bb_ptr, wf_ptr, bf_ptr, bb_ptr, bb_ptr, pid_b, rows, p_mask, ns, n_mask,
                              sbb_b, sbb_k, sbb_p, swf_n, swf_k, 0, 0, 0, 0, C, HAS_BF, False, False,
                              CONV, DOT, ACC, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
        g = silu_conv1x1_tile(gh_ptr, wg_ptr, bg_ptr, gh_ptr, gh_ptr, pid_b, rows, p_mask, ns, n_mask,
                              sgh_b, sgh_k, sgh_p, swg_n, swg_k, 0, 0, 0, 0, C, HAS_BG, False, True,
                              CONV, DOT, ACC, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
        h = silu_conv1x1_tile(hh_ptr, wh_ptr, bh_ptr, hh_ptr, hh_ptr, pid_b, rows, p_mask, ns, n_mask,
                              shh_b, shh_k, shh_p, swh_n, swh_k, 0, 0, 0, 0, C, HAS_BH, False, True,
                              CONV, DOT, ACC, BLOCK_P, BLOCK_N, BLOCK_K).to(CONV).to(COMPUTE)
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


def _allocate_out(x, a, b, rho, t, residual, dtype):
    """out in the reference's dtype: f, g and h are in ``dtype`` (the conv's)."""
    return _tensors.empty_activation(x, torch.promote_types(dtype, _tensors.result_dtype(x, a, b, rho, t, residual)))


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
    P = H * W
    flat, strides = _tensors.flat_all(backbone, g_hidden, h_hidden, x, out)
    res, sr = (x, (0, 0, 0)) if residual is None else _tensors.flat_pixels(residual)
    block_n = max(16, min(_tensors.next_power_of_2(C), _MAX_BLOCK_N))
    block_k = max(16, min(_tensors.next_power_of_2(C), _MAX_BLOCK_K))
    conv, dot, acc = dot_dtypes(dtype, x.device)
    weights = (f_weight, g_weight, h_weight)
    biases = [w if bias is None else bias for w, bias in zip(weights, (f_bias, g_bias, h_bias))]
    grid = (_tensors.cdiv(C, block_n), _tensors.cdiv(P, _BLOCK_P), B)
    _cfc_heads_relax_kernel[grid](
        *flat[:3], f_weight, biases[0], g_weight, biases[1], h_weight, biases[2],
        flat[3], res, a, b, rho, t, flat[4], P,
        *strides[0], *strides[1], *strides[2], *(s for w in weights for s in w.stride()[:2]),
        *strides[3], *sr, *strides[4], *a.stride(), *b.stride(), rho.stride(0), t.stride(0),
        C=C, HAS_BF=f_bias is not None, HAS_BG=g_bias is not None, HAS_BH=h_bias is not None,
        HAS_RESIDUAL=residual is not None, CONV=conv, DOT=dot, ACC=acc,
        COMPUTE=_tensors.compute_dtype(backbone, x, a, b, rho, t, residual),
        BLOCK_P=_BLOCK_P, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_WARPS,
    )
    return out


_forward_op = torch.library.custom_op("liquiddiff::cfc_heads_relax", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(backbone, g_hidden, h_hidden, f_weight, f_bias, g_weight, g_bias, h_weight, h_bias, x, a, b, rho, t,
      residual, dtype):
    return _allocate_out(x, a, b, rho, t, residual, dtype)


def forward(backbone, g_hidden, h_hidden, heads, x, a, b, rho, t, residual, dtype: torch.dtype) -> torch.Tensor:
    """:func:`liquiddiff.functional.cfc_heads_relax`, with ``heads`` ((weight, bias) of f_proj,
    g_pw and h_pw) as the convs run them, in ``dtype``. No autograd: the caller's
    autograd.Function (``parallel_cfc.py``) makes the backward. Arguments as it checked them."""
    op = _forward_op if _eager.needs_custom_op(x) else _forward_kernels
    (f_weight, f_bias), (g_weight, g_bias), (h_weight, h_bias) = heads
    return op(backbone, g_hidden, h_hidden, f_weight, f_bias, g_weight, g_bias, h_weight, h_bias,
              x, a, b, rho, t, residual, dtype)

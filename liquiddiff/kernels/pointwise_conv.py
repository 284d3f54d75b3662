"""The forward of :func:`liquiddiff.functional.silu_conv1x1` as one Triton kernel: the
(modulated) SiLU computed in the 1x1 convolution's prologue, as its input tile is loaded.

    y = z[b, k, p] * (1 + scale[b, k]) + shift[b, k]   (when modulated; else y = z)
    out[b, n, p] = bias[n] + sum_k round(silu(y)) * weight[n, k]

cuDNN cannot take an activation on its input, so the reference (and the fused model on cuDNN)
writes silu(y) in the convolution's dtype and reads it back: one pass of the K-wide activation
each way that this kernel does not make. It reads z once and writes out once. Used in the
forward of the FeedForward's last conv, the spatial mix's output conv (modulated by t) and the
CfC's g and h 1x1 heads; their backward is unchanged (recompute.py remakes silu(y) for cuDNN).

Rounding as the reference: silu(y) in fp32 (fp64 for fp64), rounded to the conv's dtype, then a
product with fp32 accumulation (``input_precision="ieee"``: no TF32 for fp32 inputs) plus the
bias, rounded once to the conv's dtype. Under bf16 autocast that is the reference up to the
order of the K-sum (cuDNN's differs): within bf16 rounding, not bitwise.

Layout: [B, K, H*W] through strides (``_tensors.flat_pixels``): channels_last (k stride 1) and
NCHW (pixel stride 1) without a copy; the output takes z's memory format. The tile is [pixels,
out channels] per program, the K loop over the input channels (a constexpr: a few values per
model). Tiles chosen without a GPU, not yet timed against cuDNN: the op is opt-in
(``runtime.OPT_IN``), ``LIQUIDDIFF_KERNELS=auto,pointwise_conv=triton``.
"""
import typing

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: runtime.use_triton is False, no launcher is reached
    triton = None

from . import _eager, _tensors

__all__ = ["forward", "OP_NAME"]

OP_NAME = "pointwise_conv"
_BLOCK_P = 64
_MAX_BLOCK_N = 128
_MAX_BLOCK_K = 32
_WARPS = 4


if triton is not None:

    @triton.jit
    def _silu_conv1x1_kernel(
        z_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, P,
        sz_b, sz_k, sz_p, so_b, so_n, so_p, sw_n, sw_k, ss_b, ss_k, sh_b, sh_k,
        K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATED: tl.constexpr,
        CONV: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # int64 batch and pixel offsets: B * K * H * W may pass 2**31.
        pid_b = tl.program_id(2).to(tl.int64)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        p_mask, n_mask = ps < P, ns < N
        rows = ps.to(tl.int64)[:, None]
        acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            mask = p_mask[:, None] & k_mask[None, :]
            y = tl.load(z_ptr + pid_b * sz_b + rows * sz_p + ks[None, :] * sz_k, mask=mask, other=0.0).to(ACC)
            if MODULATED:
                one_plus = 1.0 + tl.load(scale_ptr + pid_b * ss_b + ks * ss_k, mask=k_mask, other=0.0).to(ACC)
                y = y * one_plus[None, :] + tl.load(shift_ptr + pid_b * sh_b + ks * sh_k, mask=k_mask, other=0.0).to(ACC)[None, :]
            # Masked lanes are selected away: a shift there would give silu(shift) * 0, NaN * 0 = NaN.
            a = tl.where(mask, y * tl.sigmoid(y), 0.0).to(CONV).to(DOT)
            w = tl.load(w_ptr + ns[None, :] * sw_n + ks[:, None] * sw_k, mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0).to(CONV).to(DOT)
            acc += tl.dot(a, w, input_precision="ieee", out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ns, mask=n_mask, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + pid_b * so_b + rows * so_p + ns[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & n_mask[None, :])


def _blocks(K: int, N: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): powers of 2 of at least 16 (tl.dot's smallest tile)."""
    return (max(16, min(_tensors.next_power_of_2(N), _MAX_BLOCK_N)),
            max(16, min(_tensors.next_power_of_2(K), _MAX_BLOCK_K)))


def _forward_kernels(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
                     scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
                     dtype: torch.dtype) -> torch.Tensor:
    B, K, H, W = z.shape
    N = weight.shape[0]
    out = _tensors.empty_activation(z, dtype, channels=N)
    (z, out), (sz, so) = _tensors.flat_all(z, out)
    block_n, block_k = _blocks(K, N)
    grid = (_tensors.cdiv(H * W, _BLOCK_P), _tensors.cdiv(N, block_n), B)
    modulated = scale is not None
    conv, acc = _tensors.tl_dtype(dtype), tl.float64 if dtype == torch.float64 else tl.float32
    # The interpreter's tl.dot knows no bf16 or fp16 (numpy has neither): there the operands,
    # rounded to the conv's dtype, are multiplied in fp32, which is exact for them, so the sum is
    # what the GPU's bf16 dot with fp32 accumulation computes.
    dot = acc if z.device.type == "cpu" else conv
    # Absent operands (bias, modulation) repeat the weight, never read.
    params, param_strides = ((scale, shift), (*scale.stride(), *shift.stride())) if modulated else ((weight, weight), (0,) * 4)
    _silu_conv1x1_kernel[grid](
        z, weight, weight if bias is None else bias, *params, out, H * W,
        *sz, *so, weight.stride(0), weight.stride(1), *param_strides,
        K=K, N=N, HAS_BIAS=bias is not None, MODULATED=modulated, CONV=conv, DOT=dot, ACC=acc,
        BLOCK_P=_BLOCK_P, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_WARPS,
    )
    return out


_forward_op = torch.library.custom_op("liquiddiff::silu_conv1x1_forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(z, weight, bias, scale, shift, dtype):
    return _tensors.empty_activation(z, dtype, channels=weight.shape[0])


def forward(z: torch.Tensor, weight: torch.Tensor, bias: typing.Optional[torch.Tensor],
            scale: typing.Optional[torch.Tensor], shift: typing.Optional[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """conv1x1(silu(z * (1 + scale) + shift)) (the modulation when given), in ``dtype``, in z's
    memory format; ``weight`` [N, K, 1, 1] and ``bias`` as the conv runs them. No autograd: the
    caller's autograd.Function keeps z and makes the backward (recompute.py)."""
    op = _forward_op if _eager.needs_custom_op(z) else _forward_kernels
    return op(z, weight, bias, scale, shift, dtype)

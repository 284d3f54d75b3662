"""Reference ops in plain PyTorch: the specification every fused kernel is held to.

The math is that of DESIGN.md section 1. These functions are used by the reference modules,
by the tests (as the ground truth for value and gradient) and by the benchmarks (as the eager
and ``torch.compile`` baselines). Do not optimise them at the cost of clarity.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "cfc_relax",
    "adaln_modulate",
    "relaxation_weight",
    "conv1x1",
    "depthwise_conv",
    "merged_depthwise_weight",
    "multiscale_depthwise_conv",
    "multiscale_depthwise_conv_branches",
    "spatial_mix_input",
    "modulated_silu",
    "context_shift",
    "silu_conv1x1",
    "silu_convs",
    "cfc_heads_relax",
    "CFC_CONVS",
    "parallel_cfc",
]


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, C, 1, 1], broadcastable against [B, C, H, W]."""
    return v[:, :, None, None]


def relaxation_weight(rho: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha = exp(-softplus(rho) * |t|), shape [B, C] from rho [C] and t [B]."""
    return torch.exp(-F.softplus(rho)[None, :] * t.abs()[:, None])


def cfc_relax(f, g, h, x, a, b, rho, t, residual=None):
    """CfC time gate, CfC interpolation and liquid relaxation, in one op.

    gate  = sigmoid(a * f - b)
    y     = gate * g + (1 - gate) * h
    alpha = exp(-softplus(rho) * |t|)
    out   = alpha * x + (1 - alpha) * y   (+ residual)

    f, g, h, x, residual: [B, C, H, W]; a, b: [B, C]; rho: [C]; t: [B].
    The result dtype follows PyTorch's type promotion over all inputs.
    """
    gate = torch.sigmoid(_per_channel(a) * f - _per_channel(b))
    y = gate * g + (1 - gate) * h
    alpha = _per_channel(relaxation_weight(rho, t))
    out = alpha * x + (1 - alpha) * y
    if residual is not None:
        out = out + residual
    return out


def adaln_modulate(x, scale, shift, eps: float = 1e-6, residual=None):
    """Per-pixel LayerNorm over channels (no affine), then a time-dependent modulation.

    s     = x (+ residual)
    x_hat = (s - mean_C(s)) / sqrt(var_C(s) + eps)
    out   = x_hat * (1 + scale) + shift

    x, residual: [B, C, H, W]; scale, shift: [B, C]. Returns ``out``, or ``(out, s)`` when
    ``residual`` is given (the residual stream continues from ``s``). The statistics are taken
    in at least fp32, as every LayerNorm does under autocast; ``out`` has the promoted dtype of
    (s, scale, shift) and ``s`` the promoted dtype of (x, residual).
    """
    s = x if residual is None else x + residual
    stats_dtype = torch.promote_types(s.dtype, torch.float32)
    s32 = s.to(stats_dtype)
    mean = s32.mean(dim=1, keepdim=True)
    var = (s32 - mean).square().mean(dim=1, keepdim=True)
    x_hat = (s32 - mean) * torch.rsqrt(var + eps)
    out_dtype = torch.promote_types(torch.promote_types(s.dtype, scale.dtype), shift.dtype)
    out = (x_hat * (1 + _per_channel(scale)) + _per_channel(shift)).to(out_dtype)
    return out if residual is None else (out, s)


def conv1x1(x, weight, bias=None):
    """A 1x1 convolution (a per-pixel linear map of the channels): weight [Co, Ci, 1, 1]."""
    return F.conv2d(x, weight, bias)


def conv1x1_silu(x, weight, bias=None):
    """A 1x1 convolution, then SiLU: the CfC backbone's pointwise stage."""
    return F.silu(conv1x1(x, weight, bias))


def depthwise_conv(x, weight, bias=None):
    """Depthwise convolution with an odd square kernel [C, 1, k, k], 'same' padding."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _pad_to(weight: torch.Tensor, size: int) -> torch.Tensor:
    pad = (size - weight.shape[-1]) // 2
    return F.pad(weight, (pad, pad, pad, pad)) if pad else weight


def merged_depthwise_weight(weights, biases):
    """The one depthwise kernel (and bias) equal to the sum of odd-sized ones: each kernel
    zero-padded to the largest size, then kernels and biases added (None: no biases)."""
    size = max(w.shape[-1] for w in weights)
    # reduce, not sum(): sum starts from 0, one more (tiny) kernel launch each time.
    bias = None if all(b is None for b in biases) else functools.reduce(torch.add, biases)
    return functools.reduce(torch.add, [_pad_to(w, size) for w in weights]), bias


def multiscale_depthwise_conv(x, weights, biases):
    """Sum of depthwise convolutions of odd sizes (3x3, 5x5, 7x7, ...) as ONE convolution.

    Structural re-parameterisation (:func:`merged_depthwise_weight`): the three branches cost
    one depthwise conv. Autograd still gives each branch weight its own gradient (the slice of
    the summed kernel's grad).
    """
    return depthwise_conv(x, *merged_depthwise_weight(weights, biases))


def multiscale_depthwise_conv_branches(x, weights, biases):
    """The same function as :func:`multiscale_depthwise_conv`, one convolution per branch.

    This is the seed's literal form; it is kept as the definition the merged form is tested
    against.
    """
    return sum(
        F.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1])
        for w, b in zip(weights, biases)
    )


def spatial_mix_input(x, weights, biases):
    """What the spatial mix reads of its input x, and x itself, which the block adds back as the
    residual after the mix: ``(multiscale_depthwise_conv(x, weights, biases), x.sum((2, 3)), x)``,
    the local features [B, C, H, W], the per-channel pixel sum [B, C] (the global-average-pool
    context before its division) and x. Returning x gives a fused version the gradient x
    receives through the residual, to sum with the mix's own in one pass."""
    return multiscale_depthwise_conv(x, weights, biases), x.sum(dim=(2, 3)), x


def modulated_silu(z, scale, shift):
    """SiLU of a per-channel modulation: silu(z * (1 + scale) + shift).

    z: [B, C, H, W]; scale, shift: [B, C]. The spatial mix's activation (t modulates it)."""
    return F.silu(z * (1 + _per_channel(scale)) + _per_channel(shift))


def context_shift(pixel_sum, weight, bias, scale, shift, pixels: int):
    """The spatial mix's shift with its global-average-pool context folded in:
    ``(conv1x1(pixel_sum / pixels) + bias) * (1 + scale) + shift``, which modulating
    ``local + context`` by (scale, shift) equals, one value per (b, c) instead of a full-size add.

    pixel_sum, scale, shift: [B, C] (the sum of the mix's input over its ``pixels`` pixels, the
    time modulation); weight: [C, C, 1, 1] (the context's 1x1 conv); bias: [C]."""
    context = F.conv2d(pixel_sum[:, :, None, None] / pixels, weight, bias).flatten(1)
    return context * (1 + scale) + shift


def silu_conv1x1(z, weight, bias=None, scale=None, shift=None, residual=None):
    """An optional per-channel modulation, SiLU, then a 1x1 convolution: the end of every residual
    branch (FeedForward, whose block adds its residual here; the spatial mix, modulated by t) and
    of the CfC g/h heads.

    y = z * (1 + scale) + shift (when given), out = conv1x1(silu(y)) (+ residual, added to the
    conv's output in PyTorch's promotion of the two: the fp32 residual stream under autocast).
    z: [B, Ci, H, W]; weight: [Co, Ci, 1, 1]; bias: [Co] or None; scale, shift: [B, Ci] or None;
    residual: [B, Co, H, W] or None.
    """
    a = F.silu(z) if scale is None else modulated_silu(z, scale, shift)
    out = F.conv2d(a, weight, bias)
    return out if residual is None else residual + out


def depthwise_silu_conv1x1(x, dw_weight, dw_bias, weight, bias=None):
    """The CfC's g or h head: a depthwise conv (odd k x k, zero padding), SiLU, then a 1x1 conv.
    x: [B, C, H, W]; dw_weight: [C, 1, k, k]; dw_bias: [C] or None; weight: [Co, C, 1, 1]."""
    return silu_conv1x1(depthwise_conv(x, dw_weight, dw_bias), weight, bias)


def feedforward(x, w1, b1, w2, b2, residual=None):
    """The FeedForward branch: conv1x1 (C -> hidden), SiLU, conv1x1 (-> C) (+ residual, as
    :func:`silu_conv1x1` adds it). x: [B, C, H, W]; w1: [hidden, C, 1, 1]; w2: [Co, hidden, 1, 1]."""
    return silu_conv1x1(conv1x1(x, w1, b1), w2, b2, residual=residual)


def silu_convs(z, weights, biases):
    """SiLU once, then several 'same'-padded convolutions of the result, each 1x1 or depthwise as
    its weight's shape says (groups = C_in / weight.shape[1]): the CfC backbone feeding f and
    the g and h heads. Returns a tuple, one output per weight."""
    a = F.silu(z)
    return tuple(
        F.conv2d(a, w, b, padding=w.shape[-1] // 2, groups=z.shape[1] // w.shape[1])
        for w, b in zip(weights, biases)
    )


# ParallelCfC's convolutions, in the order :func:`parallel_cfc` takes their (weight, bias).
CFC_CONVS = ("backbone_dw", "backbone_pw", "f_proj", "g_dw", "g_pw", "h_dw", "h_pw")


def cfc_heads_relax(backbone, g_hidden, h_hidden, heads, n, a, b, rho, t, residual=None):
    """The end of :func:`parallel_cfc`: the CfC's three 1x1 heads and its gate.

    f = conv1x1(backbone); g, h = silu_conv1x1(g_hidden), silu_conv1x1(h_hidden)
    out = cfc_relax(f, g, h, n, a, b, rho, t, residual)

    backbone, g_hidden, h_hidden, n, residual: [B, C, H, W]; heads: the (weight, bias) of f_proj,
    g_pw and h_pw, in that order; a, b, rho, t as :func:`cfc_relax`.
    """
    (f_w, f_b), g_pw, h_pw = heads
    f = conv1x1(backbone, f_w, f_b)
    g, h = silu_conv1x1(g_hidden, *g_pw), silu_conv1x1(h_hidden, *h_pw)
    return cfc_relax(f, g, h, n, a, b, rho, t, residual=residual)


def parallel_cfc(n, convs, a, b, rho, t, residual=None):
    """ParallelCfC after its time projections (the seed's Eq. 10 with liquid relaxation):

    backbone = silu(conv1x1(depthwise_conv(n)))          (7x7)
    g_hidden, h_hidden = depthwise_conv(backbone)         (3x3 each)
    out = cfc_heads_relax(backbone, g_hidden, h_hidden, ...)

    n, residual: [B, C, H, W]; convs: the (weight, bias) of each of :data:`CFC_CONVS`, in that
    order; a, b: [B, C] (time_a, time_b of SiLU(t_emb)); rho: [C]; t: [B].
    """
    (dw_w, dw_b), (pw_w, pw_b), f_conv, g_dw, g_pw, h_dw, h_pw = convs
    backbone = conv1x1_silu(depthwise_conv(n, dw_w, dw_b), pw_w, pw_b)
    g_hidden, h_hidden = depthwise_conv(backbone, *g_dw), depthwise_conv(backbone, *h_dw)
    return cfc_heads_relax(backbone, g_hidden, h_hidden, (f_conv, g_pw, h_pw), n, a, b, rho, t, residual=residual)

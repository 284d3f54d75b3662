"""Reference modules of LiquidDiffusion (the seed's architecture), with a ``fused`` switch.

Every module computes the same function with ``fused=False`` (plain PyTorch, the specification)
and ``fused=True`` (the ops of :mod:`liquiddiff.kernels`: the Triton CfC and AdaLN kernels where
Triton can run, and convolutions that keep only their input for backward). The
flag only changes which implementation of those ops runs; parameters and state_dict keys are
identical, so checkpoints move freely between the two.

Zero initialisation: every time modulation (AdaLN scale/shift, the CfC gate's time_a/time_b,
the spatial mix's scale/shift) and the last projections of the spatial mix and the FeedForward
start at zero, as in adaLN-Zero (DiT): those two branches add nothing to a fresh block's
residual stream, and conditioning on t is learned rather than injected as random noise by
untrained projections. The CfC branch cannot start at zero: its relaxation adds
alpha * n + (1 - alpha) * (g + h) / 2 (the gate starts at 0.5; n is the normalised input), so a
fresh block maps u to u + n at t = 0.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import functional, kernels


def _ops(fused: bool):
    """The implementation of cfc_relax / adaln_modulate a module calls."""
    return kernels if fused else functional


def _add_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b, where a None is a zero (a conv built without a bias)."""
    return a if b is None else b if a is None else a + b


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FusedSwitch:
    """Mixin: ``fused`` selects the fused kernels; flipping it changes no parameter."""

    fused: bool = False


class TimestepEmbedding(nn.Module):
    """Sinusoidal encoding of t in [0, 1] -> MLP -> t_emb [B, dim]."""

    def __init__(self, freq_dim: int, dim: int, max_period: float = 10000.0):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {freq_dim}")
        self.freq_count, self.max_period = freq_dim // 2, max_period
        self.register_buffer("freqs", self._frequencies(None, torch.float32), persistent=False)  # None: the default device
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def _frequencies(self, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
        index = torch.arange(self.freq_count, dtype=dtype, device=device)
        return torch.exp(-math.log(self.max_period) * index / self.freq_count)

    def _apply(self, fn, recurse=True):
        # The frequencies stay fp32 whatever the module is cast to (fp64 in a float64 model): in
        # bf16 they would put the phases (1000 t f radians) up to 2 radians off. Remade on the
        # buffer's new device.
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.mlp[0].weight.dtype == torch.float64 else torch.float32
        self.freqs = self._frequencies(self.freqs.device, dtype)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1] is scaled to [0, 1000] so the fastest frequencies resolve small steps in t.
        args = (1000.0 * t.to(self.freqs.dtype))[:, None] * self.freqs[None, :]
        # In fp32 (fp64) up to here; then the MLP's dtype (a model cast to bf16 or fp16 for inference).
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(self.mlp[0].weight.dtype))


class TimeProjection(nn.Module):
    """SiLU(t_emb) -> Linear -> n chunks of [B, C]; zero-initialised (see the module docstring).

    ``projected``: the Linear's output, computed by the caller (fused, all the blocks' time
    projections are one GEMM, ``project_time``)."""

    def __init__(self, temb_dim: int, channels: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.proj = _zero_(nn.Linear(temb_dim, chunks * channels))

    def forward(self, temb: torch.Tensor, projected: torch.Tensor | None = None):
        if projected is None:
            projected = self.proj(F.silu(temb))
        return projected.chunk(self.chunks, dim=1)


class AdaLN(FusedSwitch, nn.Module):
    """Per-pixel LayerNorm over channels, modulated by scale/shift from the time embedding.

    With ``residual`` it also forms the residual sum first and returns ``(out, sum)``.
    """

    def __init__(self, channels: int, temb_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.time = TimeProjection(temb_dim, channels, 2)

    def forward(self, x, temb, residual=None, out_dtype=None, return_input=False, projected=None,
                copy_dtype=None):
        """``out_dtype`` (the fused block's): ``out`` stored in that dtype, as a cast of it would be.
        ``return_input`` (without residual): also return x, for x's other consumers (fused, the
        backward kernel adds the gradient they give x: kernels.adaln_modulate). ``projected``:
        the time projection's output, made by the caller (TimeProjection). ``copy_dtype`` (the
        fused block's): also return out in that dtype, last, from the same pass."""
        scale, shift = self.time(temb, projected)
        if self.fused or out_dtype is not None or copy_dtype is not None:
            return kernels.adaln_modulate(x, scale, shift, eps=self.eps, residual=residual, out_dtype=out_dtype,
                                          return_input=return_input, copy_dtype=copy_dtype)
        out = functional.adaln_modulate(x, scale, shift, eps=self.eps, residual=residual)
        return (out, x) if return_input else out


class ParallelCfC(FusedSwitch, nn.Module):
    """CfC closed form for 2-D features (the seed's Eq. 10) with liquid relaxation.

    backbone = SiLU(Conv1x1(DWConv7x7(n)))
    f = Conv1x1(backbone); g, h = DWConv3x3 -> SiLU -> Conv1x1 (backbone)
    gate = sigmoid(time_a(t_emb) * f - time_b(t_emb)); y = gate*g + (1-gate)*h
    out = alpha*n + (1-alpha)*y + residual, alpha = exp(-softplus(rho)|t|)
    """

    def __init__(self, channels: int, temb_dim: int):
        super().__init__()
        c = channels
        self.backbone_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.backbone_pw = nn.Conv2d(c, c, 1)
        self.f_proj = nn.Conv2d(c, c, 1)
        self.g_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.g_pw = nn.Conv2d(c, c, 1)
        self.h_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.h_pw = nn.Conv2d(c, c, 1)
        self.time_a = _zero_(nn.Linear(temb_dim, c))
        self.time_b = _zero_(nn.Linear(temb_dim, c))
        # softplus(0) = ln 2: alpha = 2^-|t|, half input / half CfC at the noisiest t.
        self.rho = nn.Parameter(torch.zeros(c))

    def conv_parameters(self) -> list:
        """(weight, bias) of each convolution, in ``functional.CFC_CONVS`` order."""
        return [(getattr(self, name).weight, getattr(self, name).bias) for name in functional.CFC_CONVS]

    def forward(self, n, temb, t, residual, projected=None, convs=None, n_conv=None, copy_dtype=None, norm=None):
        """``projected``: (time_a, time_b) of SiLU(temb), made by the caller (the fused block);
        ``convs``: :meth:`conv_parameters` as the caller cast them (the fused block, under autocast);
        ``n_conv`` (fused): n in the convolutions' dtype, made by the caller's AdaLN with n;
        ``copy_dtype`` (fused): also return the output's copy in that dtype and its pixel sum
        (``kernels.parallel_cfc``), for the spatial mix; ``norm`` (fused, with ``copy_dtype``,
        where ``kernels.normalized_parallel_cfc_runs``): (scale, shift, eps) of the AdaLN before
        the branch, whose input ``n`` then is (the residual too): both in one node
        (``kernels.normalized_parallel_cfc``)."""
        if projected is None:
            e = F.silu(temb)
            projected = self.time_a(e), self.time_b(e)
        if convs is None:
            convs = self.conv_parameters()
        if norm is not None:
            if residual is not n:
                raise ValueError("residual: with norm, the branch's residual is the AdaLN's input n itself")
            return kernels.normalized_parallel_cfc(n, *norm, convs, *projected, self.rho, t, copy_dtype)
        if n_conv is not None or copy_dtype is not None:
            return kernels.parallel_cfc(n, convs, *projected, self.rho, t, residual=residual, n_conv=n_conv,
                                        copy_dtype=copy_dtype)
        # Fused, one autograd node (kernels/parallel_cfc.py) keeps n, the depthwise outputs and the
        # backbone pre-activation, and remakes f, g, h and every SiLU once in backward.
        return _ops(self.fused).parallel_cfc(n, convs, *projected, self.rho, t, residual=residual)


class MultiScaleSpatialMix(FusedSwitch, nn.Module):
    """Depthwise 3x3 + 5x5 + 7x7 plus a global-average-pool context, modulated by t:
    out(SiLU((local + context) * (1 + scale) + shift)).

    The three depthwise branches run as one 7x7 conv (functional.multiscale_depthwise_conv);
    each branch keeps its own parameters and gradient. The context, one value per channel, is
    folded into the modulation's shift, and so is the merged conv's bias, added to the
    context's: a [C] add, where a conv bias costs a pass over the conv's output on a GPU (cuDNN
    takes none) and a reduction for its gradient. ``return_input=True`` also returns x, for the
    block's residual: fused, the gradient it brings joins the mix's own in one pass
    (functional.spatial_mix_input).
    """

    def __init__(self, channels: int, temb_dim: int, kernel_sizes=(3, 5, 7)):
        super().__init__()
        c = channels
        self.branches = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for k in kernel_sizes)
        self.context = nn.Conv2d(c, c, 1)
        self.time = TimeProjection(temb_dim, c, 2)
        self.out = _zero_(nn.Conv2d(c, c, 1))

    def conv_parameters(self) -> list:
        """(weight, bias) of the merged depthwise conv (the three branches as one,
        ``functional.merged_depthwise_weight``), of the context's 1x1 conv and of the output's."""
        merged = _ops(self.fused).merged_depthwise_weight([m.weight for m in self.branches],
                                                          [m.bias for m in self.branches])
        return [merged, (self.context.weight, self.context.bias), (self.out.weight, self.out.bias)]

    def forward(self, x, temb, return_input: bool = False, projected=None, convs=None, precomputed=None):
        """``convs``: :meth:`conv_parameters` as the caller cast them (the fused block, under
        autocast); ``precomputed`` (fused): x's copy in the conv dtype and its pixel sum, made
        with x (``kernels.spatial_mix_input``)."""
        ops = _ops(self.fused)
        (dw_weight, dw_bias), (context_weight, context_bias), (out_weight, out_bias) = (
            self.conv_parameters() if convs is None else convs)
        # The average as sum / count: mean's backward materialises a dense NCHW gradient (an
        # expanded view divided), sum's is the expanded view itself, added to x's channels_last
        # gradient in place of a layout round trip.
        if precomputed is None:
            local, pixel_sum, x = ops.spatial_mix_input(x, [dw_weight], [None])
        else:
            local, pixel_sum, x = kernels.spatial_mix_input(x, [dw_weight], [None], precomputed=precomputed)
        scale, shift = self.time(temb, projected)
        # (local + dw_bias + context) * (1 + scale) + shift, with the per-channel terms folded
        # into the shift: the same modulation without a full-size add (forward) or sum (its
        # backward).
        context_bias = _add_optional(context_bias, dw_bias)
        shift = ops.context_shift(pixel_sum, context_weight, context_bias, scale, shift, x.shape[2] * x.shape[3])
        out = ops.silu_conv1x1(local, out_weight, out_bias, scale, shift)
        return (out, x) if return_input else out


class FeedForward(FusedSwitch, nn.Module):
    """Pointwise MLP: Conv1x1 (C -> mult*C) -> SiLU -> Conv1x1 (-> C, zero-initialised)."""

    def __init__(self, channels: int, mult: int = 2):
        super().__init__()
        self.inner = nn.Conv2d(channels, mult * channels, 1)
        self.out = _zero_(nn.Conv2d(mult * channels, channels, 1))

    def conv_parameters(self) -> list:
        return [(self.inner.weight, self.inner.bias), (self.out.weight, self.out.bias)]

    def forward(self, x, convs=None, residual=None):
        """``convs``: :meth:`conv_parameters` as the caller cast them (the fused block, under
        autocast); ``residual``: added to the output (the block's, in the last conv's op)."""
        ops = _ops(self.fused)
        (inner_weight, inner_bias), (out_weight, out_bias) = self.conv_parameters() if convs is None else convs
        return ops.feedforward(x, inner_weight, inner_bias, out_weight, out_bias, residual=residual)


class BlockParameters(NamedTuple):
    """The convolution parameters a fused block runs with (:meth:`LiquidDiffusionBlock.fused_parameters`):
    each module's ``conv_parameters()``."""

    cfc: list | None
    mix: list | None
    ffn: list | None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast_needed(tensors, device_type: str) -> torch.dtype | None:
    """Autocast's dtype when some of ``tensors`` are not in it (its ops would cast them), else None."""
    dtype = _autocast_dtype(device_type)
    return dtype if dtype is not None and any(t.dtype != dtype for t in tensors) else None


class _CastTogether(torch.autograd.Function):
    """Groups of tensors, each group concatenated along dim 0 and cast to ``dtype``
    (:func:`_cast_together`): one concatenation and one cast of all their elements, and in
    backward one of each for all their gradients, handed back as views with each input's own
    strides (autograd's views would be contiguous, and DDP warns when a channels_last
    parameter's gradient strides differ from its bucket's)."""

    @staticmethod
    def forward(ctx, dtype, group_shapes, *tensors):
        ctx.layouts = [(t.shape, t.stride() if t.is_contiguous() else None, t.dtype) for t in tensors]
        ctx.group_shapes, ctx.dtype = group_shapes, dtype
        ctx.set_materialize_grads(False)  # an unused group's gradient: None, its zeros made here
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        sizes = [math.prod(shape) for shape in group_shapes]
        return tuple(chunk.view(shape) for chunk, shape in zip(flat.split(sizes), group_shapes))

    @staticmethod
    def backward(ctx, *grads):
        device = next(g.device for g in grads if g is not None)
        parts = [torch.zeros(math.prod(shape), dtype=ctx.dtype, device=device) if g is None else g.reshape(-1)
                 for g, shape in zip(grads, ctx.group_shapes)]
        # In the inputs' dtype (parameters share one); a view is cast again only where one differs.
        flat = torch.cat(parts).to(functools.reduce(torch.promote_types, (d for _, _, d in ctx.layouts)))
        grads_in, offset = [], 0
        for shape, stride, dtype in ctx.layouts:
            size = math.prod(shape)
            view = flat[offset:offset + size].view(shape) if stride is None else flat.as_strided(shape, stride, offset)
            grads_in.append(view.to(dtype))
            offset += size
        return (None, None, *grads_in)


def _cast_together(groups: list, dtype: torch.dtype) -> list:
    """``[torch.cat(group).to(dtype) for group in groups]`` (each group: tensors with the same
    trailing shape), as one concatenation and one cast of all their elements, and
    their gradients back by one of each (:class:`_CastTogether`). Small tensors (a block's
    parameters) cost a launch each way per tensor when cast one by one."""
    shapes = [(sum(t.shape[0] for t in group), *group[0].shape[1:]) for group in groups]
    return list(_CastTogether.apply(dtype, shapes, *(t for group in groups for t in group)))


def project_time(temb: torch.Tensor, blocks: list) -> list:
    """Each fused block's time projections of SiLU(temb), for (norm1, the CfC's (a, b), the mix,
    norm2), as one GEMM over all their Linears' weights concatenated (cast together under
    autocast): the same parameters and products as each module's own Linear, where a block ran
    five GEMMs with their SiLUs, casts and backward passes. The model passes all its blocks (one
    GEMM per step: the embedding is shared), a block called alone itself."""
    linears = [m for block in blocks for m in block.time_linears()]
    groups = [[m.weight for m in linears], [m.bias for m in linears]]
    dtype = _cast_needed(groups[0] + groups[1], temb.device.type)
    weight, bias = (torch.cat(g) for g in groups) if dtype is None else _cast_together(groups, dtype)
    outs = iter(F.linear(F.silu(temb), weight, bias).split([m.out_features for m in linears], dim=1))
    return [(next(outs), (next(outs), next(outs)), next(outs), next(outs)) for _ in blocks]


class LiquidDiffusionBlock(nn.Module):
    """AdaLN -> ParallelCfC (+res) -> MultiScaleSpatialMix (+res) -> AdaLN -> FeedForward (+res).

    The spatial mix's residual add happens inside the second AdaLN (``residual=``), so with the
    fused kernels the add and the norm are one pass over memory. Fused, the CfC's input is not
    kept for backward but remade by its AdaLN (``_remade``); the FFN keeps its input and remakes
    its hidden tensor, twice as wide (``kernels.feedforward``). Fused under autocast, norm1 and
    the CfC run as one node that writes n in the convs' dtype alone and remakes it in fp32 from u
    in the CfC kernels (``kernels.normalized_parallel_cfc``), where the kernels allow.
    """

    def __init__(self, channels: int, temb_dim: int, ffn_mult: int = 2):
        super().__init__()
        self.norm1 = AdaLN(channels, temb_dim)
        self.cfc = ParallelCfC(channels, temb_dim)
        self.mix = MultiScaleSpatialMix(channels, temb_dim)
        self.norm2 = AdaLN(channels, temb_dim)
        self.ffn = FeedForward(channels, ffn_mult)

    def forward(self, u, temb, t, projected=None):
        """``projected``: this block's entry of :func:`project_time` (the fused model makes all
        blocks' at once); fused without it, the block makes its own; unfused, each module
        projects for itself, as the reference does."""
        params = self.fused_parameters(u.device.type)
        if projected is None:
            projected = project_time(temb, [self])[0] if self.cfc.fused else (None,) * 4
        for_norm1, for_cfc, for_mix, for_norm2 = projected
        norm1 = functools.partial(self.norm1, projected=for_norm1)
        conv_dtype = self._cfc_conv_dtype(u)
        norm = None if conv_dtype is None else (*self.norm1.time(temb, for_norm1), self.norm1.eps)
        if norm is not None and kernels.normalized_parallel_cfc_runs(u, *norm[:2], params.cfc):
            # norm1 and the CfC as one node: n written once, in the convs' dtype; the CfC
            # kernels remake n in fp32 from u and norm1's statistics.
            u = self.cfc(u, temb, t, residual=u, projected=for_cfc, convs=params.cfc, copy_dtype=conv_dtype, norm=norm)
        else:
            normed = norm1(u, temb, return_input=True, copy_dtype=conv_dtype)
            n, residual, n_conv = normed if conv_dtype is not None else (*normed, None)
            made = n if n_conv is None else (n, n_conv)  # the copy: for the 7x7's weight gradient
            with self._remade(made, functools.partial(norm1, copy_dtype=conv_dtype), u, temb):
                u = self.cfc(n, temb, t, residual=residual, projected=for_cfc, convs=params.cfc, n_conv=n_conv,
                             copy_dtype=conv_dtype)
            del normed, n_conv, made  # the conv's copy of n, dead now: not alive through the rest of the block
        u, u_copy = (u[0], u[1:]) if conv_dtype is not None else (u, None)
        mixed, u = self.mix(u, temb, return_input=True, projected=for_mix, convs=params.mix, precomputed=u_copy)
        del u_copy  # saved by the mix where backward needs it, else dead: not alive through the FFN
        norm2 = functools.partial(self.norm2, out_dtype=self._ffn_input_dtype(u), projected=for_norm2)
        n, u = norm2(mixed, temb, residual=u)
        return self.ffn(n, convs=params.ffn, residual=u)

    def time_linears(self) -> tuple:
        """The Linears that project SiLU(temb), in :func:`project_time`'s order."""
        return self.norm1.time.proj, self.cfc.time_a, self.cfc.time_b, self.mix.time.proj, self.norm2.time.proj

    def fused_parameters(self, device_type: str) -> BlockParameters:
        """The convolution parameters the fused block runs with, each module's
        ``conv_parameters()``: under autocast all cast to its dtype by one concatenation and one
        cast, and their gradients cast back by one of each (:func:`_cast_together`), where each
        op would cast its own: about 50 small launches per block each way. Each consumer would
        cast to the same dtype: the same values. Unfused: None everywhere (every module uses its
        own parameters, as the reference does)."""
        if not self.cfc.fused:
            return BlockParameters(None, None, None)
        convs, spec = tree_flatten([self.cfc.conv_parameters(), self.mix.conv_parameters(),
                                    self.ffn.conv_parameters()])
        dtype = _cast_needed(convs, device_type)
        if dtype is not None:
            convs = _cast_together([[p] for p in convs], dtype)
        return BlockParameters(*tree_unflatten(convs, spec))

    def _cfc_conv_dtype(self, u):
        """Fused under autocast, norm1 also writes n in autocast's dtype, which the CfC's 7x7 conv
        reads where it would cast n (fp32) by a pass of its own, and the CfC writes its output in
        it (with its pixel sum) for the spatial mix's conv: the same values."""
        return _autocast_dtype(u.device.type) if self.cfc.fused else None

    def _ffn_input_dtype(self, u):
        """Fused under autocast, norm2 writes the FFN's input in autocast's dtype, which its first
        conv would cast it to anyway: the same values, without the fp32 tensor and the cast."""
        return _autocast_dtype(u.device.type) if self.ffn.fused else None

    def _remade(self, made, norm, u, temb):
        """Fused, the CfC does not keep its input n = norm(u) (``made``: n, or n and its copy in
        the conv dtype, both of norm's outputs): backward remakes it with one AdaLN pass from u,
        the block's input, which the AdaLN keeps anyway."""
        if not self.cfc.fused:
            return contextlib.nullcontext()
        return kernels.recompute_saved((made, norm, (u, temb)))


class DownSample(nn.Module):
    """Stride-2 3x3 conv: halves H and W, changes the channel count."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


def _in_conv_dtype(x: torch.Tensor) -> torch.Tensor:
    """x as autocast would hand it to a convolution: an fp32 tensor cast to autocast's dtype (the
    only dtype autocast casts), anything else as it is."""
    dtype = _autocast_dtype(x.device.type)
    return x.to(dtype) if dtype is not None and x.dtype == torch.float32 else x


class UpSample(FusedSwitch, nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs).

    Fused, under autocast, x is cast to the conv's dtype before the nearest copy, where the
    reference copies the fp32 stream and the conv casts four times as many elements: the same
    values, 16 bytes moved per input element instead of 44 (the gradient's nearest sum is then
    rounded to that dtype once, within its rounding of the reference's)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x):
        if self.fused:
            x = _in_conv_dtype(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SkipFusion(FusedSwitch, nn.Module):
    """Concatenate the encoder skip and fuse back to C channels with a 1x1 conv.

    Fused, under autocast, both inputs are cast to the conv's dtype before the concatenation,
    where the reference concatenates in fp32 (the skip is the fp32 stream) and the conv casts
    the result: the same values and gradients, 14 bytes moved per pixel and channel instead of
    26."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x, skip):
        if self.fused:
            x, skip = _in_conv_dtype(x), _in_conv_dtype(skip)
        return self.proj(torch.cat([x, skip], dim=1))

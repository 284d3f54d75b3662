"""Shared builders for the benchmarks: op inputs, the callables to time, trainers, timers.

One place, used by the pytest-benchmark suites (``bench_ops.py``, ``bench_model.py``), the GPU
report (``gpu_report.py``) and the memcheck driver (``sanitize_ops.py``). The baselines are the
reference functions of :mod:`liquiddiff.functional`, called as they are (eager) or through
``torch.compile``; the fused ops are :mod:`liquiddiff.kernels`. No formula is copied here.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Before liquiddiff.kernels is imported: without CUDA, Triton runs under its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from liquiddiff import functional, kernels  # noqa: E402
from liquiddiff.kernels import pointwise_conv, runtime  # noqa: E402
from liquiddiff.model import build  # noqa: E402
from liquiddiff.training import RectifiedFlowTrainer  # noqa: E402

# --------------------------------------------------------------------------------- sizes
OP_SHAPE = (8, 64, 256, 256)  # the anchors' op size: 67 MB per bf16 tensor, far above L2
QUICK_OP_SHAPE = (2, 8, 16, 16)  # CPU / interpreter / CI
LAYOUTS = ("nchw", "channels_last")
# Extra layouts for the awkward-shape checks: channel slices of a wider tensor (no copy).
SLICE_LAYOUTS = ("nchw_slice", "cl_slice")
IMPLS = ("eager", "compile", "fused")
MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
IMPL_TITLES = {"eager": "eager reference", "compile": "torch.compile(reference)", "fused": "fused"}


def full_sizes() -> bool:
    """The pytest suites use the report's sizes on a GPU, small ones on a CPU (or with
    LIQUIDDIFF_BENCH_QUICK=1)."""
    return torch.cuda.is_available() and os.environ.get("LIQUIDDIFF_BENCH_QUICK", "0") != "1"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU; fp32 on the CPU (the Triton interpreter has no bf16)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def ieee_fp32_convolutions() -> None:
    """cuDNN convolves fp32 in TF32 unless told otherwise (torch's default), about 3e-4 off fp32:
    comparisons of fp32 results with a reference need IEEE fp32 from it. The legacy switch: set
    through torch 2.9's ``cudnn.conv.fp32_precision``, a later read of ``allow_tf32`` (inductor's
    conv templates, ``cudnn.flags()``) raises for mixing the two APIs."""
    torch.backends.cudnn.allow_tf32 = False


def set_compile_limits() -> None:
    """Many (op, layout, grad) variants share one code object: let dynamo keep them all."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(512, getattr(cfg, name)))


# --------------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class OpSpec:
    """One fused op as the benchmarks see it.

    ``saved`` and ``grad_writes`` define the memory floor of the backward: the fewest tensors a
    backward must read besides the upstream grads (names of inputs, or ``"out:i"`` for the
    i-th output) and the gradients it must write (a gradient equal to an upstream grad, like
    d residual of cfc_relax, or written once for two inputs, like ds of AdaLN, is not counted
    twice).
    """

    name: str
    title: str
    reference: Callable
    fused: Callable
    activations: tuple[str, ...]
    outputs: tuple[str, ...]
    saved: tuple[str, ...]
    grad_writes: tuple[str, ...]
    residual: bool = False
    kernel: int = 0  # depthwise convolutions: k of the k x k weight
    heads: bool = False  # the CfC heads: z and the f (1x1), g, h (3x3 depthwise) weights and biases
    cfc_branch: bool = False  # ParallelCfC's branch: n, a, b, rho, t and the CFC_CONVS weights and biases
    layouts: tuple[str, ...] = LAYOUTS  # the layouts the report times
    modes: tuple[str, ...] = MODES  # ("fwd",): a forward without autograd, for calls that record no gradient

    def make_inputs(self, shape, dtype, device, layout, generator) -> dict[str, torch.Tensor]:
        B, C, _, _ = shape
        out = {}
        if self.heads:
            out["z"] = _activation(shape, dtype, device, layout, generator)
            for name in HEAD_NAMES:
                weight_shape = (C, C, 1, 1) if name == "f" else (C, 1, 3, 3)
                out[f"{name}_w"] = (0.2 if name != "f" else C ** -0.5) * _randn(weight_shape, dtype, device, generator)
                out[f"{name}_b"] = _randn((C,), dtype, device, generator)
        elif self.kernel:
            out["x"] = _activation(shape, dtype, device, layout, generator)
            out["weight"] = 0.2 * _randn((C, 1, self.kernel, self.kernel), dtype, device, generator)
            out["bias"] = _randn((C,), dtype, device, generator)
        elif self.reference is functional.silu_conv1x1:  # the spatial mix's output conv, C -> C
            out["z"] = _activation(shape, dtype, device, layout, generator)
            out["weight"] = C ** -0.5 * _randn((C, C, 1, 1), dtype, device, generator)
            out["bias"] = _randn((C,), dtype, device, generator)
            out["scale"] = 0.5 * _randn((B, C), dtype, device, generator)
            out["shift"] = _randn((B, C), dtype, device, generator)
        elif self.reference is functional.depthwise_silu_conv1x1:  # the CfC's g or h head, C -> C
            out["x"] = _activation(shape, dtype, device, layout, generator)
            out["dw_weight"] = _randn((C, 1, 3, 3), dtype, device, generator) / 3
            out["dw_bias"] = _randn((C,), dtype, device, generator)
            out["weight"] = C ** -0.5 * _randn((C, C, 1, 1), dtype, device, generator)
            out["bias"] = _randn((C,), dtype, device, generator)
        elif self.reference is functional.feedforward:  # C -> 2C -> C, the block's residual added
            out["x"] = _activation(shape, dtype, device, layout, generator)
            out["w1"] = C ** -0.5 * _randn((2 * C, C, 1, 1), dtype, device, generator)
            out["b1"] = _randn((2 * C,), dtype, device, generator)
            out["w2"] = (2 * C) ** -0.5 * _randn((C, 2 * C, 1, 1), dtype, device, generator)
            out["b2"] = _randn((C,), dtype, device, generator)
        elif self.reference is functional.conv1x1_silu:  # the CfC backbone's 1x1, C -> C
            out["x"] = _activation(shape, dtype, device, layout, generator)
            out["weight"] = C ** -0.5 * _randn((C, C, 1, 1), dtype, device, generator)
            out["bias"] = _randn((C,), dtype, device, generator)
        elif self.reference is functional.modulated_silu:
            out["z"] = _activation(shape, dtype, device, layout, generator)
            out["scale"] = 0.5 * _randn((B, C), dtype, device, generator)
            out["shift"] = _randn((B, C), dtype, device, generator)
        elif self.cfc_branch:
            out["n"] = _activation(shape, dtype, device, layout, generator)
            out.update(_gate_inputs(B, C, dtype, device, generator))
            for name in functional.CFC_CONVS:
                k = CFC_KERNELS.get(name)
                weight_shape = (C, 1, k, k) if k else (C, C, 1, 1)
                out[f"{name}_w"] = (0.2 if k else C ** -0.5) * _randn(weight_shape, dtype, device, generator)
                out[f"{name}_b"] = _randn((C,), dtype, device, generator)
        elif self.reference is functional.cfc_relax:
            for n in ("f", "g", "h", "x"):
                out[n] = _activation(shape, dtype, device, layout, generator)
            out.update(_gate_inputs(B, C, dtype, device, generator))
        else:
            out["x"] = _activation(shape, dtype, device, layout, generator)
            out["scale"] = 0.5 * _randn((B, C), dtype, device, generator)
            out["shift"] = 0.5 * _randn((B, C), dtype, device, generator)
        if self.residual:
            out["residual"] = _activation(shape, dtype, device, layout, generator)
        return out


def _gate_inputs(B, C, dtype, device, generator) -> dict[str, torch.Tensor]:
    """a, b, rho and t of the CfC gate."""
    out = {name: _randn(shape, dtype, device, generator) for name, shape in (("a", (B, C)), ("b", (B, C)), ("rho", (C,)))}
    # |t| matters (alpha = exp(-softplus(rho)|t|)); keep it away from 0, where d|t| kinks.
    out["t"] = (0.05 + 0.9 * torch.rand((B,), generator=generator, device=device)).to(dtype)
    return out


@contextlib.contextmanager
def kernels_setting(extra: str):
    """``LIQUIDDIFF_KERNELS`` with ``extra`` appended (per-op settings win), for a while."""
    old = os.environ.get(runtime.ENV_VAR)
    os.environ[runtime.ENV_VAR] = runtime.setting_with(extra)
    try:
        yield
    finally:
        if old is None:
            del os.environ[runtime.ENV_VAR]
        else:
            os.environ[runtime.ENV_VAR] = old


def triton_depthwise_conv(x, weight, bias):
    """kernels.depthwise_conv on its opt-in Triton kernels: the 'fused' of the depthwise rows
    (the backend is chosen in the forward and kept for the backward)."""
    with kernels_setting("depthwise_conv=triton"):
        return kernels.depthwise_conv(x, weight, bias)


def triton_silu_conv1x1(z, weight, bias, scale, shift):
    """kernels.silu_conv1x1 on its opt-in Triton kernels (the modulated SiLU in the 1x1 conv's
    prologue, its backward in the input gradient's epilogue)."""
    with kernels_setting("pointwise_conv=triton"):
        return kernels.silu_conv1x1(z, weight, bias, scale, shift)


def triton_depthwise_head(x, dw_weight, dw_bias, weight, bias):
    """The CfC's g or h head without gradient on the Triton SiLU -> 1x1 conv forward with its
    3x3 in the prologue (opt-in, with the Triton depthwise kernels): a forward only."""
    return pointwise_conv.depthwise_forward(x, dw_weight, dw_bias, weight, bias, x.dtype)


def triton_conv1x1_silu(x, weight, bias):
    """The CfC backbone's 1x1 conv and SiLU without gradient on the Triton forward, SiLU in its
    epilogue (under ``auto`` in calls without gradient): a forward only."""
    return pointwise_conv.conv1x1_silu_forward(x, weight, bias, x.dtype)


def triton_feedforward(x, w1, b1, w2, b2, residual):
    """The FeedForward without gradient on its opt-in Triton kernel (both convs in one pass): a
    forward only."""
    return pointwise_conv.feedforward_forward(x, w1, b1, w2, b2, x.dtype, residual)


def _mix_input(spatial_mix_input):
    """``spatial_mix_input`` with one depthwise kernel (the merged 7x7 of the spatial mix), its
    inputs by name."""

    def run(x, weight, bias):
        return spatial_mix_input(x, [weight], [bias])

    return run


def triton_spatial_mix_input(x, weights, biases):
    """kernels.spatial_mix_input on the opt-in Triton depthwise kernels: x's three gradients summed
    in the input gradient's epilogue."""
    with kernels_setting("depthwise_conv=triton"):
        return kernels.spatial_mix_input(x, weights, biases)


HEAD_NAMES = ("f", "g", "h")


def _heads(silu_convs):
    """``silu_convs`` over the CfC's three heads, its inputs by name (as the benchmarks pass them)."""

    def run(z, f_w, f_b, g_w, g_b, h_w, h_b):
        return silu_convs(z, [f_w, g_w, h_w], [f_b, g_b, h_b])

    return run


def triton_silu_convs(z, weights, biases):
    """kernels.silu_convs with its g/h heads on the opt-in Triton depthwise kernels (one launch
    for the pair each way)."""
    with kernels_setting("depthwise_conv=triton"):
        return kernels.silu_convs(z, weights, biases)


_HEAD_PARAMS = tuple(f"{n}_{p}" for n in HEAD_NAMES for p in "wb")
CFC_KERNELS = {"backbone_dw": 7, "g_dw": 3, "h_dw": 3}  # the depthwise ones of CFC_CONVS; the rest are 1x1
_CFC_PARAMS = tuple(f"{name}_{p}" for name in functional.CFC_CONVS for p in "wb")


def _cfc_branch(parallel_cfc):
    """``parallel_cfc`` with its inputs by name (as the benchmarks pass them)."""

    def run(n, residual, a, b, rho, t, **params):
        convs = [(params[f"{name}_w"], params[f"{name}_b"]) for name in functional.CFC_CONVS]
        return parallel_cfc(n, convs, a, b, rho, t, residual=residual)

    return run


def pointwise_parallel_cfc(n, convs, a, b, rho, t, residual=None):
    """kernels.parallel_cfc with the opt-in Triton pointwise kernels: the heads and the gate in
    one forward kernel (cfc_heads.py), the g/h SiLU -> 1x1 backward in Triton."""
    with kernels_setting("pointwise_conv=triton"):
        return kernels.parallel_cfc(n, convs, a, b, rho, t, residual=residual)

OPS: dict[str, OpSpec] = {
    "cfc_relax": OpSpec(
        name="cfc_relax", title="CfC gate+relax", reference=functional.cfc_relax, fused=kernels.cfc_relax,
        activations=("f", "g", "h", "x"), outputs=("out",),
        saved=("f", "g", "h", "x", "a", "b", "rho", "t"),
        grad_writes=("f", "g", "h", "x", "a", "b", "rho", "t"),
    ),
    # Not in the report's table (the model's CfC calls pass a residual; the anchors time the op
    # without): used by the awkward-shape checks.
    "cfc_relax_residual": OpSpec(
        name="cfc_relax_residual", title="CfC gate+relax + residual", reference=functional.cfc_relax,
        fused=kernels.cfc_relax, activations=("f", "g", "h", "x", "residual"), outputs=("out",),
        saved=("f", "g", "h", "x", "a", "b", "rho", "t"),
        grad_writes=("f", "g", "h", "x", "a", "b", "rho", "t"), residual=True,
    ),
    "adaln": OpSpec(
        name="adaln", title="AdaLN", reference=functional.adaln_modulate, fused=kernels.adaln_modulate,
        activations=("x",), outputs=("out",), saved=("x", "scale"), grad_writes=("x", "scale", "shift"),
    ),
    "adaln_residual": OpSpec(
        name="adaln_residual", title="AdaLN + residual", reference=functional.adaln_modulate,
        fused=kernels.adaln_modulate, activations=("x", "residual"), outputs=("out", "s"),
        saved=("out:1", "scale"), grad_writes=("x", "scale", "shift"), residual=True,
    ),
    # The model's depthwise convolutions (7x7: CfC backbone and spatial mix; 3x3: CfC g/h heads):
    # cuDNN against the opt-in Triton kernel, channels_last (the layout that matters).
    **{
        f"dwconv{k}": OpSpec(
            name=f"dwconv{k}", title=f"depthwise conv {k}x{k}", reference=functional.depthwise_conv,
            fused=triton_depthwise_conv, activations=("x",), outputs=("out",), saved=("x", "weight"),
            grad_writes=("x", "weight", "bias"), kernel=k, layouts=("channels_last",),
        )
        for k in (7, 3)
    },
    # The spatial mix's activation (inside its silu_conv1x1, on by default).
    "modulated_silu": OpSpec(
        name="modulated_silu", title="modulated SiLU", reference=functional.modulated_silu,
        fused=kernels.modulated_silu, activations=("z",), outputs=("out",), saved=("z", "scale", "shift"),
        grad_writes=("z", "scale", "shift"),
    ),
    # The spatial mix's output: modulated SiLU -> 1x1 conv, cuDNN against the opt-in Triton
    # kernels (the SiLU in the conv's prologue, its backward in the input gradient's epilogue).
    "silu_conv1x1": OpSpec(
        name="silu_conv1x1", title="modulated SiLU->1x1 conv", reference=functional.silu_conv1x1,
        fused=triton_silu_conv1x1, activations=("z",), outputs=("out",), saved=("z", "weight", "scale", "shift"),
        grad_writes=("z", "weight", "bias", "scale", "shift"), layouts=("channels_last",),
    ),
    # The CfC backbone's SiLU and its three heads (f: 1x1 on cuDNN; g, h: 3x3 depthwise, the
    # opt-in Triton pair): what the g/h pairing saves against the reference and its compile.
    "cfc_heads": OpSpec(
        name="cfc_heads", title="CfC heads SiLU->f,g,h", reference=_heads(functional.silu_convs),
        fused=_heads(triton_silu_convs), activations=("z",), outputs=HEAD_NAMES, saved=("z", *_HEAD_PARAMS),
        grad_writes=("z", *_HEAD_PARAMS), heads=True, layouts=("channels_last",),
    ),
    # The CfC's g or h head in a call without gradient (sampling): the 3x3 computed in the Triton
    # SiLU -> 1x1 conv forward's prologue (opt-in with the Triton depthwise kernels), against
    # cuDNN's 3x3, SiLU and 1x1 and their compile. A forward only: the kernel has no backward.
    "depthwise_head": OpSpec(
        name="depthwise_head", title="depthwise 3x3->SiLU->1x1 conv", reference=functional.depthwise_silu_conv1x1,
        fused=triton_depthwise_head, activations=("x",), outputs=("out",), saved=(), grad_writes=(),
        layouts=("channels_last",), modes=("fwd",),
    ),
    # The CfC backbone's 1x1 and SiLU in a call without gradient (sampling): SiLU in the Triton
    # forward's epilogue, against cuDNN's (or cuBLAS's) conv and aten's SiLU, and their compile.
    "conv1x1_silu": OpSpec(
        name="conv1x1_silu", title="1x1 conv->SiLU", reference=functional.conv1x1_silu, fused=triton_conv1x1_silu,
        activations=("x",), outputs=("out",), saved=(), grad_writes=(), layouts=("channels_last",), modes=("fwd",),
    ),
    # The FeedForward in a call without gradient (sampling): both 1x1 convs in one Triton pass
    # (opt-in with the Triton pointwise kernels), the hidden tensor never written, against
    # cuDNN's two convs with aten's SiLU and add, and their compile.
    "feedforward": OpSpec(
        name="feedforward", title="FeedForward 1x1->SiLU->1x1 + residual", reference=functional.feedforward,
        fused=triton_feedforward, activations=("x", "residual"), outputs=("out",), saved=(), grad_writes=(),
        residual=True, layouts=("channels_last",), modes=("fwd",),
    ),
    # Not in the report's table (the model rows time it): memcheck of the CfC heads + gate
    # forward kernel and of the pointwise backward kernels as the CfC branch runs them.
    "cfc_branch_pointwise": OpSpec(
        name="cfc_branch_pointwise", title="ParallelCfC branch, Triton pointwise",
        reference=_cfc_branch(functional.parallel_cfc), fused=_cfc_branch(pointwise_parallel_cfc),
        activations=("n", "residual"), outputs=("out",), saved=("n", "a", "b", "rho", "t", *_CFC_PARAMS),
        grad_writes=("n", "a", "b", "rho", "t", *_CFC_PARAMS), residual=True, cfc_branch=True,
    ),
    # Not in the report's table (the dwconv7 row times its convolution): memcheck of the two ways
    # x's three gradients meet, the Triton depthwise input gradient's epilogue (a full-size and a
    # per-(b, c) addend) and, after cuDNN's input gradient, the Triton gradient sum.
    **{
        name: OpSpec(
            name=name, title="spatial mix input", reference=_mix_input(functional.spatial_mix_input),
            fused=_mix_input(fused), activations=("x",), outputs=("local", "pixel_sum", "x"),
            saved=("x", "weight"), grad_writes=("x", "weight", "bias"), kernel=7, layouts=("channels_last",),
        )
        for name, fused in (("mix_input", triton_spatial_mix_input), ("mix_input_cudnn", kernels.spatial_mix_input))
    },
}
OP_NAMES = ("cfc_relax", "adaln", "adaln_residual", "modulated_silu", "dwconv7", "dwconv3", "cfc_heads",
            "silu_conv1x1", "conv1x1_silu", "depthwise_head", "feedforward")  # the report's and the suites' ops
ALL_OP_NAMES = tuple(OPS)


def _randn(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def _activation(shape, dtype, device, layout, generator):
    """Fresh N(0, 1) values in the requested memory layout (never zeros)."""
    B, C, H, W = shape
    if layout in SLICE_LAYOUTS:
        wide = _randn((B, C + 3, H, W), dtype, device, generator)
        if layout == "cl_slice":
            wide = wide.contiguous(memory_format=torch.channels_last)
        return wide[:, 1 : C + 1]
    t = _randn(shape, dtype, device, generator)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout != "nchw":
        raise ValueError(f"layout: expected one of {LAYOUTS + SLICE_LAYOUTS}, got {layout!r}")
    return t


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class OpCase:
    """Inputs and upstream grads of one op at one shape / dtype / layout, built once."""

    spec: OpSpec
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    layout: str
    inputs: dict[str, torch.Tensor]
    upstream: tuple[torch.Tensor, ...]

    def leaves(self) -> dict[str, torch.Tensor]:
        """Copies of the inputs that require grad (same values, same layout)."""
        out = {}
        for k, v in self.inputs.items():
            leaf = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
            out[k] = leaf.copy_(v).requires_grad_(True)
        return out

    # -- the callables that are timed ---------------------------------------------------
    def fwd(self, fn) -> Callable[[], tuple]:
        inputs = self.inputs

        def run():
            return as_tuple(fn(**inputs))

        return run

    def fwdbwd(self, fn) -> Callable[[], tuple]:
        """Forward then the gradients of every input for the fixed upstream grads.

        ``torch.autograd.grad`` returns fresh gradients: nothing accumulates into ``.grad``, so
        no implementation pays for an add the others do not have.
        """
        leaves = self.leaves()
        params = list(leaves.values())
        upstream = self.upstream

        def run():
            outs = as_tuple(fn(**leaves))
            return torch.autograd.grad(outs, params, upstream, allow_unused=True)

        return run

    # -- the memory floor ------------------------------------------------------------------
    def floor_bytes(self, mode: str) -> int:
        ins = sum(nbytes(t) for t in self.inputs.values())
        outs = sum(nbytes(u) for u in self.upstream)  # outputs have the upstream's shape/dtype
        fwd = ins + outs
        if mode == "fwd":
            return fwd
        reads = outs  # the upstream grads
        for name in self.spec.saved:
            if name.startswith("out:"):
                reads += nbytes(self.upstream[int(name[4:])])
            else:
                reads += nbytes(self.inputs[name])
        writes = sum(nbytes(self.inputs[n]) for n in self.spec.grad_writes)
        return fwd + reads + writes


def make_op_case(name: str, shape=None, dtype=None, device=None, layout="nchw", seed=0, cast=None) -> OpCase:
    """Inputs of op ``name`` in ``dtype``; ``cast`` gives some inputs another dtype (autocast
    mixes: bf16 activations with fp32 ``rho``, ``t`` and residual stream)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    shape = tuple(shape or (OP_SHAPE if device.type == "cuda" else QUICK_OP_SHAPE))
    spec = OPS[name]
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = spec.make_inputs(shape, dtype, device, layout, gen)
    for k, dt in (cast or {}).items():
        if k in inputs:
            v = inputs[k]
            inputs[k] = torch.empty_strided(v.shape, v.stride(), dtype=dt, device=device).copy_(v)
    with torch.no_grad():
        outs = as_tuple(spec.reference(**inputs))
    # Upstream grads: fixed, random, in each output's dtype and memory format.
    upstream = tuple(
        _randn(o.shape, o.dtype, device, gen).contiguous(memory_format=_format_of(o)) for o in outs
    )
    return OpCase(spec, shape, dtype, device, layout, inputs, upstream)


def _format_of(t: torch.Tensor):
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def implementation(spec: OpSpec, impl: str) -> Callable:
    """The callable for ``impl``: the reference, a fresh torch.compile of it, or the fused op."""
    if impl == "eager":
        return spec.reference
    if impl == "fused":
        return spec.fused
    if impl == "compile":
        set_compile_limits()
        # Static shapes: a recompile for the other layout must not turn on dynamic shapes.
        return torch.compile(spec.reference, dynamic=False)
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def op_callable(case: OpCase, impl: str, mode: str, fn: Callable | None = None) -> Callable[[], tuple]:
    fn = fn or implementation(case.spec, impl)
    if mode == "fwd":
        return case.fwd(fn)
    if mode == "fwdbwd":
        return case.fwdbwd(fn)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------------- checks
def rel_err(out: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||out - ref|| / ||ref|| in fp64 (on ref's device); NaN anywhere gives NaN; missing is inf."""
    if out is None or ref is None:
        return float("inf")
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def parity(case: OpCase, fn: Callable | None = None, ref_device=None) -> dict[str, float]:
    """Relative errors of ``fn`` (default: the fused op) against the reference on fp64 upcasts
    of the same inputs, for every output and every input gradient (same upstream grads; an op
    whose spec has no fwd+bwd mode: its outputs alone, without grad)."""
    fn = fn or case.spec.fused
    backward = "fwdbwd" in case.spec.modes  # else a forward without autograd: its outputs alone
    leaves = case.leaves() if backward else case.inputs
    names = list(leaves)
    with torch.set_grad_enabled(backward):
        outs = as_tuple(fn(**leaves))
    grads = (torch.autograd.grad(outs, [leaves[n] for n in names], case.upstream, allow_unused=True)
             if backward else [])
    ref_device = torch.device(ref_device) if ref_device is not None else case.device
    ref_leaves = {k: v.detach().to(device=ref_device, dtype=torch.float64).requires_grad_(backward)
                  for k, v in case.inputs.items()}
    ref_outs = as_tuple(case.spec.reference(**ref_leaves))
    ups = [u.to(device=ref_device, dtype=torch.float64) for u in case.upstream]
    ref_grads = (torch.autograd.grad(ref_outs, [ref_leaves[n] for n in names], ups, allow_unused=True)
                 if backward else [])
    errors = {}
    for oname, o, r in zip(case.spec.outputs, outs, ref_outs):
        errors[oname] = rel_err(o, r)
    for n, g, r in zip(names, grads, ref_grads):
        errors["d" + n] = rel_err(g, r)
    return errors


def max_error(errors: dict[str, float]) -> float:
    vals = list(errors.values())
    if any(v != v for v in vals):
        return float("nan")
    return max(vals) if vals else float("nan")


def check_finite(name: str, tensors) -> None:
    """Raises when any output or gradient is missing or not finite: a smoke check, no timing."""
    for i, t in enumerate(tensors):
        if t is None:
            raise AssertionError(f"{name}: result {i} is missing")
        if not torch.isfinite(t.detach()).all():
            raise AssertionError(f"{name}: result {i} has non-finite values")


# --------------------------------------------------------------------------------- memory
def saved_tensor_bytes(fn: Callable, case: OpCase) -> dict[str, float]:
    """What the forward keeps for backward: unique storages seen by the saved-tensor pack hook.

    ``saved_MB`` counts every unique storage (inputs included: saving an input keeps it alive);
    ``saved_new_MB`` only those that are not inputs (intermediates and outputs).
    """
    leaves = case.leaves()
    input_ptrs = {v.untyped_storage().data_ptr() for v in leaves.values()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = as_tuple(fn(**leaves))
    del outs
    total = sum(seen.values())
    new = sum(b for p, b in seen.items() if p not in input_ptrs)
    return {"saved_MB": total / 1e6, "saved_new_MB": new / 1e6, "saved_tensors": len(seen)}


def retained_after_forward(fn: Callable, case: OpCase) -> float | None:
    """CUDA: bytes newly allocated and still held after a forward with grad (outputs included)."""
    if case.device.type != "cuda":
        return None
    leaves = case.leaves()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    outs = as_tuple(fn(**leaves))
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    del outs
    return (after - before) / 1e6


# --------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable, device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms: CUDA events through triton.testing.do_bench on a GPU, the
    wall clock on the CPU (a few calls: the CPU numbers only prove the code runs)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    stop = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < stop and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_graph_ms(fn: Callable, device, rep_ms: float = 10) -> float | None:
    """Median GPU time of ``fn`` in ms replayed from a CUDA graph of repeated calls
    (triton.testing.do_bench_cudagraph): its kernels alone, without the host's Python, dispatch
    and launch costs, which ``time_ms`` includes wherever they outlast the kernels. None off
    CUDA (no graphs there)."""
    if torch.device(device).type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def copy_bandwidth_GBps(device, nbytes_total: int | None = None) -> float:
    """One large device-to-device copy, counting bytes read plus bytes written."""
    device = torch.device(device)
    if nbytes_total is None:
        nbytes_total = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes_total // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=25, rep_ms=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class E2EConfig:
    preset: str = "tiny"
    image: int = 256
    batch: int = 8
    overrides: tuple = ()  # (name, value) pairs for liquiddiff.model.build
    train_warmup: int = 2
    train_steps: int = 10
    sample_steps: int = 50
    sample_runs: int = 1

    def describe(self) -> str:
        extra = f" {dict(self.overrides)}" if self.overrides else ""
        return f"{self.preset}{extra}, {self.image} px, batch {self.batch}"


FULL_E2E = E2EConfig()
# Small enough for the CPU (fused ops under the interpreter): proves the code path only.
QUICK_E2E = E2EConfig(
    preset="micro", image=16, batch=2, overrides=(("channels", (16, 32)),),
    train_warmup=1, train_steps=2, sample_steps=3, sample_runs=1,
)


def e2e_config(quick: bool) -> E2EConfig:
    return QUICK_E2E if quick else FULL_E2E


def memory_format(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def build_trainer(cfg: E2EConfig, *, fused: bool, layout: str, device=None, seed: int = 0,
                  cuda_graph: bool = False, compile: bool | dict = False) -> RectifiedFlowTrainer:
    """A RectifiedFlowTrainer (AdamW, EMA, bf16 autocast on CUDA) over the preset, in ``layout``;
    ``cuda_graph``: its train steps replay the model call from CUDA graphs; ``compile``: the
    model runs through torch.compile (the trainer's option, as a user turns it on: True, or a
    dict of torch.compile's options).

    The model is put in its memory format before the trainer is made, so the EMA copy and the
    optimizer see the same layout.
    """
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    model = build(cfg.preset, fused=fused, **dict(cfg.overrides))
    model = model.to(device=device, memory_format=memory_format(layout))
    return RectifiedFlowTrainer(model, lr=1e-4, device=device, channels_last=layout == "channels_last",
                                cuda_graph=cuda_graph, compile=compile)


def make_images(cfg: E2EConfig, layout: str, device=None, seed: int = 1) -> torch.Tensor:
    """A fixed batch of random images in [-1, 1] (random, not zeros), in ``layout``."""
    device = torch.device(device) if device is not None else default_device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(cfg.batch, 3, cfg.image, cfg.image, generator=gen) * 2 - 1
    return x.to(device).contiguous(memory_format=memory_format(layout))


def dynamo_counts() -> dict[str, int]:
    """Graphs dynamo compiled and graph breaks so far in this process (0 graphs: not compiled)."""
    try:
        from torch._dynamo.utils import counters

        return {
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}

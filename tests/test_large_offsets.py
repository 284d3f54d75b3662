"""Every fused op's Triton kernels on tensors past 2**31 elements, under the interpreter.

A GPU computes an int32 offset that passes 2**31 modulo 2**32, and the kernel reads or writes
another place: the activations of a 512 px batch of 64 at 128 channels are 2**31 elements, and
a fully convolutional model samples any image size. The parity tests cannot see it: their
tensors are small. Here the tensors are that large, and

- each launch runs only its corner programs (``strict_interpreter.corner_programs``): those
  that reach the largest offsets, with their real program ids and grid. All of them would take
  the interpreter hours;
- the strict interpreter raises on an int32 sum, difference or product that does not fit, and
  on an access outside the launch's tensors;
- the tensors' memory is touched only where the test writes (``torch.empty`` commits no page
  before it is written): a 16 x 8 pixel patch at two corners of the last batch item;
- at those corners, the first and last channels of every activation output and activation
  gradient must equal the op's on the patch alone (whole grid, small).

The ops run forward and backward through autograd, or, where their public op does work of
its own on the whole tensor (SiLU in torch before the CfC's heads), as their launchers: forward,
then backward for an upstream gradient that is one more input. Parameter gradients (sums over
every pixel) are not compared: most programs did not run.

On a GPU (``gpu``) the same check runs whole, in bf16 (4.5 GB a tensor, up to eleven of them):
the 64-bit-offset variants compiled for the GPU and run there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing

import pytest
import torch

from liquiddiff import kernels
from liquiddiff.kernels import cfc_heads, depthwise, pointwise_conv
from tests import strict_interpreter

interpreted = pytest.mark.skipif(not (strict_interpreter.supported() and not torch.cuda.is_available()),
                                 reason="needs Triton's interpreter, made strict (tests/strict_interpreter.py)")

# Past 2**31 elements over the batch (65537 items of 2**15: past the 65535 programs a grid axis
# holds, so two launches), and in one item (where, in NCHW, even the last channel starts past
# 2**31).
SHAPES = {"batch": (65537, 8, 64, 64), "item": (1, 32, 64, 1090000)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PATCH = (16, 8)  # rows, columns: wider than the 7x7 convolution's reach of 3
CORNERS = {"top_left": (slice(0, PATCH[0]), slice(0, PATCH[1])),
           "bottom_right": (slice(-PATCH[0], None), slice(-PATCH[1], None))}


@dataclasses.dataclass
class Case:
    op: typing.Callable
    activations: tuple[str, ...]  # [B, C, H, W] inputs
    batched: tuple[str, ...]  # [B, ...] inputs, sliced to the last item for the patch
    other: typing.Callable[[int], dict]  # C -> the inputs that do not depend on B, H, W
    autograd: bool = True  # False: ``op`` returns its forward outputs and gradients itself


def _gate(C):
    return {"rho": torch.randn(C)}


def _cfc_heads(backbone, g_hidden, h_hidden, x, residual, grad_out, a, b, t, rho, heads):
    """The CfC heads + gate kernels (the opt-in pointwise path of parallel_cfc), both ways."""
    out = cfc_heads.forward(backbone, g_hidden, h_hidden, heads, x, a, b, rho, t, residual, x.dtype)
    grads = cfc_heads.backward(grad_out, backbone, g_hidden, h_hidden, heads, x, a, b, rho, t, x.dtype, [True] * 8)
    return [out, *grads[:4]]


def _head_weights(C):
    return {"rho": torch.randn(C), "heads": [(torch.randn(C, C, 1, 1) / C ** 0.5, torch.randn(C)) for _ in range(3)]}


def _depthwise_pair(x, z, addend, grad_g, grad_h, weights, biases):
    """The CfC's g/h 3x3 pair over x = silu(z): one launch each way, the input gradient with an
    addend and SiLU's backward in its epilogue (as silu_convs runs it)."""
    outs = depthwise.forward(x, weights, biases, x.dtype)
    d_z, _, _ = depthwise.backward([grad_g, grad_h], x, weights, x.dtype, [True, True, True], silu_input=z,
                                   addend=addend)
    return [*outs, d_z]


def _depthwise_head(x, dw_weight, dw_bias, weight, bias):
    """The CfC's g or h head without gradient: its 3x3 in the SiLU -> 1x1 conv's prologue."""
    return [pointwise_conv.depthwise_forward(x, dw_weight, dw_bias, weight, bias, x.dtype)]


def _backbone_pointwise(x, weight, bias):
    """The CfC backbone's 1x1 conv without gradient, SiLU in its epilogue."""
    return [pointwise_conv.conv1x1_silu_forward(x, weight, bias, x.dtype)]


def _feedforward(x, residual, w1, b1, w2, b2):
    """The FeedForward without gradient, both convs in one pass."""
    return [pointwise_conv.feedforward_forward(x, w1, b1, w2, b2, x.dtype, residual)]


def _weights(*kernel_sizes):
    return lambda C: {"weights": [torch.randn(C, 1, k, k) / k for k in kernel_sizes],
                      "biases": [torch.randn(C) for _ in kernel_sizes]}


CASES = {
    "cfc_relax": Case(kernels.cfc_relax, ("f", "g", "h", "x", "residual"), ("a", "b", "t"), _gate),
    "adaln_modulate": Case(kernels.adaln_modulate, ("x", "residual"), ("scale", "shift"), lambda C: {}),
    "modulated_silu": Case(kernels.modulated_silu, ("z",), ("scale", "shift"), lambda C: {}),
    "silu_conv1x1": Case(kernels.silu_conv1x1, ("z", "residual"), ("scale", "shift"),
                         lambda C: {"weight": torch.randn(C, C, 1, 1) / C ** 0.5, "bias": torch.randn(C)}),
    "depthwise_conv": Case(kernels.depthwise_conv, ("x",), (),
                           lambda C: {"weight": torch.randn(C, 1, 7, 7) / 7, "bias": torch.randn(C)}),
    "spatial_mix_input": Case(kernels.spatial_mix_input, ("x",), (), _weights(3, 5, 7)),
    "cfc_heads": Case(_cfc_heads, ("backbone", "g_hidden", "h_hidden", "x", "residual", "grad_out"), ("a", "b", "t"),
                      _head_weights, autograd=False),
    "depthwise_pair": Case(_depthwise_pair, ("x", "z", "addend", "grad_g", "grad_h"), (),
                           lambda C: {"weights": [torch.randn(C, 1, 3, 3) / 3 for _ in range(2)],
                                      "biases": [torch.randn(C), None]}, autograd=False),
    "depthwise_head": Case(_depthwise_head, ("x",), (),
                           lambda C: {"dw_weight": torch.randn(C, 1, 3, 3) / 3, "dw_bias": torch.randn(C),
                                      "weight": torch.randn(C, C, 1, 1) / C ** 0.5, "bias": torch.randn(C)},
                           autograd=False),
    "backbone_pointwise": Case(_backbone_pointwise, ("x",), (),
                               lambda C: {"weight": torch.randn(C, C, 1, 1) / C ** 0.5, "bias": torch.randn(C)},
                               autograd=False),
    "feedforward": Case(_feedforward, ("x", "residual"), (),
                        lambda C: {"w1": torch.randn(2 * C, C, 1, 1) / C ** 0.5, "b1": torch.randn(2 * C),
                                   "w2": torch.randn(C, 2 * C, 1, 1) / (2 * C) ** 0.5, "b2": torch.randn(C)},
                        autograd=False),
}


def _patched_activation(shape, fmt, dtype) -> torch.Tensor:
    """An uninitialised [B, C, H, W] tensor with random values in the last item's corner patches."""
    t = torch.empty(shape, memory_format=fmt, dtype=dtype)
    for rows, cols in CORNERS.values():
        t[-1, :, rows, cols] = torch.randn(shape[1], PATCH[0], PATCH[1], dtype=dtype)
    return t


def _batched(name, B, C):
    return torch.rand(B) if name == "t" else torch.randn(B, C)


def _cast(v, dtype):
    """``v``, or each tensor in a list or tuple of them, in ``dtype``."""
    if isinstance(v, (list, tuple)):
        return type(v)(_cast(u, dtype) for u in v)
    return v if v is None else v.to(dtype)


def _inputs(case: Case, shape, fmt, dtype) -> dict:
    B, C = shape[:2]
    small = {**{n: _batched(n, B, C) for n in case.batched}, **case.other(C)}
    return {**{n: _patched_activation(shape, fmt, dtype) for n in case.activations},
            **{n: _cast(v, dtype) for n, v in small.items()}}


def _tensors_of(inputs: dict) -> list[torch.Tensor]:
    """The tensors among ``inputs`` (through lists: the convolutions' weights and biases)."""
    flat = []
    for v in inputs.values():
        flat += v if isinstance(v, list) else [v]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _patch_of(inputs: dict, case: Case, rows, cols, fmt) -> dict:
    """The inputs of the op on the last item's patch (the others as they are)."""
    def cut(name, v):
        if name in case.activations:
            v = v[-1:, :, rows, cols].contiguous(memory_format=fmt)
        elif name in case.batched:
            v = v[-1:]
        else:
            return v
        return v.detach().requires_grad_(case.autograd)
    return {n: cut(n, v) for n, v in inputs.items()}


def _run(case: Case, inputs: dict, upstream: typing.Callable) -> list:
    """The op's outputs and the gradients of its inputs for upstream gradients made by
    ``upstream`` (an autograd case; else what the op returns)."""
    if not case.autograd:
        return case.op(**inputs)
    outs = case.op(**inputs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
    grads = torch.autograd.grad(outs, _tensors_of(inputs), [upstream(o) for o in outs], allow_unused=True)
    return [*outs, *grads]


def check_past_2_31(case: Case, shape, fmt, dtype, tol: float, running) -> None:
    """The op at ``shape`` (``running``: the programs that run) against it on its corner patches."""
    inputs = _inputs(case, shape, fmt, dtype)
    for t in _tensors_of(inputs):
        t.requires_grad_(case.autograd)
    upstreams = {}  # one per output: the same values reach the patch runs

    def big_upstream(out):
        up = _patched_activation(out.shape, fmt, out.dtype) if out.dim() == 4 else torch.randn_like(out)
        upstreams[len(upstreams)] = up
        return up

    with running:
        results = _run(case, inputs, big_upstream)

    compared = 0
    for corner, (rows, cols) in CORNERS.items():
        ups = iter(upstreams.values())
        wanted = _run(case, _patch_of(inputs, case, rows, cols, fmt),
                      lambda o: next(ups)[-1:, :, rows, cols] if o.dim() == 4 else next(ups)[-1:])
        pixel = (0, 0) if corner == "top_left" else (-1, -1)
        for i, (got, want) in enumerate(zip(results, wanted)):
            if got is None or got.dim() != 4 or got.shape[0] != shape[0]:
                continue  # a parameter's gradient, or one the op does not give
            for c in (0, -1):
                g, w = got[-1, c, pixel[0], pixel[1]], want[0, c, pixel[0], pixel[1]]
                assert torch.isclose(g, w, rtol=tol, atol=tol), f"result {i}, channel {c}, {corner}: {g} != {w}"
                compared += 1
    # An output and a gradient at least (a forward alone: its output), at both corners.
    assert compared >= (8 if len(results) > 1 else 4), compared


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_kernels_past_2_31_elements(name, where, layout, monkeypatch):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    # Raises on an int32 overflow, a stray access, a grid a GPU refuses.
    check_past_2_31(CASES[name], SHAPES[where], LAYOUTS[layout], torch.float32, 1e-5,
                    strict_interpreter.corner_programs())


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_kernels_past_2_31_elements_in_one_item_on_a_gpu(name, layout, monkeypatch):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    case, shape = CASES[name], SHAPES["item"]
    # Inputs, outputs and gradients: about twice the activations, 4.5 GB each in bf16. Other
    # gpu tests may hold memory in other processes (an eager train step: 24 GB).
    needed, free = (2 * len(case.activations) + 2) * 2 * torch.Size(shape).numel(), torch.cuda.mem_get_info()[0]
    if free < needed:
        pytest.skip(f"needs about {needed / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
    try:
        with torch.device("cuda"):
            check_past_2_31(case, shape, LAYOUTS[layout], torch.bfloat16, 1e-2, contextlib.nullcontext())
    finally:
        torch.cuda.empty_cache()  # 50 GB this process would keep from the others' tests

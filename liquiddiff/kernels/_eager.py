"""Eager calls of the fused ops without the custom-op dispatcher.

A ``torch.library.custom_op`` is what ``torch.compile`` needs (one opaque op, no graph break),
but in eager mode its Python dispatch (schema checks, default filling, redispatch, a second
custom op for the backward) costs host time the GPU cannot hide when an op is small:
``python -m benchmarks.host_overhead`` (launches stubbed out) measured the CfC op's
forward+backward at about 270 us of Python through the custom op and 170 us through a plain
autograd.Function over the same launchers, on the 2-core CI machine (benchmarks/RESULTS.md). Eager calls take this path; traced calls take the
custom op (:func:`needs_custom_op`).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running ``forward`` and ``backward`` (the launchers) directly, with
    the ``setup_context`` shared with the custom op's ``register_autograd``."""

    def _forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # The backward launches Triton kernels, which autograd cannot differentiate again: a double
    # backward (create_graph=True) raises, as the custom op's does, instead of returning
    # gradients without a graph.
    @torch.autograd.function.once_differentiable
    def _backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(_forward), "backward": staticmethod(_backward),
    })


def needs_custom_op(t: torch.Tensor) -> bool:
    """Traced calls (torch.compile, export, FakeTensorMode, functionalization) need the custom
    op: its fake kernel and its opaque graph node. A plain eager tensor does not, nor does a
    Parameter outside any dispatch mode (the merged depthwise kernel's branch weights, which took
    the dispatcher at twice the host time); a Parameter of fake data is a FakeTensor, and a real
    one under FakeTensorMode (a model built outside it) must reach the fake kernel too."""
    if torch.compiler.is_compiling():
        return True
    kind = type(t)
    return kind is not torch.Tensor and (kind is not torch.nn.Parameter or is_in_torch_dispatch_mode())

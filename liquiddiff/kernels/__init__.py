"""The fused model's ops, each with the signature of its reference in :mod:`liquiddiff.functional`.

``cfc_relax`` and ``adaln_modulate``: Triton forward and backward kernels, registered as
``torch.library.custom_op``s (what torch.compile traces) and called through a plain
autograd.Function in eager mode (``_eager.py``). The runtime selection in
:mod:`liquiddiff.kernels.runtime` decides whether the Triton kernels or the reference run, and
:func:`backend_report` says which and why. ``silu_conv1x1``, ``silu_convs``, ``conv1x1``, ``feedforward``,
``depthwise_conv`` and ``spatial_mix_input`` (``recompute.py``): convolutions that keep
less for backward (the last, the spatial mix's reads of its input: no more than the reference,
and one gradient pass for x's three uses), on cuDNN / aten, their depthwise ones
on the Triton kernels of ``depthwise.py`` when that backend is chosen (opt-in,
``runtime.OPT_IN``), their modulated SiLU (the spatial mix's) on those of ``modulated_silu.py``,
which is also an op of its own (``modulated_silu``); ``recompute_saved``: autograd keeps the
call that made a tensor instead of the tensor. ``merged_depthwise_weight``
(``merged_depthwise.py``): the spatial mix's three depthwise kernels as one, one launch each
way; ``context_shift`` (``context_shift.py``): the spatial mix's global context folded into its
shift, one launch each way. ``parallel_cfc`` (``parallel_cfc.py``): ParallelCfC's whole branch
(its convolutions, SiLUs and the CfC op) as one autograd node whose backward remakes each
activation once and sums n's two gradients where they are made; ``normalized_parallel_cfc``,
the same with the AdaLN before it (n = AdaLN(u), u the residual) in the node, n written once in
the convolutions' dtype and remade exactly from u by the CfC kernels.
"""
from __future__ import annotations

import torch

from .adaln import adaln_modulate
from .cfc_relax import cfc_relax
from .context_shift import context_shift
from .merged_depthwise import merged_depthwise_weight
from .modulated_silu import modulated_silu
from .parallel_cfc import normalized_parallel_cfc, normalized_parallel_cfc_runs, parallel_cfc
from .runtime import OPS, Backend, policy, select_backend
from .recompute import (conv1x1, depthwise_conv, feedforward, recompute_saved, silu_conv1x1, silu_convs,
                        spatial_mix_input)

__all__ = ["cfc_relax", "adaln_modulate", "normalized_parallel_cfc", "normalized_parallel_cfc_runs", "modulated_silu", "merged_depthwise_weight", "context_shift", "parallel_cfc", "silu_conv1x1", "silu_convs", "conv1x1", "feedforward", "depthwise_conv", "spatial_mix_input", "recompute_saved", "backend_report", "select_backend", "policy", "Backend", "OPS"]


def backend_report(device: torch.device | str | None = None) -> dict[str, Backend]:
    """For each fused op, the backend that will run on ``device`` (default: CUDA if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: select_backend(op, device) for op in OPS}

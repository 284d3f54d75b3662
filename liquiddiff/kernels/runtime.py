"""Runtime selection: the one place that decides whether an op runs Triton or PyTorch.

Triton can run an op when Triton imports and either the tensors are on a CUDA device or the
Triton interpreter is on (``TRITON_INTERPRET=1``, how CI runs the kernels on the CPU).
``LIQUIDDIFF_KERNELS`` chooses the policy:

- ``auto`` (default): Triton where it can run, else the PyTorch reference (a warning, once);
- ``triton``: Triton or a RuntimeError that says what is missing;
- ``torch``: always the PyTorch reference.

Per-op settings follow after commas and override it for that op: ``auto,depthwise_conv=triton``.
An op in ``OPT_IN`` runs its PyTorch path under ``auto`` until its kernel has been measured
faster; it runs Triton when named ``=triton`` (or ``LIQUIDDIFF_KERNELS=triton``). An opt-in op
in ``FORWARD_ONLY`` runs its forward kernel under ``auto`` (``grad=False``: the choice for a
forward kernel, and for a call that records no gradient, sampling or inference), which measured
faster, and its PyTorch backward in a call that records one (``grad=True``), whose kernel did
not measure faster. An op in ``MIN_CAPABILITY`` runs its PyTorch path under ``auto`` on an older GPU
(the current device's compute capability), where its kernels compile but spill; named
``=triton``, it still runs there.
"""
from __future__ import annotations

import functools
import os
import types
import warnings
from dataclasses import dataclass

import torch

POLICIES = ("auto", "triton", "torch")
ENV_VAR = "LIQUIDDIFF_KERNELS"
# The ops with Triton kernels, as select_backend names them ("depthwise_conv": the depthwise
# convolutions inside the recompute ops, and without gradient the CfC g/h heads' 3x3s in the
# SiLU -> 1x1 conv forward's prologue when that forward runs; "modulated_silu": the spatial mix's activation inside
# silu_conv1x1; "merged_depthwise_weight", "context_shift": the spatial mix's small [C] and
# [B, C] ops; "pointwise_conv": the SiLU -> 1x1 conv kernels and the CfC heads kernel;
# "conv_bias_grad": the bias gradient of the convolutions left to cuDNN, a per-channel sum).
OPS = ("cfc_relax", "adaln_modulate", "depthwise_conv", "modulated_silu", "merged_depthwise_weight", "context_shift",
       "pointwise_conv", "conv_bias_grad")


@dataclass(frozen=True)
class Backend:
    name: str  # "triton" or "torch"
    reason: str
    # PyTorch chosen on purpose (asked for, opt-in, an older GPU), not because Triton cannot run:
    # no fallback warning.
    deliberate: bool = False

    @property
    def is_triton(self) -> bool:
        return self.name == "triton"


# Ops whose Triton kernel is not the default yet, and why.
# The first GPU report (H100, 2026-11-27, benchmarks/RESULTS.md) measured both slower than cuDNN:
# a train step of the tiny preset took 260 ms with the depthwise kernels, 298 ms with both sets,
# against 255 ms without.
OPT_IN = {
    "depthwise_conv": "PyTorch (cuDNN on a GPU): the Triton depthwise conv is opt-in until a GPU report times its "
                      "rewrite (the first design measured slower than cuDNN: benchmarks/RESULTS.md)",
    "pointwise_conv": "PyTorch (SiLU, then cuDNN on a GPU) for the backward: the Triton SiLU -> 1x1 conv backward "
                      "kernels are opt-in, their forward+backward measured slower than cuDNN's (benchmarks/RESULTS.md)",
}

# Opt-in ops whose Triton forward measured faster than PyTorch's path: ``auto`` runs it, and
# the backward on PyTorch's path where autograd records the call (its remakes of the activation
# are the same either way). The SiLU -> 1x1 conv forward (H100, bf16 [8, 64, 256, 256]
# channels_last, replayed from a CUDA graph): 0.058 ms, against 0.151 for torch.compile and the
# fused path's two passes (the Triton modulated SiLU alone 0.047, then cuDNN's GEMM); and the
# FeedForward's residual add goes into its epilogue. It runs the FeedForward's and the spatial
# mix's last convs and the CfC's g and h 1x1 heads, and the CfC backbone's 1x1 with its SiLU in
# the same kernel's epilogue (not timed yet: the same tiles, the activation after the GEMM); the
# CfC heads kernel (f, g, h and the gate in one) and the FeedForward's two convs in one kernel,
# gated by the same op, keep the training choice (the first's forward, 0.42 ms, did not beat
# torch.compile's 0.36; the second is not timed yet).
FORWARD_ONLY = {
    "pointwise_conv": "Triton's SiLU -> 1x1 conv forward kernel and its variants (the CfC backbone's 1x1 with its "
                      "SiLU, the FeedForward's first conv): it measured faster than SiLU + cuDNN's forward "
                      "(benchmarks/RESULTS.md)",
}

# Ops whose kernels spill below a compute capability, so that auto keeps PyTorch's path there.
# Triton's tl.dot has no tensor-core path for these tiles before Ampere: on sm_75 (the T4) the
# SiLU -> 1x1 conv kernels take 255 registers and 312-376 bytes of stack, in fp16 and in bf16,
# with Triton 3.6 and 3.9 (``python -m benchmarks.kernel_resources --sm 75``); the CfC heads
# kernels this op gates take up to 198 registers; the default kernels stay under 128, no spill.
MIN_CAPABILITY = {"pointwise_conv": (8, 0)}


@functools.lru_cache(maxsize=32)
def _parse(setting: str | None) -> tuple[str, types.MappingProxyType]:
    """(global policy, {op: policy}) of a ``LIQUIDDIFF_KERNELS`` value; parsed once per value
    (the fused model asks on every op call)."""
    raw = (setting or "auto").strip().lower() or "auto"
    glob, per_op = "auto", {}
    for item in (part.strip() for part in raw.split(",")):
        name, sep, value = item.rpartition("=")
        if value not in POLICIES or (sep and not name):
            raise ValueError(f"{ENV_VAR}={raw!r}: expected a policy ({', '.join(POLICIES)}), then optional "
                             f"op=policy items separated by commas, got {item!r}")
        if sep and name.strip() not in OPS:  # a typo would otherwise leave the op on its default, silently
            raise ValueError(f"{ENV_VAR}={raw!r}: no op {name.strip()!r}; the ops are {', '.join(OPS)}")
        if sep:
            per_op[name.strip()] = value
        else:
            glob = value
    return glob, types.MappingProxyType(per_op)


def policy(op: str | None = None) -> str:
    """The policy for ``op`` (its own setting, else the global one), or the global policy."""
    glob, per_op = _parse(os.environ.get(ENV_VAR))
    return per_op.get(op, glob)


def setting_with(extra: str) -> str:
    """The current ``LIQUIDDIFF_KERNELS`` value with ``extra`` (``op=policy`` items) appended,
    which win over what it said for those ops."""
    return f"{os.environ.get(ENV_VAR, '').strip() or 'auto'},{extra}"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when Triton imports, else why it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``, else the reason they cannot."""
    missing = triton_import_error()
    if missing:
        return missing
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    if device.type == "cpu":
        return "tensors are on the CPU and the Triton interpreter is off (set TRITON_INTERPRET=1)"
    return f"Triton kernels do not run on device type {device.type!r}"


def _older_than_needed(op: str, device: torch.device) -> str | None:
    """Why ``op``'s kernels should not run on ``device`` under auto (its compute capability is
    below ``MIN_CAPABILITY[op]``), or None."""
    needed = MIN_CAPABILITY[op]
    has = torch.cuda.get_device_capability(device)
    if tuple(has) >= needed:
        return None
    return (f"PyTorch: the Triton kernels of {op} spill registers below compute capability "
            f"{needed[0]}.{needed[1]} (this GPU: {has[0]}.{has[1]}); {ENV_VAR}=auto,{op}=triton runs them anyway")


_warned: set[str] = set()


def select_backend(op: str, device: torch.device | str, grad: bool = True) -> Backend:
    """Which backend runs ``op`` for tensors on ``device``, and why; ``grad=False``: for its
    forward kernel alone, or a call that records no gradient (``FORWARD_ONLY``)."""
    device = torch.device(device)
    chosen = policy(op)
    if chosen == "torch":
        return Backend("torch", f"{ENV_VAR}=torch (for {op})", deliberate=True)
    forward_only = chosen == "auto" and not grad and op in FORWARD_ONLY
    if chosen == "auto" and op in OPT_IN and not forward_only:
        return Backend("torch", OPT_IN[op], deliberate=True)
    missing = triton_unavailable_reason(device)
    if missing is None:
        older = chosen == "auto" and device.type == "cuda" and op in MIN_CAPABILITY and _older_than_needed(op, device)
        if older:
            return Backend("torch", older, deliberate=True)
        where = "interpreter" if device.type == "cpu" else device.type
        return Backend("triton", FORWARD_ONLY[op] if forward_only else f"Triton ({where}), {ENV_VAR}={chosen}")
    if chosen == "triton":
        raise RuntimeError(f"{op}: {ENV_VAR}=triton, but {missing}")
    return Backend("torch", f"PyTorch reference: {missing}")


def warn_fallback_once(op: str, backend: Backend) -> None:
    """A fused model that falls back to PyTorch says so once per op, not on every call."""
    if backend.is_triton or backend.deliberate or op in _warned:
        return
    _warned.add(op)
    warnings.warn(f"liquiddiff: {op} runs the {backend.reason}", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=256)
def _selected(op: str, device_type: str, grad: bool, setting: str | None, interpret: str | None) -> Backend:
    """select_backend, once per op, device type, gradient and environment (the last two
    arguments are the environment variables it reads: part of the key, not used otherwise). On
    CUDA, MIN_CAPABILITY reads the device current at the first call: a process's GPUs are one kind."""
    return select_backend(op, torch.device(device_type), grad)


def use_triton(op: str, device_type: str, grad: bool = True) -> bool:
    """Whether ``op`` runs Triton for tensors on ``device_type`` (``grad=False``: its forward
    kernel alone, or a call that records no gradient): cached per environment (the fused model asks on every op call, in its
    hot path). The environment is read here, outside the constant below, so that dynamo guards
    on it: a graph compiled under one ``LIQUIDDIFF_KERNELS`` is not reused under another."""
    return _use_triton(op, device_type, grad, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))


@torch.compiler.assume_constant_result
def _use_triton(op: str, device_type: str, grad: bool, setting: str | None, interpret: str | None) -> bool:
    """Trace-time constant for ``torch.compile``: the choice never costs a graph break."""
    backend = _selected(op, device_type, grad, setting, interpret)
    warn_fallback_once(op, backend)
    return backend.is_triton

"""Host (Python) time of one fused-op call, forward and forward+backward, with the Triton
launches replaced by no-ops: the dispatch cost the GPU cannot hide when an op is small.

Compares the eager path (a plain autograd.Function over the launchers) with the custom-op
path that torch.compile traces. Runs anywhere (no GPU, no interpreter needed: nothing is
launched); numbers depend on the host CPU.

    python -m benchmarks.host_overhead
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the CPU tensors take the Triton path

import liquiddiff.kernels  # noqa: E402,F401  (loads the kernel modules)

CFC = sys.modules["liquiddiff.kernels.cfc_relax"]
ADALN = sys.modules["liquiddiff.kernels.adaln"]
KERNELS = {CFC: ("_cfc_relax_fwd_kernel", "_cfc_relax_bwd_kernel"), ADALN: ("_adaln_fwd_kernel", "_adaln_bwd_kernel")}


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches():
    saved = {(m, n): getattr(m, n) for m, names in KERNELS.items() for n in names}
    try:
        for module, name in saved:
            setattr(module, name, _NoLaunch())
        yield
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


@contextlib.contextmanager
def custom_op_path():
    """Route eager calls through the custom op, as a traced call would go."""
    saved = (CFC._EagerCfcRelax.apply, ADALN._EagerAdaLN.apply)
    CFC._EagerCfcRelax.apply, ADALN._EagerAdaLN.apply = CFC._cfc_relax_op, ADALN._adaln_forward
    try:
        yield
    finally:
        CFC._EagerCfcRelax.apply, ADALN._EagerAdaLN.apply = saved


def _us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t0) / n


def _calls(B: int = 8, C: int = 64):
    leaf = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    f, g, h, x, r = (leaf(B, C, 4, 4) for _ in range(5))
    a, b, rho, t = leaf(B, C), leaf(B, C), leaf(C), torch.rand(B, requires_grad=True)
    cfc_in, ada_in = [f, g, h, x, a, b, rho, t], [x, a, b, r]
    up = torch.randn(B, C, 4, 4)

    def cfc():
        return liquiddiff.kernels.cfc_relax(f, g, h, x, a, b, rho, t)

    def adaln():
        return liquiddiff.kernels.adaln_modulate(x, a, b, residual=r)[0]

    return {
        "cfc_relax": (cfc, lambda: torch.autograd.grad(cfc(), cfc_in, up)),
        "adaln_modulate (+residual)": (adaln, lambda: torch.autograd.grad(adaln(), ada_in, up)),
    }


def report() -> str:
    lines = [
        f"Host time per call, Triton launches stubbed (us; torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; `python -m benchmarks.host_overhead`)",
        "",
        "| op | path | fwd | fwd+bwd |",
        "|---|---|---|---|",
    ]
    with stubbed_launches():
        for name, (fwd, fwdbwd) in _calls().items():
            for path, ctx in (("eager autograd.Function", contextlib.nullcontext), ("custom op", custom_op_path)):
                with ctx():
                    lines.append(f"| {name} | {path} | {_us(fwd):.0f} | {_us(fwdbwd):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

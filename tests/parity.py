"""Helpers shared by the parity tests: error metric, poisoned outputs, shared upstream grads."""
from __future__ import annotations

import contextlib

import torch

from liquiddiff.kernels import _tensors


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere makes it NaN (and every check fail)."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_outputs():
    """Every buffer a launcher allocates starts as NaN while this is active, between guard
    regions that must come out untouched: a kernel that stores past a buffer's ends fails here."""
    _tensors.poison_outputs = True
    try:
        yield
    finally:
        _tensors.poison_outputs = False
        guarded = _tensors.guarded.copy()
        _tensors.guarded.clear()
    for whole, start, end in guarded:
        for side, region in (("before", whole[:start]), ("after", whole[end:])):
            written = int((region != _tensors.GUARD).sum())
            assert written == 0, (f"a kernel stored {written} elements {side} a buffer of {end - start} "
                                  f"{whole.dtype} elements")


def _copy_with_strides(v: torch.Tensor) -> torch.Tensor:
    """A copy of ``v`` with ``v``'s strides, also for a view with gaps (a channel slice, a chunk
    of a projection), which ``clone()`` would make dense: the op must see the layout the test
    built."""
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v.detach())


def leaves(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Fresh leaf copies that require grad, so the fused and reference runs share inputs; each
    keeps its input's strides."""
    return {k: _copy_with_strides(v).requires_grad_(True) for k, v in tensors.items() if v is not None}


def grads_of(out, inputs: dict[str, torch.Tensor], upstream):
    """Gradients of every input, for one shared upstream gradient (per output)."""
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    names = list(inputs)
    grads = torch.autograd.grad(outs, [inputs[n] for n in names], ups, allow_unused=True)
    return dict(zip(names, grads))


def assert_close(name: str, out, ref, tol: float) -> None:
    assert out is not None and ref is not None, f"{name}: missing gradient"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def check_op(fn, ref_fn, raw: dict[str, torch.Tensor | None], tol: float):
    """``fn(**raw)`` against ``ref_fn(**raw)`` on fresh leaves: the value and the gradient of
    every input for one shared random upstream gradient, outputs NaN-poisoned. Returns the
    output (for layout or dtype checks)."""
    ins, ref_ins = leaves(raw), leaves(raw)
    with poisoned_outputs():
        out, ref = fn(**ins), ref_fn(**ref_ins)
        up = torch.randn_like(ref)
        got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    assert_close("out", out, ref, tol)
    for name in ins:
        assert_close(name, got[name], want[name], tol)
    return out


def under_autocast(fn, device: str):
    """``fn`` with its inputs by name, under bf16 autocast on ``device`` (as the fused block
    calls the ops)."""
    def run(**ins):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(**ins)
    return run


def compiled_backward_copies(fn, *args, **kwargs) -> list[str]:
    """``torch.compile(fn)`` run forward and backward (a random upstream gradient), its graphs
    recorded by an aot_autograd backend: the names of the backward graph's clone and contiguous
    nodes. Dynamo inserts them when it meets a layout query on a tensor made inside an
    autograd.Function's backward: it retraces that backward on .contiguous() copies of the
    incoming gradients (NCHW copies of channels_last ones)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record))(*args, **kwargs)
    out.backward(torch.randn_like(out))
    assert len(graphs) == 2, f"expected one forward and one backward graph, got {len(graphs)}"
    copy_ops = (torch.ops.aten.clone.default, torch.ops.aten.contiguous.default)
    return [n.name for n in graphs[1].graph.nodes if n.target in copy_ops]

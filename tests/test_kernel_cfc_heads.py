"""The CfC heads + gate forward kernel (liquiddiff/kernels/cfc_heads.py) against
functional.cfc_heads_relax: value in fp32 and fp64, both layouts, awkward channel counts (below
tl.dot's 16, over one channel block), with and without biases and residual, outputs NaN-poisoned;
the dtypes of bf16 autocast; NaN propagation; opcheck; that ParallelCfC's forward runs it with the
opt-in pointwise kernels; bf16 on the GPU. Its gradients are ParallelCfC's, tested in
test_parallel_cfc.py with the same setting."""
import importlib

import pytest
import torch

import parity
from liquiddiff import functional, kernels
from liquiddiff.kernels import cfc_heads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, C, H, W, dtype=torch.float32, fmt=torch.contiguous_format, biases=(True, True, True),
            residual=True, stream_dtype=None):
    """Arguments of cfc_heads_relax by name; ``stream_dtype``: x's and the residual's (the
    model's fp32 residual stream under bf16 autocast), else ``dtype``."""
    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt, device=DEVICE)

    def activation(dt=dtype):
        return randn(B, C, H, W, dt=dt).contiguous(memory_format=fmt)

    stream = stream_dtype or dtype
    # Weights scaled so that f, g and h stay O(1): relative errors mean something.
    heads = [((randn(C, C, 1, 1) / C ** 0.5).contiguous(memory_format=fmt), randn(C) if bias else None)
             for bias in biases]
    return {"backbone": activation(), "g_hidden": activation(), "h_hidden": activation(), "heads": heads,
            "n": activation(stream), "a": randn(B, C), "b": randn(B, C), "rho": randn(C, dt=stream),
            "t": torch.rand(B, dtype=stream, device=DEVICE), "residual": activation(stream) if residual else None}


def _fused(raw, dtype=None):
    args = dict(raw)
    return cfc_heads.forward(args.pop("backbone"), args.pop("g_hidden"), args.pop("h_hidden"), args.pop("heads"),
                             args.pop("n"), **args, dtype=dtype or raw["backbone"].dtype)


def _check(raw, tol, dtype=None):
    with parity.poisoned_outputs():
        out = _fused(raw, dtype)
    ref = functional.cfc_heads_relax(**raw)
    parity.assert_close("out", out, ref, tol)
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, biases, residual", [
    ((2, 5, 3, 7), (True, True, True), True),      # C under tl.dot's 16
    ((1, 72, 5, 4), (False, False, False), False),  # C over one channel block by 8, no biases
    ((3, 40, 9, 9), (False, True, True), True),    # pixels over one tile, f without bias
])
def test_parity(dtype, tol, fmt, shape, biases, residual):
    out = _check(_inputs(*shape, dtype=dtype, fmt=fmt, biases=biases, residual=residual), tol)
    assert out.is_contiguous(memory_format=fmt)


def test_dtypes_of_bf16_autocast():
    """bf16 heads and gate inputs, the fp32 residual stream and rho, t: the reference's fp32
    output, to bf16 rounding of the heads."""
    raw = _inputs(2, 24, 5, 6, dtype=torch.bfloat16, fmt=torch.channels_last, stream_dtype=torch.float32)
    assert _check(raw, 2e-2).dtype == torch.float32


def test_nan_propagates():
    """A NaN in a head's input reaches every channel of its pixel (the heads mix channels); one
    in n, only its element."""
    raw = _inputs(2, 20, 4, 4)
    raw["g_hidden"][1, 3, 2, 1] = float("nan")
    raw["n"][0, 5, 1, 2] = float("nan")
    out = _fused(raw)
    assert torch.isnan(out[1, :, 2, 1]).all() and torch.isnan(out[0, 5, 1, 2])
    out[1, :, 2, 1] = 0
    out[0, 5, 1, 2] = 0
    assert torch.isfinite(out).all()


def test_opcheck():
    for residual, biases in ((True, (True, False, True)), (False, (False, False, False))):
        raw = _inputs(2, 21, 5, 3, fmt=torch.channels_last, biases=biases, residual=residual)
        heads = [t for pair in raw["heads"] for t in pair]
        torch.library.opcheck(torch.ops.liquiddiff.cfc_heads_relax.default,
                              (raw["backbone"], raw["g_hidden"], raw["h_hidden"], *heads, raw["n"], raw["a"], raw["b"],
                               raw["rho"], raw["t"], raw["residual"], torch.float32))


def test_parallel_cfc_runs_it_with_the_pointwise_kernels(monkeypatch):
    """With ``pointwise_conv=triton`` ParallelCfC's forward makes f, g, h and the gate in this
    kernel, not in three convolutions and the CfC kernel; by default it does not."""
    calls = []

    def counted(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(cfc_heads, "forward", counted("heads", cfc_heads.forward))
    # By module: the package attribute ``parallel_cfc`` is the op.
    branch = importlib.import_module("liquiddiff.kernels.parallel_cfc")
    monkeypatch.setattr(branch, "cfc_relax_forward", counted("cfc", branch.cfc_relax_forward))
    C = 12
    n = torch.randn(2, C, 5, 5)
    convs = [(torch.randn(C, 1, k, k) / k, torch.randn(C)) if k else (torch.randn(C, C, 1, 1) / C, torch.randn(C))
             for k in (7, None, None, 3, None, 3, None)]
    args = (n, convs, torch.randn(2, C), torch.randn(2, C), torch.randn(C), torch.rand(2))
    with parity.poisoned_outputs():
        kernels.parallel_cfc(*args)
        assert calls == ["cfc"]
        calls.clear()
        monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,pointwise_conv=triton")
        out = kernels.parallel_cfc(*args)
    assert calls == ["heads"]
    parity.assert_close("out", out, functional.parallel_cfc(*args), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_gpu_bf16_at_the_first_level(fmt):
    """The first level's CfC (C = 64, 256 px, batch 8) as the model runs it under bf16 autocast."""
    raw = _inputs(8, 64, 256, 256, dtype=torch.bfloat16, fmt=fmt, stream_dtype=torch.float32)
    _check(raw, 2e-2)

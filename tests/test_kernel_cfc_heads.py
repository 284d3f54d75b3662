"""The CfC heads + gate kernels (liquiddiff/kernels/cfc_heads.py). Forward against
functional.cfc_heads_relax; backward (the gradients of f, g, h, x, a, b, rho, t) against
functional.cfc_relax's, for heads the reference makes and one shared random upstream gradient:
fp32 and fp64, both layouts, awkward channel counts (below tl.dot's 16, over one channel block),
with and without biases and residual, outputs NaN-poisoned; some gradients only; the dtypes of
bf16 autocast; NaN propagation; opcheck; that ParallelCfC runs them with the opt-in pointwise
kernels; bf16 on the GPU. Through ParallelCfC (every input's gradient, gradcheck, torch.compile):
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


GRAD_NAMES = ("f", "g", "h", "x", "a", "b", "rho", "t")


def _reference_grads(raw, upstream):
    """functional.cfc_relax's gradients for f, g and h as the reference heads make them."""
    heads = raw["heads"]
    made = {"f": functional.conv1x1(raw["backbone"], *heads[0]), "g": functional.silu_conv1x1(raw["g_hidden"], *heads[1]),
            "h": functional.silu_conv1x1(raw["h_hidden"], *heads[2])}
    leaves = parity.leaves({**made, "x": raw["n"], **{k: raw[k] for k in ("a", "b", "rho", "t")}})
    return parity.grads_of(functional.cfc_relax(**leaves), leaves, upstream)


def _backward(raw, upstream, needs, dtype=None):
    with parity.poisoned_outputs():
        grads = cfc_heads.backward(upstream, raw["backbone"], raw["g_hidden"], raw["h_hidden"], raw["heads"], raw["n"],
                                   raw["a"], raw["b"], raw["rho"], raw["t"], dtype or raw["backbone"].dtype, needs)
    return dict(zip(GRAD_NAMES, grads))


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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, biases", [
    ((2, 5, 3, 7), (True, True, True)),
    ((1, 72, 5, 4), (False, False, False)),
    ((3, 40, 9, 9), (False, True, True)),  # pixels over several tiles of one program
])
def test_backward_parity(dtype, tol, fmt, shape, biases):
    raw = _inputs(*shape, dtype=dtype, fmt=fmt, biases=biases, residual=False)
    up = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    got, want = _backward(raw, up, [True] * 8), _reference_grads(raw, up)
    for name in GRAD_NAMES:
        parity.assert_close(name, got[name], want[name], tol)
    assert got["f"].is_contiguous(memory_format=fmt) and got["x"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_backward_programs_walk_several_tiles(monkeypatch, fmt):
    """The backward's loop over pixel tiles (TILES > 1, off at the measured _BWD_MAX_TILES = 1):
    several tiles per program, the last one partial, one partial sum per program."""
    monkeypatch.setattr(cfc_heads, "_BWD_MAX_TILES", 4)
    monkeypatch.setattr(cfc_heads, "_BWD_MIN_PROGRAMS", 1)
    raw = _inputs(2, 20, 9, 11, fmt=fmt, residual=False)  # 99 pixels: 7 tiles of 16, 2 programs
    up = torch.randn(2, 20, 9, 11).contiguous(memory_format=fmt)
    got, want = _backward(raw, up, [True] * 8), _reference_grads(raw, up)
    for name in GRAD_NAMES:
        parity.assert_close(name, got[name], want[name], 1e-5)


@pytest.mark.parametrize("wanted", [("g", "h"), ("f", "x", "a"), ("rho", "t"), ("x",)])
def test_backward_of_some_gradients_only(wanted):
    """Skipped gradients come back as None; the rest match."""
    raw = _inputs(2, 20, 5, 6, fmt=torch.channels_last)
    up = torch.randn(2, 20, 5, 6).contiguous(memory_format=torch.channels_last)
    got = _backward(raw, up, [name in wanted for name in GRAD_NAMES])
    want = _reference_grads(raw, up)
    for name in GRAD_NAMES:
        if name in wanted:
            parity.assert_close(name, got[name], want[name], 1e-5)
        else:
            assert got[name] is None, name


def test_dtypes_of_bf16_autocast():
    """bf16 heads and gate inputs, the fp32 residual stream and rho, t: the reference's fp32
    output, and each gradient in its input's dtype, to bf16 rounding of the heads."""
    raw = _inputs(2, 24, 5, 6, dtype=torch.bfloat16, fmt=torch.channels_last, stream_dtype=torch.float32)
    assert _check(raw, 2e-2).dtype == torch.float32
    up = torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last)
    got, want = _backward(raw, up, [True] * 8), _reference_grads(raw, up)
    for name in GRAD_NAMES:
        parity.assert_close(name, got[name], want[name], 5e-2)


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


def test_a_nan_rho_reaches_its_channel():
    raw = _inputs(2, 20, 4, 4)
    raw["rho"][7] = float("nan")
    out = _fused(raw)
    assert torch.isnan(out[:, 7]).all()
    out[:, 7] = 0
    assert torch.isfinite(out).all()


def test_opcheck():
    for residual, biases in ((True, (True, False, True)), (False, (False, False, False))):
        raw = _inputs(2, 21, 5, 3, fmt=torch.channels_last, biases=biases, residual=residual)
        heads_inputs = (raw["backbone"], raw["g_hidden"], raw["h_hidden"], *(t for pair in raw["heads"] for t in pair),
                        raw["n"], raw["a"], raw["b"], raw["rho"], raw["t"])
        torch.library.opcheck(torch.ops.liquiddiff.cfc_heads_relax.default,
                              (*heads_inputs, raw["residual"], torch.float32))
        up = torch.randn(2, 21, 5, 3).contiguous(memory_format=torch.channels_last)
        for needs in ([True] * 8, [False, True, True, False, False, False, True, False]):
            torch.library.opcheck(torch.ops.liquiddiff.cfc_heads_relax_backward.default,
                                  (up, *heads_inputs, torch.float32, needs))


def test_parallel_cfc_runs_them_with_the_pointwise_kernels(monkeypatch):
    """With ``pointwise_conv=triton`` ParallelCfC makes f, g, h and the gate in these kernels,
    forward and backward, not in three convolutions and the CfC kernels; by default it does not."""
    calls = []

    def counted(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return call

    for name in ("forward", "backward"):
        monkeypatch.setattr(cfc_heads, name, counted(f"heads {name}", getattr(cfc_heads, name)))
    # By module: the package attribute ``parallel_cfc`` is the op.
    branch = importlib.import_module("liquiddiff.kernels.parallel_cfc")
    for name in ("forward", "backward"):
        attr = f"cfc_relax_{name}"
        monkeypatch.setattr(branch, attr, counted(f"cfc {name}", getattr(branch, attr)))
    C = 12
    n = torch.randn(2, C, 5, 5)
    convs = [(torch.randn(C, 1, k, k) / k, torch.randn(C)) if k else (torch.randn(C, C, 1, 1) / C, torch.randn(C))
             for k in (7, None, None, 3, None, 3, None)]
    args = (n.requires_grad_(), convs, torch.randn(2, C), torch.randn(2, C), torch.randn(C), torch.rand(2))
    with parity.poisoned_outputs():
        kernels.parallel_cfc(*args).sum().backward()
        assert calls == ["cfc forward", "cfc backward"]
        calls.clear()
        monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,pointwise_conv=triton")
        kernels.parallel_cfc(*args).sum().backward()
    assert calls == ["heads forward", "heads backward"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_gpu_bf16_at_the_first_level(fmt):
    """The first level's CfC (C = 64, 256 px, batch 8) as the model runs it under bf16 autocast:
    value and every gradient."""
    raw = _inputs(8, 64, 256, 256, dtype=torch.bfloat16, fmt=fmt, stream_dtype=torch.float32)
    _check(raw, 2e-2)
    up = torch.randn(8, 64, 256, 256, device=DEVICE).contiguous(memory_format=fmt)
    got, want = _backward(raw, up, [True] * 8), _reference_grads(raw, up)
    for name in GRAD_NAMES:
        parity.assert_close(name, got[name], want[name], 2e-2)

"""The Triton SiLU -> 1x1 conv kernels (liquiddiff/kernels/pointwise_conv.py), opt-in
(``pointwise_conv=triton``), through ``kernels.silu_conv1x1`` against
functional.silu_conv1x1: value and every gradient (one shared upstream, outputs NaN-poisoned)
in fp32 and fp64, both layouts, awkward channel counts, with and without bias, modulation and
residual; under autocast as the block calls it; NaN propagation, the runtime switch, gradcheck,
opcheck; bf16 on the GPU."""
import pytest
import torch

import parity
from liquiddiff import functional, kernels
from liquiddiff.kernels import pointwise_conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTING = "auto,pointwise_conv=triton"


@pytest.fixture
def counted(monkeypatch):
    """Records which of the kernels' forward and backward ran (proof that they, not cuDNN, did)."""
    calls = []
    for name in ("forward", "backward"):
        def counted(*args, _fn=getattr(pointwise_conv, name), _name=name):
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setattr(pointwise_conv, name, counted)
    return calls


@pytest.fixture
def launches(monkeypatch, counted):
    """Turns the kernels on; ``counted``."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    return counted


def _inputs(B, K, N, H, W, dtype=torch.float32, fmt=torch.contiguous_format, bias=True, modulated=False):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    # As the block makes them: the weight in the model's memory format, scale and shift the two
    # chunks of one time projection (strided).
    scale, shift = randn(B, 2 * K).chunk(2, dim=1) if modulated else (None, None)
    return {"z": randn(B, K, H, W).contiguous(memory_format=fmt),
            "weight": randn(N, K, 1, 1).contiguous(memory_format=fmt),
            "bias": randn(N) if bias else None, "scale": scale, "shift": shift}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, bias, modulated", [
    ((2, 40, 24, 5, 7), True, False),   # K over one k-tile, N under one n-tile
    ((1, 3, 65, 4, 4), False, True),    # K under tl.dot's 16, N over one tile by one
    ((3, 130, 17, 9, 9), True, True),   # odd everything, pixels over one tile (_BLOCK_P = 64)
])
def test_parity(launches, dtype, tol, fmt, shape, bias, modulated):
    out = parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1,
                          _inputs(*shape, dtype=dtype, fmt=fmt, bias=bias, modulated=modulated), tol)
    assert launches == ["forward", "backward"], "the Triton kernels did not run"
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_parity_with_a_residual(launches, dtype, tol, fmt):
    """The block's residual added in the forward kernel's epilogue (the FeedForward's last conv):
    its gradient is the upstream one, which the backward kernels read as it is."""
    raw = _inputs(2, 40, 24, 5, 7, dtype=dtype, fmt=fmt)
    raw["residual"] = torch.randn(2, 24, 5, 7, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    out = parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1, raw, tol)
    assert launches == ["forward", "backward"]
    assert out.is_contiguous(memory_format=fmt)


def test_residual_under_autocast_as_the_block_adds_it(launches):
    """bf16 conv, fp32 residual stream: an fp32 output, the residual's gradient in fp32, the
    rest to bf16 rounding, as the reference's add promotes and casts."""
    raw = {k: v.bfloat16() for k, v in _inputs(2, 48, 24, 6, 6, fmt=torch.channels_last).items() if v is not None}
    raw["residual"] = torch.randn(2, 24, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out = parity.check_op(parity.under_autocast(kernels.silu_conv1x1, DEVICE),
                          parity.under_autocast(functional.silu_conv1x1, DEVICE), raw, 3e-2)
    assert out.dtype == torch.float32 and launches == ["forward", "backward"]


def test_a_residual_of_the_wrong_shape_is_named():
    raw = _inputs(2, 8, 4, 3, 3)
    with pytest.raises(ValueError, match="residual: expected the conv's output shape"):
        kernels.silu_conv1x1(**raw, residual=torch.randn(2, 8, 3, 3))


@pytest.mark.parametrize("wanted", [("z",), ("weight",), ("bias",), ("scale", "shift"), ("z", "shift")])
def test_gradients_of_some_inputs_only(launches, wanted):
    """A frozen parameter or a constant input: the backward skips its work and the rest match."""
    raw = _inputs(2, 20, 12, 5, 6, fmt=torch.channels_last, modulated=True)
    ins, ref_ins = ({k: v.detach().clone().requires_grad_(k in wanted) for k, v in raw.items()} for _ in range(2))
    out, ref = kernels.silu_conv1x1(**ins), functional.silu_conv1x1(**ref_ins)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, [ins[k] for k in wanted], up)
    want = torch.autograd.grad(ref, [ref_ins[k] for k in wanted], up)
    for name, g, w in zip(wanted, got, want):
        parity.assert_close(name, g, w, 1e-5)
    assert launches == ["forward", "backward"]


def test_under_autocast_as_the_block_calls_it(launches):
    """bf16 autocast, a bf16 input and weights (the block's casts): the reference's dtype, and
    its values and gradients to bf16 rounding."""
    raw = {k: v.bfloat16() for k, v in _inputs(2, 48, 24, 6, 6, fmt=torch.channels_last).items() if v is not None}
    out = parity.check_op(parity.under_autocast(kernels.silu_conv1x1, DEVICE),
                          parity.under_autocast(functional.silu_conv1x1, DEVICE), raw, 3e-2)
    assert launches and out.dtype == torch.bfloat16


def test_nan_propagates_to_its_pixel_only(launches):
    raw = _inputs(2, 20, 9, 4, 4)
    raw["z"][1, 3, 2, 1] = float("nan")
    out = kernels.silu_conv1x1(**raw)
    assert torch.isnan(out[1, :, 2, 1]).all()
    out[1, :, 2, 1] = 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("min_programs, walk", [(6, "4 tiles a program"), (1, "one program")])
def test_weight_gradient_walks_pixel_tiles_across_batch_items(launches, monkeypatch, fmt, min_programs, walk):
    """The weight gradient's programs walk consecutive pixel tiles of the whole batch (its
    partials do not grow with the batch): here 6 tiles (3 items of 2), in programs of 4 tiles
    (the first walks into the second item, the second past the batch's end: a tile it masks
    whole, whose item's scale must still exist) or in one program of 8."""
    monkeypatch.setattr(pointwise_conv, "_WGRAD_MIN_PROGRAMS", min_programs)
    parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1, _inputs(3, 130, 17, 9, 9, fmt=fmt, modulated=True),
                    1e-5)
    assert launches == ["forward", "backward"], "the Triton kernels did not run"


def test_opt_in_for_calls_with_gradient(monkeypatch):
    monkeypatch.delenv("LIQUIDDIFF_KERNELS", raising=False)
    assert not kernels.select_backend("pointwise_conv", "cuda").is_triton
    assert "opt-in" in kernels.select_backend("pointwise_conv", "cuda").reason
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    assert kernels.select_backend("pointwise_conv", DEVICE).is_triton


@pytest.mark.parametrize("residual", [False, True])
def test_auto_runs_the_forward_kernel_where_no_gradient_is_recorded(counted, monkeypatch, residual):
    """runtime.FORWARD_ONLY: under auto, a call autograd does not record (no_grad, or no input
    that requires grad: sampling) runs the Triton forward, the FeedForward's residual added in
    it; a call it records runs SiLU + cuDNN (the backward's choice). The same values."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto")
    ins = _inputs(2, 40, 24, 5, 7, fmt=torch.channels_last, modulated=not residual)
    if residual:
        ins["residual"] = torch.randn(2, 24, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    expected = functional.silu_conv1x1(**ins)
    with torch.no_grad():
        torch.testing.assert_close(kernels.silu_conv1x1(**ins), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.silu_conv1x1(**ins), expected, rtol=1e-5, atol=1e-5)
    assert counted == ["forward", "forward"], "a call without gradient did not run the Triton forward"
    out = kernels.silu_conv1x1(**parity.leaves(ins))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert counted == ["forward", "forward"], "a call with gradient ran the opt-in kernels"


def test_gradcheck_fp64(launches):
    ins = parity.leaves(_inputs(2, 6, 5, 3, 3, dtype=torch.float64, modulated=True))
    names = list(ins)
    assert torch.autograd.gradcheck(lambda *t: kernels.silu_conv1x1(**dict(zip(names, t))), tuple(ins.values()))
    assert launches


def test_opcheck():
    raw = _inputs(2, 37, 21, 5, 3, fmt=torch.channels_last, modulated=True)
    torch.library.opcheck(torch.ops.liquiddiff.silu_conv1x1_forward.default,
                          (raw["z"], raw["weight"], raw["bias"], raw["scale"], raw["shift"], torch.float32))
    torch.library.opcheck(torch.ops.liquiddiff.silu_conv1x1_forward.default,
                          (raw["z"], raw["weight"], None, None, None, torch.float32))
    residual = torch.randn(2, 21, 5, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.liquiddiff.silu_conv1x1_forward.default,
                          (raw["z"], raw["weight"], raw["bias"], None, None, torch.float32, residual))
    up = torch.randn(2, 21, 5, 3).contiguous(memory_format=torch.channels_last)
    for needs in ([True] * 5, [False, True, False, True, False], [True, False, True, False, False]):
        torch.library.opcheck(torch.ops.liquiddiff.silu_conv1x1_backward.default,
                              (up, raw["z"], raw["weight"], raw["scale"], raw["shift"], torch.float32, needs))
    torch.library.opcheck(torch.ops.liquiddiff.silu_conv1x1_backward.default,
                          (up, raw["z"], raw["weight"], None, None, torch.float32, [True, True, True, False, False]))


@pytest.mark.slow
def test_torch_compile_fullgraph(monkeypatch):
    """Traced, the forward is the custom op (its fake kernel, one opaque node); the launches are
    counted inside it, where a side effect does not disturb tracing."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    kernel, grids = pointwise_conv._silu_conv1x1_kernel, []

    class Counted:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(pointwise_conv, "_silu_conv1x1_kernel", Counted())
    compiled = torch.compile(kernels.silu_conv1x1, fullgraph=True)
    parity.check_op(compiled, functional.silu_conv1x1, _inputs(2, 24, 16, 5, 5, modulated=True), 1e-5)
    assert grids


@pytest.mark.gpu
@pytest.mark.parametrize("K, N, modulated", [(128, 64, False), (64, 64, True)])
def test_gpu_bf16_at_the_first_level(launches, K, N, modulated):
    """The FeedForward's last conv (128 -> 64) and the spatial mix's (64 -> 64, modulated) at
    256 px, batch 8, channels_last, bf16: value and every gradient."""
    raw = {k: (v.bfloat16() if v is not None else None)
           for k, v in _inputs(8, K, N, 256, 256, fmt=torch.channels_last, modulated=modulated).items()}
    parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1, raw, 2e-2)
    assert launches == ["forward", "backward"]

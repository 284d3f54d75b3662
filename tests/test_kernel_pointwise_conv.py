"""The Triton SiLU -> 1x1 conv kernels (liquiddiff/kernels/pointwise_conv.py), opt-in
(``pointwise_conv=triton``), through ``kernels.silu_conv1x1`` against
functional.silu_conv1x1: value and every gradient (one shared upstream, outputs NaN-poisoned)
in fp32 and fp64, both layouts, awkward channel counts, with and without bias, modulation and
residual; under autocast as the block calls it; NaN propagation, the runtime switch, gradcheck,
opcheck; bf16 on the GPU. Then the forward with a depthwise conv in its prologue
(``pointwise_conv.depthwise_forward``, the CfC's g and h heads without gradient) against
functional.depthwise_silu_conv1x1, and with SiLU in its epilogue instead
(``pointwise_conv.conv1x1_silu_forward``, the CfC backbone's 1x1) against functional.conv1x1_silu;
without SiLU (``conv1x1_forward``) and with both outputs (``conv1x1_and_silu_forward``);
and the FeedForward's two convs in one forward (``pointwise_conv.feedforward_forward``, through
``kernels.feedforward``) against functional.feedforward."""
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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("residual", [False, True])
def test_auto_runs_the_forward_kernel_and_the_default_backward(counted, monkeypatch, dtype, tol, residual):
    """runtime.FORWARD_ONLY: under auto every call runs the Triton forward (the FeedForward's
    residual added in it), with or without gradient; a call autograd records runs the default
    backward (cuDNN and SiLU's, remade from z), not the opt-in Triton one. Values and every
    gradient (the residual's the upstream one) match the reference."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto")
    ins = _inputs(2, 40, 24, 5, 7, dtype=dtype, fmt=torch.channels_last, modulated=not residual)
    if residual:
        ins["residual"] = torch.randn(2, 24, 5, 7, dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last)
    with torch.no_grad():
        parity.assert_close("out", kernels.silu_conv1x1(**ins), functional.silu_conv1x1(**ins), tol)
    assert counted == ["forward"], "a call without gradient did not run the Triton forward"
    parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1, ins, tol)
    assert counted == ["forward", "forward"], "a call with gradient did not run the Triton forward, or ran its backward"


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


# ------------------------------------------------ the depthwise conv in the forward's prologue
def _depthwise_inputs(B, K, N, H, W, k=3, dtype=torch.float32, fmt=torch.contiguous_format, dw_bias=True, bias=True):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    return {"x": randn(B, K, H, W).contiguous(memory_format=fmt), "dw_weight": randn(K, 1, k, k) / k,
            "dw_bias": randn(K) if dw_bias else None, "weight": randn(N, K, 1, 1) / K ** 0.5,
            "bias": randn(N) if bias else None}


def _depthwise_forward(raw, dtype=None):
    return pointwise_conv.depthwise_forward(**raw, dtype=dtype or raw["x"].dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, k, dw_bias, bias", [
    ((2, 40, 24, 5, 7), 3, True, True),    # K over one k-tile, rows and columns under the 3x3's reach twice
    ((1, 3, 65, 4, 4), 5, False, True),    # K under tl.dot's 16, N over one tile by one, the 5x5 past the image
    ((3, 33, 17, 9, 11), 3, True, False),  # odd everything, pixels over one tile (_BLOCK_P = 64): taps across tiles
    ((2, 16, 16, 1, 13), 7, True, True),   # one row: every vertical tap but the middle one masked
])
def test_depthwise_prologue_parity(dtype, tol, fmt, shape, k, dw_bias, bias):
    raw = _depthwise_inputs(*shape, k=k, dtype=dtype, fmt=fmt, dw_bias=dw_bias, bias=bias)
    with parity.poisoned_outputs():
        out = _depthwise_forward(raw)
    parity.assert_close("out", out, functional.depthwise_silu_conv1x1(**raw), tol)
    assert out.is_contiguous(memory_format=fmt)


def test_depthwise_prologue_in_bf16():
    """bf16 in and out (under the interpreter computed in fp32, its bf16 conversions its own):
    a bf16 output, the fused heads' roundings (the 3x3's output rounded before its bias goes in
    with the SiLU) to bf16 rounding."""
    raw = {k: v.bfloat16() for k, v in _depthwise_inputs(2, 24, 16, 6, 5, fmt=torch.channels_last).items()}
    out = _depthwise_forward(raw, torch.bfloat16)
    f32 = {k: v.float() for k, v in raw.items()}
    hidden = functional.depthwise_conv(f32["x"], f32["dw_weight"]).bfloat16().float() + f32["dw_bias"][:, None, None]
    want = functional.conv1x1(torch.nn.functional.silu(hidden).bfloat16().float(), f32["weight"], f32["bias"])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_depthwise_prologue_nan_reaches_its_window_only(fmt):
    raw = _depthwise_inputs(2, 20, 9, 6, 7, fmt=fmt)
    raw["x"][1, 3, 2, 4] = float("nan")
    out = _depthwise_forward(raw)
    window = (1, slice(None), slice(1, 4), slice(3, 6))
    assert torch.isnan(out[window]).all()
    out[window] = 0
    assert torch.isfinite(out).all()


def test_depthwise_prologue_opcheck():
    raw = _depthwise_inputs(2, 37, 21, 5, 3, fmt=torch.channels_last)
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_silu_conv1x1_forward.default,
                          (*raw.values(), torch.float32))
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_silu_conv1x1_forward.default,
                          (raw["x"], raw["dw_weight"], None, raw["weight"], None, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [64, 256])
def test_gpu_depthwise_prologue_bf16_at_the_cfc_levels(K):
    """The CfC's g head at its first (64 channels, 256 px) and third level (256, 64 px), batch 8,
    channels_last, bf16."""
    size = 256 * 64 // K
    raw = {k: v.bfloat16() for k, v in _depthwise_inputs(8, K, K, size, size, fmt=torch.channels_last).items()}
    out = _depthwise_forward(raw)
    assert parity.rel_err(out, functional.depthwise_silu_conv1x1(**{k: v.double() for k, v in raw.items()})) < 2e-2


# ------------------------------------------------------------ SiLU in the forward's epilogue
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, bias", [((2, 40, 24, 5, 7), True), ((1, 3, 65, 4, 4), False),
                                         ((3, 130, 17, 9, 9), True)])
def test_silu_epilogue_parity(dtype, tol, fmt, shape, bias):
    raw = _inputs(*shape, dtype=dtype, fmt=fmt, bias=bias)
    del raw["scale"], raw["shift"]
    with parity.poisoned_outputs():
        out = pointwise_conv.conv1x1_silu_forward(**raw, dtype=dtype)
    parity.assert_close("out", out, functional.conv1x1_silu(raw["z"], raw["weight"], raw["bias"]), tol)
    assert out.is_contiguous(memory_format=fmt)


def test_silu_epilogue_in_bf16():
    """bf16 in and out (under the interpreter computed in fp32, its bf16 conversions its own):
    a bf16 output, SiLU of the conv's bf16 output (cuDNN's and aten's roundings) to bf16
    rounding."""
    raw = {k: v.bfloat16() for k, v in _inputs(2, 24, 16, 6, 5, fmt=torch.channels_last).items() if v is not None}
    out = pointwise_conv.conv1x1_silu_forward(raw["z"], raw["weight"], raw["bias"], torch.bfloat16)
    conv = functional.conv1x1(*(raw[k].float() for k in ("z", "weight", "bias"))).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.silu(conv.float()).bfloat16(), rtol=1e-2, atol=1e-2)


def test_silu_epilogue_nan_reaches_its_pixel_only():
    raw = _inputs(2, 20, 9, 4, 4, fmt=torch.channels_last)
    raw["z"][1, 3, 2, 1] = float("nan")
    out = pointwise_conv.conv1x1_silu_forward(raw["z"], raw["weight"], raw["bias"], torch.float32)
    assert torch.isnan(out[1, :, 2, 1]).all()
    out[1, :, 2, 1] = 0
    assert torch.isfinite(out).all()


def test_silu_epilogue_opcheck():
    raw = _inputs(2, 37, 21, 5, 3, fmt=torch.channels_last)
    for bias in (raw["bias"], None):
        torch.library.opcheck(torch.ops.liquiddiff.conv1x1_forward.default,
                              (raw["z"], raw["weight"], bias, torch.float32, True))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [64, 256])
def test_gpu_silu_epilogue_bf16_at_the_cfc_levels(K):
    """The CfC backbone's 1x1 at its first (64 channels, 256 px) and third level (256, 64 px),
    batch 8, channels_last, bf16."""
    size = 256 * 64 // K
    raw = {k: v.bfloat16() for k, v in _inputs(8, K, K, size, size, fmt=torch.channels_last).items() if v is not None}
    out = pointwise_conv.conv1x1_silu_forward(raw["z"], raw["weight"], raw["bias"], torch.bfloat16)
    assert parity.rel_err(out, functional.conv1x1_silu(*(raw[k].double() for k in ("z", "weight", "bias")))) < 2e-2


# ------------------------------------------ the plain conv, and the conv with its SiLU both out
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, bias", [((2, 40, 24, 5, 7), True), ((1, 3, 65, 4, 4), False),
                                         ((3, 130, 17, 9, 9), True)])
def test_conv_and_silu_outputs_parity(dtype, tol, fmt, shape, bias):
    """conv1x1_forward (no SiLU) against functional.conv1x1; conv1x1_and_silu_forward's conv
    output bit for bit conv1x1_forward's (the FeedForward's forward and its backward's remake
    must agree exactly: the same tiles) and its SiLU that of the conv (functional.conv1x1_silu),
    all NaN-poisoned, in z's memory format."""
    raw = _inputs(*shape, dtype=dtype, fmt=fmt, bias=bias)
    args = (raw["z"], raw["weight"], raw["bias"], dtype)
    with parity.poisoned_outputs():
        plain = pointwise_conv.conv1x1_forward(*args)
        pre, activated = pointwise_conv.conv1x1_and_silu_forward(*args)
    parity.assert_close("out", plain, functional.conv1x1(raw["z"], raw["weight"], raw["bias"]), tol)
    parity.assert_close("silu", activated, functional.conv1x1_silu(raw["z"], raw["weight"], raw["bias"]), tol)
    assert torch.equal(pre, plain)
    assert all(t.is_contiguous(memory_format=fmt) for t in (plain, pre, activated))


def test_conv_and_silu_outputs_opcheck():
    raw = _inputs(2, 37, 21, 5, 3, fmt=torch.channels_last)
    for bias in (raw["bias"], None):
        torch.library.opcheck(torch.ops.liquiddiff.conv1x1_forward.default,
                              (raw["z"], raw["weight"], bias, torch.float32, False))
        torch.library.opcheck(torch.ops.liquiddiff.conv1x1_and_silu_forward.default,
                              (raw["z"], raw["weight"], bias, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("K, N", [(64, 64), (64, 128), (256, 256), (256, 512)])
def test_gpu_conv_and_silu_outputs_bf16(K, N):
    """The CfC backbone's 1x1 (N = K) and the FeedForward's first conv (N = 2K) at their first
    and third levels, batch 8, channels_last, bf16: the remake's conv output bit for bit the
    forward's, both outputs within bf16 rounding of fp64."""
    size = 256 * 64 // K
    raw = {k: v.bfloat16() for k, v in _inputs(8, K, N, size, size, fmt=torch.channels_last).items() if v is not None}
    args = (raw["z"], raw["weight"], raw["bias"], torch.bfloat16)
    plain = pointwise_conv.conv1x1_forward(*args)
    pre, activated = pointwise_conv.conv1x1_and_silu_forward(*args)
    assert torch.equal(pre, plain)
    exact = [raw[k].double() for k in ("z", "weight", "bias")]
    assert parity.rel_err(plain, functional.conv1x1(*exact)) < 2e-2
    assert parity.rel_err(activated, functional.conv1x1_silu(*exact)) < 2e-2


# ----------------------------------------------------------- the FeedForward's convs in one pass
def _feedforward_inputs(B, C, hidden, N, H, W, dtype=torch.float32, fmt=torch.contiguous_format, biases=True,
                        residual=True):
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    return {"x": randn(B, C, H, W).contiguous(memory_format=fmt), "w1": randn(hidden, C, 1, 1) / C ** 0.5,
            "b1": randn(hidden) if biases else None, "w2": randn(N, hidden, 1, 1) / hidden ** 0.5,
            "b2": randn(N) if biases else None,
            "residual": randn(B, N, H, W).contiguous(memory_format=fmt) if residual else None}


def _feedforward_args(raw, dtype):
    """``feedforward_forward``'s positional arguments."""
    return (*(raw[k] for k in ("x", "w1", "b1", "w2", "b2")), dtype, raw["residual"])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, biases, residual", [
    ((2, 24, 48, 24, 5, 7), True, True),    # the model's 2x, C over one k-tile
    ((1, 3, 20, 5, 4, 4), False, True),     # every count under tl.dot's 16
    ((3, 40, 200, 24, 9, 9), True, False),  # hidden over three chunks and not a multiple of one, pixels over a tile
])
def test_feedforward_parity(monkeypatch, dtype, tol, fmt, shape, biases, residual):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    calls = []
    real = pointwise_conv.feedforward_forward
    monkeypatch.setattr(pointwise_conv, "feedforward_forward", lambda *a: calls.append(1) or real(*a))
    raw = _feedforward_inputs(*shape, dtype=dtype, fmt=fmt, biases=biases, residual=residual)
    with parity.poisoned_outputs(), torch.no_grad():
        out = kernels.feedforward(**raw)
    assert calls, "the Triton FeedForward kernel did not run"
    parity.assert_close("out", out, functional.feedforward(**raw), tol)
    assert out.is_contiguous(memory_format=fmt)


def test_feedforward_runs_apart_with_gradient_or_under_auto(monkeypatch):
    """With gradient (training) or under ``auto`` (the kernel is opt-in), the two convs run
    apart (cuDNN, or the pointwise kernels for the second); the same values."""
    calls = []
    real = pointwise_conv.feedforward_forward
    monkeypatch.setattr(pointwise_conv, "feedforward_forward", lambda *a: calls.append(1) or real(*a))
    raw = _feedforward_inputs(2, 24, 48, 24, 5, 7, fmt=torch.channels_last)
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto")
    with torch.no_grad():
        torch.testing.assert_close(kernels.feedforward(**raw), functional.feedforward(**raw), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    parity.check_op(kernels.feedforward, functional.feedforward, raw, 1e-5)
    assert not calls


def test_feedforward_in_bf16(monkeypatch):
    """bf16 in, the fp32 residual stream (under the interpreter computed in fp32, its bf16
    conversions its own): an fp32 output, the path's roundings to bf16 rounding."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    raw = {k: v if k == "residual" else v.bfloat16()
           for k, v in _feedforward_inputs(2, 24, 48, 24, 6, 5, fmt=torch.channels_last).items()}
    with torch.no_grad():
        out = kernels.feedforward(**raw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, functional.feedforward(**{k: v.float() for k, v in raw.items()}), rtol=3e-2,
                               atol=3e-2)


def test_feedforward_nan_reaches_its_pixel_only():
    raw = _feedforward_inputs(2, 20, 40, 20, 4, 4, fmt=torch.channels_last)
    raw["x"][1, 3, 2, 1] = float("nan")
    out = pointwise_conv.feedforward_forward(*_feedforward_args(raw, torch.float32))
    assert torch.isnan(out[1, :, 2, 1]).all()
    out[1, :, 2, 1] = 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(w1=r["w1"][:, :-1]), r"w1: expected shape \[Co, 8, 1, 1\]"),
    (lambda r: r.update(w2=r["w2"][:, :-1]), r"w2: expected shape \[Co, 16, 1, 1\]"),
    (lambda r: r.update(b2=r["b2"][:-1]), "b2"),
    (lambda r: r.update(residual=r["residual"][:, :-1]), "residual: expected the conv's output shape"),
])
def test_feedforward_bad_arguments_are_named(monkeypatch, change, message):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    raw = _feedforward_inputs(2, 8, 16, 8, 3, 3)
    change(raw)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        kernels.feedforward(**raw)


def test_feedforward_opcheck():
    raw = _feedforward_inputs(2, 37, 60, 21, 5, 3, fmt=torch.channels_last)
    torch.library.opcheck(torch.ops.liquiddiff.feedforward_forward.default, _feedforward_args(raw, torch.float32))
    torch.library.opcheck(torch.ops.liquiddiff.feedforward_forward.default,
                          (raw["x"], raw["w1"], None, raw["w2"], None, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("C", [64, 128, 256])
def test_gpu_feedforward_bf16_at_each_level(monkeypatch, C):
    """The FeedForward at each level of the tiny preset (C -> 2C -> C, 256 px at 64 channels),
    batch 8, channels_last, bf16 with the fp32 residual stream."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", SETTING)
    size = 256 * 64 // C
    raw = {k: v if k == "residual" else v.bfloat16()
           for k, v in _feedforward_inputs(8, C, 2 * C, C, size, size, fmt=torch.channels_last).items()}
    with torch.no_grad():
        out = kernels.feedforward(**raw)
    assert parity.rel_err(out, functional.feedforward(**{k: v.double() for k, v in raw.items()})) < 2e-2

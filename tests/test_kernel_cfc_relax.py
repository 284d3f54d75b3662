"""The fused cfc_relax op (liquiddiff/kernels/cfc_relax.py) against its reference.

Value and every gradient vs functional.cfc_relax with one shared upstream gradient, outputs
NaN-poisoned; layouts, awkward shapes, dtypes; gradcheck and opcheck on the custom ops; argument
errors; backend selection; torch.compile. Without CUDA the kernels run under the Triton
interpreter (conftest.py); the `gpu` tests check bf16/fp16/fp32 at real sizes on a GPU.
"""
import importlib

import pytest
import torch

from liquiddiff import functional, kernels

import parity

cfc_module = importlib.import_module("liquiddiff.kernels.cfc_relax")
adaln = importlib.import_module("liquiddiff.kernels.adaln")

NAMES = ("f", "g", "h", "x", "a", "b", "rho", "t", "residual")
ACTIVATIONS = ("f", "g", "h", "x", "residual")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Interpreter on the CPU in CI; on a GPU machine the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_policy(monkeypatch):
    """Parity tests must run the kernels: fail loudly if Triton cannot run, never fall back."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")


def _activation(shape, dtype, device, layout, index):
    """A leaf [B, C, H, W] tensor, or a view of a leaf, in the requested layout."""
    B, C, H, W = shape
    if layout == "mixed":  # a different layout per argument
        layout = ("nchw", "channels_last", "slice", "channels_last_slice", "nchw")[index]
    if layout == "nchw":
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    if layout == "channels_last":
        base = torch.randn(shape, dtype=dtype, device=device)
        return base.to(memory_format=torch.channels_last).requires_grad_()
    if layout == "crop":  # H and W cannot merge into one pixel axis: the op copies this one
        base = torch.randn((B, C, H + 2, W + 3), dtype=dtype, device=device)
        return base.requires_grad_()[:, :, 1:1 + H, 2:2 + W]
    base = torch.randn((B, C + 3, H, W), dtype=dtype, device=device)
    if layout == "channels_last_slice":
        base = base.to(memory_format=torch.channels_last)
    return base.requires_grad_()[:, 2:2 + C]  # channel slice: a non-contiguous, non-leaf view


def make_inputs(shape, dtype=torch.float32, layout="nchw", residual=True, device=DEVICE,
                param_dtype=None, t=None, rho=None):
    """Fresh random inputs (never zeros), all requiring grad; t in (0, 1] unless given."""
    B, C = shape[:2]
    param_dtype = param_dtype or dtype
    inputs = {
        name: _activation(shape, dtype, device, layout, i)
        for i, name in enumerate(ACTIVATIONS) if residual or name != "residual"
    }
    if layout == "slice":  # strided [B, C] parameters, as chunks of one linear output would be
        inputs["a"] = torch.randn(B, 2 * C, dtype=dtype, device=device).requires_grad_()[:, ::2]
        inputs["b"] = torch.randn(B, 2 * C, dtype=dtype, device=device).requires_grad_()[:, 1::2]
    else:
        inputs["a"] = torch.randn(B, C, dtype=dtype, device=device).requires_grad_()
        inputs["b"] = torch.randn(B, C, dtype=dtype, device=device).requires_grad_()
    if rho is None:
        rho = 2 * torch.randn(C, dtype=param_dtype)
    if t is None:
        t = 1 - torch.rand(B, dtype=param_dtype)
    inputs["rho"] = rho.to(device=device, dtype=param_dtype).requires_grad_()
    inputs["t"] = t.to(device=device, dtype=param_dtype).requires_grad_()
    return inputs


def check_parity(inputs, tol):
    """Fused vs reference: value and the gradient of every input, one shared upstream grad.

    Both graphs read the same input tensors; gradients are taken with autograd.grad, so views
    stay views (no clone that would make a channel slice contiguous).
    """
    with parity.poisoned_outputs():
        out = kernels.cfc_relax(**inputs)
        upstream = torch.randn_like(out)
        grads = parity.grads_of(out, inputs, upstream)
    ref = functional.cfc_relax(**inputs)
    ref_grads = parity.grads_of(ref, inputs, upstream)
    parity.assert_close("out", out, ref, tol)
    for name in inputs:
        parity.assert_close(f"d{name}", grads[name], ref_grads[name], tol)
    return out


# (shape, layout, residual): each row crosses a different tile boundary for the heuristic of
# _tile (test_parity_shapes_cross_tile_boundaries holds them to it).
PARITY_CASES = [
    ((2, 7, 40, 40), "nchw", True),            # H*W > BLOCK_P: two pixel tiles, the last partial
    ((1, 3, 130, 130), "nchw", False),         # B = 1; > 16 pixel tiles: two backward chunks
    ((1, 300, 3, 3), "nchw", True),            # H*W < BLOCK_P; two channel tiles, C not pow2
    ((2, 24, 9, 9), "channels_last", False),   # C = 24 in a 32-channel tile; H*W < BLOCK_P
    ((1, 3, 50, 50), "channels_last", True),   # C = 3; three pixel tiles
    ((1, 136, 3, 3), "channels_last", True),   # two channel tiles of 128
    ((2, 7, 12, 12), "mixed", True),           # every argument in another layout
    ((2, 7, 11, 13), "slice", True),           # channel-slice views, strided a and b
    ((2, 3, 6, 5), "crop", False),             # spatial crops: the one layout that is copied
]


@pytest.fixture
def backward_loops(monkeypatch):
    """Backward programs walk as many pixel tiles as they may, even on a small grid.

    At the default grid-size floor, interpreter-sized tensors give one tile per program; the
    other parity tests run that path.
    """
    monkeypatch.setattr(cfc_module, "_BWD_MIN_PROGRAMS", 1)


@pytest.mark.parametrize("shape,layout,residual", PARITY_CASES)
def test_parity_fp32(triton_policy, backward_loops, shape, layout, residual):
    inputs = make_inputs(shape, torch.float32, layout, residual)
    if layout == "slice":
        assert not inputs["x"].is_contiguous() and not inputs["a"].is_contiguous()
    out = check_parity(inputs, TOL[torch.float32])
    x = inputs["x"]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else
                             torch.contiguous_format), "out must take the layout of x"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_parity_fp64(triton_policy, layout):
    check_parity(make_inputs((2, 5, 6, 7), torch.float64, layout), TOL[torch.float64])


def test_parity_rho_beyond_softplus_threshold(triton_policy):
    # Both softplus branches (identity above 20) and the exp(rho) tail far below 0.
    rho = torch.tensor([-60.0, -25.0, -8.0, 0.5, 19.0, 21.0, 40.0], dtype=torch.float64)
    check_parity(make_inputs((2, 7, 5, 5), torch.float64, rho=rho), TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_rho_all_far_below_zero(triton_policy, dtype):
    # softplus(rho) ~ exp(rho) where 1 + exp(rho) rounds to 1 (fp32) or loses most of its digits
    # (fp64): in every channel, so the tail's error is not hidden in the norm of larger channels
    # (d t is proportional to softplus(rho)).
    rho = -(20 + 10 * torch.rand(5, dtype=dtype))
    check_parity(make_inputs((2, 5, 4, 6), dtype, rho=rho), TOL[dtype])


def test_parity_t_contains_zero(triton_policy):
    # |t| has gradient 0 at t = 0 in torch (sign(0) = 0); the kernel must agree.
    inputs = make_inputs((3, 5, 8, 8), t=torch.tensor([0.0, 0.5, 1.0]))
    check_parity(inputs, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_negative_t(triton_policy, dtype):
    # alpha uses |t| and d|t|/dt = sign(t): a negative t must give the reference's value and
    # gradient (every other case draws t in [0, 1], where |t| = t and sign(t) >= 0).
    t = (1 - torch.rand(3, dtype=dtype)) * torch.tensor([-1.0, 1.0, -1.0], dtype=dtype)
    check_parity(make_inputs((3, 5, 6, 7), dtype, t=t), TOL[dtype])


def test_parity_mixed_dtypes(triton_policy):
    # fp32 activations with fp64 rho and t: the reference promotes the result to fp64.
    inputs = make_inputs((2, 6, 7, 7), torch.float32, param_dtype=torch.float64)
    out = check_parity(inputs, TOL[torch.float32])
    assert out.dtype == torch.float64


def test_parity_a_and_b_in_different_dtypes(triton_policy):
    # da and db are reduced as one stack: each still comes back in its own dtype.
    inputs = make_inputs((2, 6, 5, 5), torch.float32)
    inputs["a"] = inputs["a"].detach().double().requires_grad_()
    out = check_parity(inputs, TOL[torch.float32])
    assert out.dtype == torch.float64


def test_parity_a_and_b_with_their_own_strides(triton_policy):
    # a contiguous, b every other column of a wider tensor: each is read through its own strides
    # (the "slice" case gives both the same strides).
    inputs = make_inputs((2, 6, 5, 5))
    inputs["b"] = torch.randn(2, 12, device=DEVICE).requires_grad_()[:, ::2]
    check_parity(inputs, TOL[torch.float32])


@pytest.mark.parametrize("wanted", [("g", "rho"), ("f", "a", "t"), ("residual",), ("x", "b")])
def test_parity_some_inputs_require_grad(triton_policy, wanted):
    # The backward skips the grads nobody asked for; the others must not change.
    inputs = make_inputs((2, 5, 9, 9))
    inputs = {k: v.detach().requires_grad_(k in wanted) for k, v in inputs.items()}
    with parity.poisoned_outputs():
        out = kernels.cfc_relax(**inputs)
        upstream = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in wanted], upstream)
    ref = functional.cfc_relax(**inputs)
    ref_grads = torch.autograd.grad(ref, [inputs[k] for k in wanted], upstream)
    parity.assert_close("out", out, ref, TOL[torch.float32])
    for name, grad, ref_grad in zip(wanted, grads, ref_grads):
        parity.assert_close(f"d{name}", grad, ref_grad, TOL[torch.float32])


def test_no_grad_forward(triton_policy):
    inputs = {k: v.detach() for k, v in make_inputs((2, 3, 4, 5)).items()}
    with parity.poisoned_outputs():
        out = kernels.cfc_relax(**inputs)
    assert not out.requires_grad
    parity.assert_close("out", out, functional.cfc_relax(**inputs), TOL[torch.float32])


def test_a_nan_rho_reaches_its_channel(triton_policy):
    """softplus(NaN) is NaN: a diverged rho shows in its channel's output and gradients, as in
    the reference (a clamp by tl.minimum would drop the NaN and give softplus ~ 20)."""
    raw = {k: v.detach() for k, v in make_inputs((2, 3, 2, 3), residual=True).items()}
    raw["rho"][0] = float("nan")
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    out, ref = kernels.cfc_relax(**ins), functional.cfc_relax(**ref_ins)
    assert out[:, 0].isnan().all() and out[:, 1:].isfinite().all()
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    for name in ins:
        assert torch.equal(got[name].isnan(), want[name].isnan()), name


def test_nan_and_inf_propagate(triton_policy):
    inputs = {k: v.detach() for k, v in make_inputs((1, 2, 3, 3), residual=False).items()}
    inputs["x"][0, 0, 0, 0] = float("nan")
    inputs["g"][0, 1, 1, 1] = float("inf")
    out = kernels.cfc_relax(**inputs)
    ref = functional.cfc_relax(**inputs)
    assert out[0, 0, 0, 0].isnan() and out[0, 1, 1, 1].isinf()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    parity.assert_close("out", out[finite], ref[finite], TOL[torch.float32])


def test_parity_shapes_cross_tile_boundaries(backward_loops):
    """The parity cases exercise what their comments claim, for the tile heuristic in use."""
    seen = set()
    for shape, layout, _ in PARITY_CASES:
        if layout not in ("nchw", "channels_last"):
            continue
        B, C, H, W = shape
        P = H * W
        x_strides = (C * P, 1, C) if layout == "channels_last" else (C * P, P, 1)
        block_c, block_p, _ = cfc_module._tile(C, P, x_strides, backward=False)
        bwd_c, bwd_p, _ = cfc_module._tile(C, P, x_strides, backward=True)
        tiles = cfc_module._bwd_tiles(C, P, B, bwd_c, bwd_p)
        seen.add(("several pixel tiles" if P > block_p else "pixel tile > H*W", layout))
        if C > block_c and C > bwd_c:
            seen.add(("several channel tiles", layout))
        if C % block_c and C % bwd_c:
            seen.add(("partial channel tile", layout))
        if B == 1:
            seen.add(("B = 1", layout))
        if tiles > 1 and P % (bwd_p * tiles):
            seen.add(("backward loop, last tile partial", layout))
        if P > bwd_p * tiles:
            seen.add(("several backward chunks", layout))
    for what in ("several pixel tiles", "pixel tile > H*W", "several channel tiles",
                 "partial channel tile", "B = 1", "backward loop, last tile partial"):
        for layout in ("nchw", "channels_last"):
            assert (what, layout) in seen, (what, layout)
    assert ("several backward chunks", "nchw") in seen


@pytest.mark.parametrize("shape,layout,residual", PARITY_CASES)
@pytest.mark.parametrize("dtype, copy_dtype", [(torch.float32, torch.float16), (torch.float64, torch.float32)])
def test_forward_with_copy_writes_the_outputs_copy_and_pixel_sum(triton_policy, shape, layout, residual, dtype,
                                                                copy_dtype):
    """forward(copy_dtype=): the same out, bit for bit, its copy in copy_dtype as out.to rounds
    it, and its pixel sum (the spatial mix's inputs) from the kernel's partials, for every
    tile boundary of the parity cases; outputs NaN-poisoned (every element and sum written)."""
    inputs = {k: v.detach() for k, v in make_inputs(shape, dtype, layout, residual=residual).items()}
    args = [inputs.get(name) for name in NAMES]
    with parity.poisoned_outputs():
        plain = cfc_module.forward(*args)
        out, copy, pixel_sum = cfc_module.forward(*args, copy_dtype=copy_dtype)
    assert torch.equal(out, plain) and out.stride() == plain.stride()
    assert copy.dtype == copy_dtype and copy.stride() == out.stride()
    assert torch.equal(copy, out.to(copy_dtype))
    assert pixel_sum.dtype == out.dtype and pixel_sum.shape == shape[:2]
    parity.assert_close("pixel sum", pixel_sum, out.sum((2, 3)), TOL[dtype])


def test_forward_with_copy_sums_an_inf_into_its_channel_only(triton_policy):
    """A masked lane of a partial tile must not reach the sum (0 * inf would be NaN): an inf in
    one pixel makes its channel's pixel sum inf, the others stay finite."""
    inputs = {k: v.detach() for k, v in make_inputs((2, 24, 9, 9), layout="channels_last").items()}
    inputs["residual"][1, 5, 8, 8] = float("inf")
    _, _, pixel_sum = cfc_module.forward(*[inputs.get(name) for name in NAMES], copy_dtype=torch.float16)
    assert pixel_sum[1, 5] == float("inf")
    pixel_sum[1, 5] = 0
    assert pixel_sum.isfinite().all()


def _normalized(inputs, dtype):
    """(x = AdaLN(residual) as the AdaLN kernel stores it, (mean, rstd, scale, shift)) for fresh
    scale and shift: the fused block's n and what remakes it."""
    B, C = inputs["residual"].shape[:2]
    scale, shift = (torch.randn(B, C, dtype=dtype, device=DEVICE) for _ in range(2))
    x, mean, rstd = adaln.normalize(inputs["residual"], scale, shift, 1e-6)
    return x, (mean, rstd, scale, shift)


@pytest.mark.parametrize("shape,layout", [(shape, layout) for shape, layout, residual in PARITY_CASES if residual])
@pytest.mark.parametrize("dtype, copy_dtype", [(torch.float32, torch.float16), (torch.float64, torch.float32)])
def test_forward_normalized_remakes_x_from_the_residual(triton_policy, shape, layout, dtype, copy_dtype):
    """forward(normalization=): x is not read (NaN here) but remade from the residual with the
    AdaLN statistics: out, its copy and pixel sum those of the call that reads x as the AdaLN
    kernel wrote it (bit for bit in the interpreter; a GPU compile may contract the remake's
    last multiply-add into an FMA where the AdaLN kernel did not), and out the reference's."""
    inputs = {k: v.detach() for k, v in make_inputs(shape, dtype, layout).items()}
    x, normalization = _normalized(inputs, dtype)
    inputs["x"] = x
    args = [inputs[name] for name in NAMES]
    unread = torch.full_like(x, float("nan"))
    with parity.poisoned_outputs():
        expected = cfc_module.forward(*args, copy_dtype=copy_dtype)
        got = cfc_module.forward(*args[:3], unread, *args[4:], copy_dtype=copy_dtype, normalization=normalization)
    for name, value, want in zip(("out", "copy", "pixel sum"), got, expected):
        assert value.dtype == want.dtype and value.stride() == want.stride(), name
        if DEVICE == "cpu":
            assert torch.equal(value, want), name
        else:
            parity.assert_close(name, value, want, TOL[dtype])
    reference = functional.cfc_relax(*args[:3], functional.adaln_modulate(inputs["residual"], *normalization[2:]),
                                     *args[4:])
    parity.assert_close("out", got[0], reference, TOL[dtype])


@pytest.mark.parametrize("shape,layout", [(shape, layout) for shape, layout, residual in PARITY_CASES if residual])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_normalized_remakes_x_from_the_residual(triton_policy, shape, layout, dtype):
    """backward(normalization=): x is not read (NaN here) but remade from the residual: every
    gradient that of the call that reads x as the AdaLN kernel wrote it (bit for bit in the
    interpreter), for every tile boundary of the parity cases, outputs NaN-poisoned."""
    inputs = {k: v.detach() for k, v in make_inputs(shape, dtype, layout).items()}
    x, normalization = _normalized(inputs, dtype)
    args = [inputs[name] for name in NAMES[:-1]]
    args[3] = x
    grad_out = torch.randn_like(x)
    with parity.poisoned_outputs():
        expected = cfc_module.backward(grad_out, *args, [True] * 8)
        got = cfc_module.backward(grad_out, *args[:3], torch.full_like(x, float("nan")), *args[4:], [True] * 8,
                                  normalization=(inputs["residual"], *normalization))
    for name, value, want in zip(("df", "dg", "dh", "dx", "da", "db", "drho", "dt"), got, expected):
        assert value.dtype == want.dtype and value.shape == want.shape, name
        if DEVICE == "cpu":
            assert torch.equal(value, want), name
        else:
            parity.assert_close(name, value, want, TOL[dtype])


def test_opcheck_forward_normalized():
    inputs = {k: v.detach() for k, v in make_inputs((2, 3, 2, 3), layout="channels_last").items()}
    _, normalization = _normalized(inputs, torch.float32)
    args = [inputs[name] for name in ("f", "g", "h", "a", "b", "rho", "t", "residual")]
    torch.library.opcheck(torch.ops.liquiddiff.cfc_relax_normalized.default,
                          (*args, *normalization, torch.float16))


@pytest.mark.parametrize("needs", [[True] * 8, [True, True, True, False, False, False, True, False]])
def test_opcheck_backward_normalized(needs):
    inputs = {k: v.detach() for k, v in make_inputs((2, 3, 2, 3), layout="channels_last").items()}
    _, normalization = _normalized(inputs, torch.float32)
    args = [inputs[name] for name in ("f", "g", "h", "a", "b", "rho", "t", "residual")]
    torch.library.opcheck(torch.ops.liquiddiff.cfc_relax_normalized_backward.default,
                          (torch.randn_like(inputs["f"]), *args, *normalization, needs))


def test_opcheck_forward_with_copy():
    inputs = make_inputs((2, 3, 2, 3), layout="channels_last")
    args = tuple(inputs[name].detach() for name in NAMES)
    torch.library.opcheck(torch.ops.liquiddiff.cfc_relax_with_copy.default, (*args, torch.float16))


def test_tile_heuristic_at_model_size():
    # The configurations measured on an H200 at [8, 64, 256, 256] (see the constants' comment);
    # the channels_last backward's from the compiler's register counts (not yet timed).
    B, C, P = 8, 64, 256 * 256
    nchw, channels_last = (C * P, P, 1), (C * P, 1, C)
    assert cfc_module._tile(C, P, nchw, backward=False) == (4, 1024, 8)
    assert cfc_module._tile(C, P, channels_last, backward=False) == (64, 64, 4)
    assert cfc_module._tile(C, P, nchw, backward=True) == (1, 1024, 4)
    assert cfc_module._tile(C, P, channels_last, backward=True) == (64, 8, 4)
    assert cfc_module._bwd_tiles(C, P, B, 1, 1024) == 16
    assert cfc_module._bwd_tiles(C, P, B, 64, 8) == 16
    # One RGB image at 1024 px: fewer tiles per program, so the grid still fills the GPU.
    assert cfc_module._bwd_tiles(3, 1024 * 1024, 1, 1, 1024) == 3


def test_gradcheck_fp64(triton_policy):
    inputs = make_inputs((2, 2, 2, 3), torch.float64, t=0.3 + 0.7 * torch.rand(2))
    args = tuple(inputs[name].detach().requires_grad_() for name in NAMES)
    assert torch.autograd.gradcheck(kernels.cfc_relax, args)


def _op_args(inputs, requires_grad):
    return tuple(
        inputs[name].detach().clone().requires_grad_(requires_grad) if name in inputs else None
        for name in NAMES
    )


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("layout, param_dtype", [("nchw", None), ("channels_last", torch.float64)])
def test_opcheck_forward(residual, layout, param_dtype):
    # channels_last and a promoted result dtype: the fake kernel must give the real output's
    # strides and dtype (what torch.compile plans the graph with).
    inputs = make_inputs((2, 3, 2, 3), residual=residual, layout=layout, param_dtype=param_dtype)
    torch.library.opcheck(torch.ops.liquiddiff.cfc_relax.default, _op_args(inputs, True))


@pytest.mark.parametrize("needs", [[True] * 8, [False, True, False, True, True, False, True, False]])
@pytest.mark.parametrize("ab_dtype", [None, torch.float16])
def test_opcheck_backward(needs, ab_dtype):
    # a and b in a narrower dtype than the fp32 partials (autocast's Linear outputs): d(a, b)
    # comes back stacked in their dtype, and the fake kernel must say so.
    inputs = make_inputs((2, 3, 2, 3), layout="channels_last")
    if ab_dtype is not None:
        inputs["a"], inputs["b"] = inputs["a"].to(ab_dtype), inputs["b"].to(ab_dtype)
    grad_out = torch.randn_like(inputs["x"])
    args = (grad_out, *_op_args(inputs, False)[:8], needs)
    torch.library.opcheck(torch.ops.liquiddiff.cfc_relax_backward.default, args)


def _valid_args():
    return {k: v.detach() for k, v in make_inputs((2, 3, 4, 4)).items()}


@pytest.mark.parametrize("name,bad,error,match", [
    ("a", lambda v: v[:, :2], ValueError, r"^a: expected shape \(2, 3\)"),
    ("rho", lambda v: v[None], ValueError, r"^rho: expected shape \(3,\)"),
    ("t", lambda v: v[:1], ValueError, r"^t: expected shape \(2,\)"),
    ("f", lambda v: v[0], ValueError, r"^f: expected a 4-D"),
    ("h", lambda v: v[:, :, :3], ValueError, r"^h: expected shape"),
    ("residual", lambda v: v[:1], ValueError, r"^residual: expected shape"),
    ("x", lambda v: v.to(torch.int32), TypeError, r"^x: expected a floating-point"),
    ("b", lambda v: v.to(torch.int64), TypeError, r"^b: expected a floating-point"),
    ("g", lambda v: v.tolist(), TypeError, r"^g: expected a torch.Tensor"),
    ("rho", lambda v: v.to("meta"), ValueError, r"^rho: expected a tensor on "),
    ("x", lambda v: v.to("meta"), ValueError, r"^x: expected a tensor on "),
])
def test_argument_errors(triton_policy, monkeypatch, name, bad, error, match):
    def no_launch(*args):
        raise AssertionError("the op ran before the arguments were checked")

    monkeypatch.setattr(cfc_module, "_cfc_relax_op", no_launch)
    monkeypatch.setattr(cfc_module._EagerCfcRelax, "apply", no_launch)
    args = _valid_args()
    args[name] = bad(args[name])
    with pytest.raises(error, match=match):
        kernels.cfc_relax(**args)


@pytest.mark.parametrize("policy,expect_reference", [("torch", True), ("triton", False)])
def test_backend_selection(monkeypatch, policy, expect_reference):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", policy)
    calls = []
    reference = functional.cfc_relax

    def spy(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)

    monkeypatch.setattr(functional, "cfc_relax", spy)
    inputs = {k: v.detach() for k, v in make_inputs((2, 3, 4, 4)).items()}
    out = kernels.cfc_relax(**inputs)
    assert len(calls) == (1 if expect_reference else 0)
    parity.assert_close("out", out, reference(**inputs), TOL[torch.float32])


def test_torch_compile_fullgraph(triton_policy):
    torch._dynamo.reset()

    def block(f, g, h, x, a, b, rho, t, residual):
        return kernels.cfc_relax(f, g, h, x, a, b, rho, t, residual=residual) * 2

    compiled = torch.compile(block, fullgraph=True)
    inputs = make_inputs((2, 3, 5, 5))
    args = [inputs[name] for name in NAMES]
    out = compiled(*args)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, upstream)
    ref = functional.cfc_relax(*args) * 2
    ref_grads = torch.autograd.grad(ref, args, upstream)
    parity.assert_close("out", out, ref, TOL[torch.float32])
    for name, grad, ref_grad in zip(NAMES, grads, ref_grads):
        parity.assert_close(f"d{name}", grad, ref_grad, TOL[torch.float32])


# ---- GPU: bf16/fp16/fp32 at real sizes against the reference on fp64 upcasts ----

GPU_SHAPES = [(8, 64, 256, 256), (3, 7, 37, 29)]


def _check_against_fp64(inputs, out_dtype, tol, op=kernels.cfc_relax):
    with parity.poisoned_outputs():
        out = op(**inputs)
        upstream = torch.randn_like(out)
        grads = parity.grads_of(out, inputs, upstream)
    wide = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = functional.cfc_relax(**wide)
    ref_grads = parity.grads_of(ref, wide, upstream.double())
    assert out.dtype == out_dtype
    assert parity.rel_err(out, ref) < tol, ("out", parity.rel_err(out, ref))
    for name, tensor in inputs.items():
        grad = grads[name]
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        err = parity.rel_err(grad, ref_grads[name])
        assert err < tol, (f"d{name}", err)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2),
                                       (torch.float32, 1e-5)])
def test_gpu_parity(triton_policy, shape, layout, dtype, tol):
    inputs = make_inputs(shape, dtype, layout, device="cuda")
    _check_against_fp64(inputs, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed"])
def test_gpu_parity_autocast_dtypes(triton_policy, layout):
    # Under autocast: bf16 activations meet fp32 rho, t and residual stream; the result is fp32.
    inputs = make_inputs((4, 24, 64, 48), torch.bfloat16, layout, device="cuda",
                         param_dtype=torch.float32)
    inputs["residual"] = inputs["residual"].detach().float().requires_grad_()
    _check_against_fp64(inputs, torch.float32, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_forward_with_copy_as_the_block_runs_it(triton_policy, layout):
    """Under autocast's dtypes (bf16 f, g, h; fp32 n, residual): out as without the copy, its bf16
    copy exact, its pixel sum to fp32 rounding of 4096-pixel sums."""
    inputs = {k: v.detach() for k, v in make_inputs((8, 64, 64, 64), torch.bfloat16, layout, device="cuda",
                                                    param_dtype=torch.float32).items()}
    inputs["x"], inputs["residual"] = inputs["x"].float(), inputs["residual"].float()
    args = [inputs[name] for name in NAMES]
    out, copy, pixel_sum = cfc_module.forward(*args, copy_dtype=torch.bfloat16)
    assert torch.equal(out, cfc_module.forward(*args)) and torch.equal(copy, out.bfloat16())
    parity.assert_close("pixel sum", pixel_sum, out.double().sum((2, 3)).float(), 1e-5)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(triton_policy):
    torch._dynamo.reset()
    compiled = torch.compile(kernels.cfc_relax, fullgraph=True)
    inputs = make_inputs((2, 40, 33, 31), torch.bfloat16, "channels_last", device="cuda")
    _check_against_fp64(inputs, torch.bfloat16, 1e-2, op=compiled)


@pytest.mark.parametrize("residual", [True, False])
def test_custom_op_autograd_matches_reference(residual):
    """Eager calls take the dispatcher-free autograd.Function; torch.compile traces the custom op
    and its registered autograd: that path, called directly, computes the same values and grads."""
    inputs = make_inputs((2, 5, 6, 7), residual=residual)
    with parity.poisoned_outputs():
        out = torch.ops.liquiddiff.cfc_relax(*(inputs.get(name) for name in NAMES))
        upstream = torch.randn_like(out)
        grads = parity.grads_of(out, inputs, upstream)
    ref = functional.cfc_relax(**inputs)
    ref_grads = parity.grads_of(ref, inputs, upstream)
    parity.assert_close("out", out, ref, 1e-5)
    for name in inputs:
        parity.assert_close(f"d{name}", grads[name], ref_grads[name], 1e-5)


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_double_backward_raises(triton_policy, path):
    """The backward is Triton kernels: a gradient of a gradient (a gradient penalty) must fail
    loudly on both paths, not come back without its second-order terms."""
    inputs = make_inputs((1, 3, 2, 3), residual=False)
    args = _op_args(inputs, True)
    out = kernels.cfc_relax(*args) if path == "eager" else torch.ops.liquiddiff.cfc_relax(*args)
    (grad_f,) = torch.autograd.grad(out.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        grad_f.sum().backward()

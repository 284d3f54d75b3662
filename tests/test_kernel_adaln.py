"""Fused AdaLN modulation (liquiddiff.kernels.adaln) against the reference functional op.

Without CUDA the Triton kernels run under the interpreter on the CPU (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels on the GPU (on the CPU
they would only compare the reference with itself). fp32 and fp64, value and every gradient,
with NaN-poisoned output buffers. The `gpu` tests add bf16/fp16 parity at full size.
"""
from __future__ import annotations

import math

import pytest
import torch

import parity
from liquiddiff import functional
from liquiddiff.kernels import adaln as adaln_kernel
from liquiddiff.kernels import runtime
from liquiddiff.kernels.adaln import adaln_modulate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ARGS = ("x", "scale", "shift", "residual")


# ----------------------------------------------------------------------------------- inputs
def _activation(layout: str, shape, dtype, device):
    """(leaf-to-be base tensor, view that turns it into the op's [B, C, H, W] argument)."""
    b, c, h, w = shape
    if layout == "nchw":
        return torch.randn(shape, dtype=dtype, device=device), lambda t: t
    if layout == "channels_last":
        base = torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
        return base, lambda t: t
    if layout in ("slice_nchw", "slice_channels_last"):
        base = torch.randn(b, c + 3, h, w, dtype=dtype, device=device)
        if layout == "slice_channels_last":
            base = base.to(memory_format=torch.channels_last)
        return base, lambda t: t[:, 1:1 + c]
    if layout == "crop":  # H and W cannot be merged into one pixel axis: the launcher copies
        base = torch.randn(b, c, h + 2, w + 1, dtype=dtype, device=device)
        return base, lambda t: t[:, :, 1:1 + h, :w]
    raise AssertionError(layout)


class Case:
    """Random inputs (never zeros) for one parity check, shared by the fused and reference runs."""

    def __init__(self, shape, dtype=torch.float32, *, x_layout="nchw", res_layout=None,
                 residual=True, res_dtype=None, param_dtype=None, device=DEVICE):
        b, c = shape[:2]
        self.bases, self.views = {}, {}
        self.bases["x"], self.views["x"] = _activation(x_layout, shape, dtype, device)
        self.bases["scale"] = 0.5 * torch.randn(b, c, dtype=param_dtype or dtype, device=device)
        self.bases["shift"] = torch.randn(b, c, dtype=param_dtype or dtype, device=device)
        if residual:
            self.bases["residual"], self.views["residual"] = _activation(
                res_layout or x_layout, shape, res_dtype or dtype, device)
        # Give every pixel a different mean and spread so the normalisation is not trivial.
        self.bases["x"].mul_(1.5).add_(0.25)

    def leaves(self, requires=ARGS, cast=None):
        out = {}
        for name, t in self.bases.items():
            t = t.detach().clone() if cast is None else t.detach().to(cast)
            out[name] = t.requires_grad_(name in requires)
        return out

    def call(self, fn, leaves):
        args = {k: self.views.get(k, lambda t: t)(v) for k, v in leaves.items()}
        return fn(args.pop("x"), args.pop("scale"), args.pop("shift"), eps=EPS, **args)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _run(case, fn, leaves, upstream, use):
    """Outputs and gradients of the leaves that require grad; ``use`` picks the outputs that
    reach the loss (each with its upstream gradient)."""
    outs = _outputs(case.call(fn, leaves))
    wanted = [n for n, t in leaves.items() if t.requires_grad]
    use = [i for i in use if outs[i].requires_grad]
    grads = torch.autograd.grad([outs[i] for i in use], [leaves[n] for n in wanted],
                                [upstream[i] for i in use], allow_unused=True)
    return outs, dict(zip(wanted, grads))


def check_parity(case, tol, *, requires=ARGS, use=None, ref_cast=None):
    """Fused vs reference: every output, every gradient, one shared random upstream gradient.

    ``ref_cast``: run the reference on upcasts to this dtype (low-precision GPU checks) and
    compare values there; the fused dtypes are still checked against the reference's own.
    """
    fused_leaves = case.leaves(requires)
    with parity.poisoned_outputs():
        fused_outs = _outputs(case.call(adaln_modulate, fused_leaves))
    dtype_ref = _outputs(case.call(functional.adaln_modulate, case.leaves(())))
    use = tuple(range(len(fused_outs))) if use is None else use
    upstream = tuple(torch.randn_like(o) for o in fused_outs)

    with parity.poisoned_outputs():
        outs, grads = _run(case, adaln_modulate, fused_leaves, upstream, use)
    ref_leaves = case.leaves(requires, cast=ref_cast)
    ref_up = tuple(u.to(ref_cast) if ref_cast else u for u in upstream)
    ref_outs, ref_grads = _run(case, functional.adaln_modulate, ref_leaves, ref_up, use)

    assert len(outs) == len(ref_outs)
    for i, (o, r, d) in enumerate(zip(outs, ref_outs, dtype_ref)):
        assert o.dtype == d.dtype, f"output {i}: dtype {o.dtype} != reference {d.dtype}"
        assert o.requires_grad == r.requires_grad, f"output {i}: requires_grad differs"
        parity.assert_close(f"output {i}", o.to(r.dtype), r, tol)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        got = grads[name]
        if ref is None:
            assert got is None or torch.count_nonzero(got) == 0, f"d {name}: expected no gradient"
            continue
        assert got is not None, f"d {name}: missing gradient"
        assert got.dtype == case.bases[name].dtype, f"d {name}: dtype {got.dtype}"
        parity.assert_close(f"d {name}", got.to(ref.dtype), ref, tol)


# ------------------------------------------------------------------------- parity, interpreter
# H*W below and above one block of pixels (launch_config: 1024 pixels at C=3, 512 at C=7,
# 128 at C=24, 32 at C=100), C not a power of two, B = 1.
AWKWARD = [(1, 3, 48, 48), (2, 7, 5, 6), (2, 7, 33, 33), (2, 24, 17, 19), (3, 100, 9, 10),
           (2, 64, 8, 8)]


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp32(shape, layout, residual):
    check_parity(Case(shape, x_layout=layout, residual=residual), TOL[torch.float32])


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (3, 100, 9, 10)], ids=lambda s: "x".join(map(str, s)))
def test_parity_fp64(shape, layout, residual):
    check_parity(Case(shape, torch.float64, x_layout=layout, residual=residual), TOL[torch.float64])


@pytest.mark.parametrize("x_layout,res_layout", [
    ("slice_nchw", "slice_nchw"),
    ("slice_channels_last", "slice_channels_last"),
    ("nchw", "channels_last"),
    ("channels_last", "nchw"),
    ("slice_channels_last", "nchw"),
    ("crop", "channels_last"),
])
def test_parity_views_and_mixed_layouts(x_layout, res_layout):
    check_parity(Case((2, 24, 9, 10), x_layout=x_layout, res_layout=res_layout), TOL[torch.float32])


def test_parity_scale_and_shift_with_their_own_strides():
    # scale contiguous, shift every other column of a wider tensor: each is read through its own
    # strides (elsewhere the two always share theirs).
    case = Case((2, 7, 5, 6), x_layout="channels_last")
    case.bases["shift"] = torch.randn(2, 14, device=DEVICE)
    case.views["shift"] = lambda t: t[:, ::2]
    check_parity(case, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["slice_nchw", "crop"])
def test_parity_views_without_residual(layout):
    check_parity(Case((2, 7, 9, 10), x_layout=layout, residual=False), TOL[torch.float32])


def test_parity_many_channels():
    # C = 1000 pads to a 1024-channel tile of 8 pixels, at 16 warps.
    check_parity(Case((2, 1000, 3, 5), x_layout="channels_last"), TOL[torch.float32])


@pytest.mark.parametrize("x_dtype,res_dtype,param_dtype", [
    (torch.float32, torch.float64, torch.float64),
    (torch.float32, torch.float64, torch.float32),
    (torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float64),
])
def test_parity_mixed_dtypes(x_dtype, res_dtype, param_dtype):
    # Autocast-style mixes: out and s take the reference's promoted dtypes; each gradient
    # has its input's dtype (d x and d residual written in one pass when they differ).
    case = Case((2, 7, 6, 5), x_dtype, res_dtype=res_dtype, param_dtype=param_dtype,
                x_layout="channels_last", res_layout="nchw")
    check_parity(case, TOL[torch.float32])
    # Any fp64 input makes the kernel compute in fp64 (the reference takes the statistics in
    # promote(s, fp32)): out is then fp64 math on s rounded to its own dtype.
    if param_dtype == torch.float64:
        out, s = case.call(adaln_modulate, case.leaves(()))
        want = functional.adaln_modulate(s.double(), case.bases["scale"], case.bases["shift"], EPS)
        parity.assert_close("fp64 out", out, want, TOL[torch.float64])


@pytest.mark.parametrize("requires", [
    ("x",), ("residual",), ("scale",), ("shift", "residual"), ("scale", "shift"),
], ids="+".join)
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float64])
def test_parity_subset_of_gradients(requires, res_dtype):
    case = Case((2, 7, 5, 6), res_dtype=res_dtype)
    check_parity(case, TOL[torch.float32], requires=requires)


@pytest.mark.parametrize("use", [(0,), (1,)], ids=["only_out", "only_s"])
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float64])
def test_parity_one_output_reaches_the_loss(use, res_dtype):
    # The other output's gradient reaches backward as None (grad_s None, or grad_out None).
    check_parity(Case((2, 7, 5, 6), res_dtype=res_dtype), TOL[torch.float32], use=use)


def test_parity_broadcast_upstream_gradient():
    # out.sum() hands backward an expanded (all strides 0) gradient: read in place, no copy.
    case = Case((2, 7, 5, 6), x_layout="channels_last")
    fused, ref = case.leaves(), case.leaves()
    with parity.poisoned_outputs():
        out, s = case.call(adaln_modulate, fused)
        (out.sum() + s.sum()).backward()
    out_r, s_r = case.call(functional.adaln_modulate, ref)
    (out_r.sum() + s_r.sum()).backward()
    for name in ARGS:
        parity.assert_close(f"d {name}", fused[name].grad, ref[name].grad, TOL[torch.float32])


def test_empty_pixel_axis():
    case = Case((2, 7, 0, 5))
    leaves = case.leaves()
    with parity.poisoned_outputs():
        out, s = case.call(adaln_modulate, leaves)
        (out.sum() + s.sum()).backward()
    assert out.shape == s.shape == (2, 7, 0, 5)
    assert torch.equal(leaves["scale"].grad, torch.zeros(2, 7, device=DEVICE))
    assert torch.equal(leaves["shift"].grad, torch.zeros(2, 7, device=DEVICE))


# --------------------------------------------------------------------------- special values
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_zero_variance_pixel_is_finite(residual):
    case = Case((2, 7, 5, 6), residual=residual)
    case.bases["x"][:, :, 1, 2] = 3.0
    if residual:
        case.bases["residual"][:, :, 1, 2] = -1.25
    leaves = case.leaves()
    with parity.poisoned_outputs():
        outs = _outputs(case.call(adaln_modulate, leaves))
        grads = torch.autograd.grad(outs, list(leaves.values()), [torch.randn_like(o) for o in outs])
    assert all(torch.isfinite(t).all() for t in (*outs, *grads))
    # x_hat = 0 at the constant pixel: out = shift there.
    torch.testing.assert_close(outs[0][:, :, 1, 2], case.bases["shift"])
    check_parity(case, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_propagates_to_its_pixel_only(layout):
    case = Case((2, 7, 5, 6), x_layout=layout, residual=False)
    x = case.bases["x"]
    x[1, 3, 2, 4] = float("nan")
    with torch.no_grad(), parity.poisoned_outputs():
        out = adaln_modulate(x, case.bases["scale"], case.bases["shift"])
    ref = functional.adaln_modulate(x, case.bases["scale"], case.bases["shift"])
    nan_pixel = torch.zeros(2, 1, 5, 6, dtype=torch.bool, device=DEVICE)
    nan_pixel[1, 0, 2, 4] = True
    nan_pixel = nan_pixel.expand_as(out)
    assert out[nan_pixel].isnan().all()
    assert torch.isfinite(out[~nan_pixel]).all()
    parity.assert_close("out", out[~nan_pixel], ref[~nan_pixel], TOL[torch.float32])


# ----------------------------------------------------------------- gradcheck, opcheck, compile
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck_fp64(residual):
    case = Case((2, 3, 2, 3), torch.float64, x_layout="channels_last", residual=residual)
    leaves = case.leaves()
    names = list(leaves)

    def fn(*tensors):
        return case.call(adaln_modulate, dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples():
    samples = []
    for layout, residual, grad in [("nchw", True, True), ("channels_last", False, True),
                                   ("channels_last", True, False)]:
        case = Case((2, 5, 3, 4), x_layout=layout, residual=residual)
        leaves = case.leaves(ARGS if grad else ())
        samples.append((leaves["x"], leaves["scale"], leaves["shift"], EPS, leaves.get("residual"), None, None))
    samples.append((*samples[0][:5], torch.float64, None))  # out in another dtype than promotion's
    # Autocast-style mix: x fp32, scale and shift fp64 (out promoted), residual fp64 (s promoted).
    case = Case((2, 5, 3, 4), x_layout="channels_last", res_dtype=torch.float64, param_dtype=torch.float64)
    leaves = case.leaves(ARGS)
    samples.append((leaves["x"], leaves["scale"], leaves["shift"], EPS, leaves["residual"], None, None))
    samples.append((*samples[1][:6], torch.float32))  # with a copy of out in another dtype
    return samples


@pytest.mark.parametrize("index", range(6))
def test_opcheck_forward(index):
    torch.library.opcheck(torch.ops.liquiddiff.adaln_modulate.default, _opcheck_samples()[index])


@pytest.mark.parametrize("write_ds,ds2,param_grads,grad_s,grad_out2", [
    (True, None, True, True, False),
    (False, torch.float64, False, True, False),
    (True, torch.float64, True, False, False),
    (True, None, True, True, True),
])
def test_opcheck_backward(write_ds, ds2, param_grads, grad_s, grad_out2):
    x, scale, shift, eps, residual, _, _ = _opcheck_samples()[0]
    out, s, mean, rstd, _ = torch.ops.liquiddiff.adaln_modulate(
        x.detach(), scale.detach(), shift.detach(), eps, residual.detach(), None, None)
    args = (torch.randn_like(out), torch.randn_like(s) if grad_s else None, s, scale.detach(),
            mean, rstd, x.dtype, ds2, write_ds, param_grads)
    if grad_out2:
        args += (torch.randn_like(out).float(),)
    torch.library.opcheck(torch.ops.liquiddiff.adaln_modulate_backward.default, args)


@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float64])
def test_backward_writes_ds_once_when_dtypes_match(res_dtype):
    case = Case((2, 7, 5, 6), res_dtype=res_dtype)
    leaves = case.leaves(("x", "residual"))
    out, s = case.call(adaln_modulate, leaves)
    dx, dres = torch.autograd.grad((out, s), (leaves["x"], leaves["residual"]),
                                   (torch.randn_like(out), torch.randn_like(s)))
    assert (dx.data_ptr() == dres.data_ptr()) == (res_dtype == torch.float32)
    assert dx.dtype == torch.float32 and dres.dtype == res_dtype


def test_forward_saves_statistics_not_out():
    case = Case((2, 7, 5, 6))
    leaves = case.leaves()
    out, s = case.call(adaln_modulate, leaves)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 4
    assert saved[0].data_ptr() == s.data_ptr()
    assert all(t.data_ptr() != out.data_ptr() for t in saved)
    assert saved[2].shape == saved[3].shape == (2, 30)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    case = Case((2, 7, 5, 6), x_layout="channels_last")

    def block(x, scale, shift, residual):
        out, s = adaln_modulate(x, scale, shift, residual=residual)
        return out * 2.0 + s

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    fused, ref = case.leaves(), case.leaves()
    up = torch.randn(2, 7, 5, 6, device=DEVICE)
    got = compiled(**fused)
    got.backward(up)
    out_r, s_r = functional.adaln_modulate(ref["x"], ref["scale"], ref["shift"], EPS, ref["residual"])
    want = out_r * 2.0 + s_r
    want.backward(up)
    parity.assert_close("compiled out", got, want, TOL[torch.float32])
    for name in ARGS:
        parity.assert_close(f"compiled d {name}", fused[name].grad, ref[name].grad, TOL[torch.float32])


# ---------------------------------------------------------------------- routing and errors
def test_torch_policy_routes_to_reference(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton op ran under LIQUIDDIFF_KERNELS=torch")

    case = Case((2, 7, 5, 6))
    monkeypatch.setattr(adaln_kernel, "_adaln_forward", no_kernel)
    monkeypatch.setattr(adaln_kernel._EagerAdaLN, "apply", no_kernel)
    monkeypatch.setenv(runtime.ENV_VAR, "torch")
    out, s = case.call(adaln_modulate, case.leaves(()))
    ref_out, ref_s = case.call(functional.adaln_modulate, case.leaves(()))
    assert torch.equal(out, ref_out) and torch.equal(s, ref_s)
    monkeypatch.setenv(runtime.ENV_VAR, "triton")
    with pytest.raises(AssertionError, match="Triton op ran"):
        case.call(adaln_modulate, case.leaves(()))


def _good():
    return dict(x=torch.randn(2, 4, 3, 3), scale=torch.randn(2, 4), shift=torch.randn(2, 4),
                eps=EPS, residual=torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("name,value,error,match", [
    ("x", torch.randn(2, 4, 9), ValueError, "x: expected a 4-D"),
    ("x", [[1.0]], TypeError, "x: expected a torch.Tensor"),
    ("x", torch.ones(2, 4, 3, 3, dtype=torch.int64), TypeError, "x: expected a floating"),
    ("scale", torch.randn(2, 5), ValueError, "scale: expected shape"),
    ("scale", torch.randn(4), ValueError, "scale: expected shape"),
    ("scale", torch.ones(2, 4, dtype=torch.int32), TypeError, "scale: expected a floating"),
    ("scale", torch.randn(2, 4, device="meta"), ValueError, "scale: expected a tensor on"),
    ("shift", torch.randn(1, 4), ValueError, "shift: expected shape"),
    ("shift", None, TypeError, "shift: expected a torch.Tensor"),
    ("residual", torch.randn(2, 4, 3, 4), ValueError, "residual: expected shape"),
    ("residual", torch.ones(2, 4, 3, 3, dtype=torch.bool), TypeError, "residual: expected a floating"),
    ("residual", torch.randn(2, 4, 3, 3, device="meta"), ValueError, "residual: expected a tensor on"),
    ("eps", 0.0, ValueError, "eps: expected a positive"),
    ("eps", -1e-5, ValueError, "eps: expected a positive"),
    ("eps", math.inf, ValueError, "eps: expected a positive"),
    ("eps", math.nan, ValueError, "eps: expected a positive"),
    ("eps", "1e-6", TypeError, "eps: expected a positive float"),
    ("eps", True, TypeError, "eps: expected a positive float"),
    ("eps", torch.tensor(1e-6), TypeError, "eps: expected a positive float"),
])
def test_invalid_arguments_raise_before_launch(monkeypatch, name, value, error, match):
    def no_kernel(*args, **kwargs):
        raise AssertionError("launched with an invalid argument")

    monkeypatch.setattr(adaln_kernel, "_adaln_forward", no_kernel)
    args = _good()
    args[name] = value
    with pytest.raises(error, match=match):
        adaln_modulate(**args)


def test_too_many_channels_raise():
    c = adaln_kernel.MAX_CHANNELS + 1
    with pytest.raises(ValueError, match="x: at most"):
        adaln_modulate(torch.randn(1, c, 1, 1), torch.randn(1, c), torch.randn(1, c))


def test_launch_config_tiles():
    for c in (1, 3, 64, 100, 256, 512, 1000, 4096, adaln_kernel.MAX_CHANNELS):
        block_c, block_p, num_warps = adaln_kernel.launch_config(c, 256 * 256)
        assert block_c >= c and block_c & (block_c - 1) == 0
        assert block_p & (block_p - 1) == 0
        assert block_c * block_p <= 8192
        assert block_c * block_p <= 16 * 32 * num_warps <= 16 * 32 * 16  # no register spills
        if c <= 512:  # whole 32-byte sectors for NCHW loads: >= 16 contiguous pixels a row
            assert block_p >= 16
    assert adaln_kernel.launch_config(64, 256 * 256) == (64, 64, 8)
    assert adaln_kernel.launch_config(7, 30)[1] == 32  # never more pixels than the image has


# ------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [(8, 64, 256, 256), (3, 100, 37, 41)]


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_parity_low_precision(dtype, shape, layout, residual):
    case = Case(shape, dtype, x_layout=layout, residual=residual, device=DEVICE)
    check_parity(case, 1e-2, ref_cast=torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice_channels_last"])
@pytest.mark.parametrize("shape", [(3, 100, 37, 41), (2, 3000, 5, 7), (2, 4096, 6, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_parity_fp32(shape, layout):
    # Compiled (not interpreted) kernels: fp32 accuracy holds, large tiles included.
    case = Case(shape, torch.float32, x_layout=layout, device=DEVICE)
    check_parity(case, TOL[torch.float32], ref_cast=torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
def test_gpu_autocast_mix(res_dtype):
    # bf16 activations meeting an fp32 residual stream and fp32 modulation.
    case = Case((4, 96, 32, 48), torch.bfloat16, res_dtype=res_dtype, param_dtype=torch.float32,
                x_layout="channels_last", device=DEVICE)
    check_parity(case, 1e-2, ref_cast=torch.float64)
    check_parity(case, 1e-2, requires=("residual", "scale"), ref_cast=torch.float64)
    check_parity(case, 1e-2, requires=("x",), ref_cast=torch.float64)


@pytest.mark.parametrize("residual", [True, False])
def test_custom_op_autograd_matches_reference(monkeypatch, residual):
    """Eager calls take the dispatcher-free autograd.Function; torch.compile traces the custom op
    and its registered autograd. Routed through the custom op, parity holds the same."""
    calls = []

    def custom_op(*args):
        calls.append(1)
        return adaln_kernel._adaln_forward(*args)

    monkeypatch.setattr(adaln_kernel._EagerAdaLN, "apply", custom_op)
    check_parity(Case((2, 7, 5, 6), residual=residual), 1e-5)
    assert calls


# ------------------------------------------------------------------------------ out_dtype
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("policy", ["auto", "torch"])
def test_out_dtype_is_the_reference_cast(monkeypatch, residual, policy):
    """out_dtype stores out in that dtype: the reference's out.to(out_dtype), value and every
    gradient (the upstream gradient of out arrives in out_dtype), on the kernel and on the
    PyTorch fallback."""
    monkeypatch.setenv(runtime.ENV_VAR, policy)
    raw = {"x": torch.randn(2, 5, 4, 3, dtype=torch.float64, device=DEVICE),
           "scale": torch.randn(2, 5, dtype=torch.float64, device=DEVICE),
           "shift": torch.randn(2, 5, dtype=torch.float64, device=DEVICE)}
    if residual:
        raw["residual"] = torch.randn(2, 5, 4, 3, dtype=torch.float64, device=DEVICE)
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    with parity.poisoned_outputs():
        got = adaln_modulate(**ins, out_dtype=torch.float32)
    want = functional.adaln_modulate(**ref_ins)
    got, want = (got, want) if residual else ((got,), (want,))
    want = (want[0].to(torch.float32), *want[1:])
    assert got[0].dtype == torch.float32
    ups = tuple(torch.randn_like(w) for w in want)
    for name, g, w in zip(("out", "s"), got, want):
        parity.assert_close(name, g, w, 1e-6)
    grads, ref_grads = parity.grads_of(got, ins, ups), parity.grads_of(want, ref_ins, ups)
    for name in ins:
        parity.assert_close(f"d {name}", grads[name], ref_grads[name], 1e-6)


def test_out_dtype_is_checked():
    with pytest.raises(TypeError, match="out_dtype: expected a floating-point torch.dtype"):
        adaln_modulate(**{k: v for k, v in _good().items() if k != "residual"}, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="copy_dtype: expected a floating-point torch.dtype"):
        adaln_modulate(**{k: v for k, v in _good().items() if k != "residual"}, copy_dtype="bf16")


# ------------------------------------------------------------------------------ copy_dtype
@pytest.mark.parametrize("mode", ["plain", "residual", "return_input"])
@pytest.mark.parametrize("policy", ["auto", "torch"])
def test_copy_dtype_is_out_cast_in_the_same_pass(monkeypatch, mode, policy):
    """copy_dtype also returns out.to(copy_dtype), exactly, in out's layout (outputs start as NaN:
    an element the kernel does not write fails), without a gradient of its own; out, s, x's
    pass-through and every gradient are the reference's, on the kernel and on the fallback."""
    monkeypatch.setenv(runtime.ENV_VAR, policy)
    raw = _return_input_raw()
    if mode == "residual":
        raw["residual"] = torch.randn_like(raw["x"])
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    with parity.poisoned_outputs():
        *got, copy = adaln_modulate(**ins, return_input=mode == "return_input", copy_dtype=torch.float32)
    want = functional.adaln_modulate(**ref_ins)
    want = list(want) if mode == "residual" else [want, ref_ins["x"]] if mode == "return_input" else [want]
    assert copy.dtype == torch.float32 and not copy.requires_grad
    assert torch.equal(copy, got[0].detach().to(torch.float32))
    assert copy.is_contiguous(memory_format=torch.channels_last)
    ups = tuple(torch.randn_like(w) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        parity.assert_close(f"output {i}", g, w, 1e-12)
    grads, ref_grads = parity.grads_of(tuple(got), ins, ups), parity.grads_of(tuple(want), ref_ins, ups)
    for name in ins:
        parity.assert_close(f"d {name}", grads[name], ref_grads[name], 1e-12)


# ------------------------------------------------------------------------------- normalize
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_normalize_returns_out_and_its_statistics(out_dtype):
    """normalize: out as adaln_modulate stores it (bit for bit, NaN-poisoned outputs), with the
    [B, H*W] mean and rstd of x's pixels (whether they remake out is proven where they do: the
    CfC kernel's tests)."""
    raw = _return_input_raw(torch.float32)
    with parity.poisoned_outputs():
        out, mean, rstd = adaln_kernel.normalize(**raw, eps=EPS, out_dtype=out_dtype)
        want = adaln_modulate(**raw, out_dtype=out_dtype)
    assert torch.equal(out, want.detach()) and out.dtype == want.dtype and out.stride() == want.stride()
    b, c, h, w = raw["x"].shape
    spread = raw["x"] - mean.view(b, 1, h, w)
    parity.assert_close("mean", mean, raw["x"].mean(1).flatten(1), 1e-6)
    parity.assert_close("rstd", rstd, spread.square().mean(1).add(EPS).rsqrt().flatten(1), 1e-6)


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
@pytest.mark.parametrize("with_grad_x", [True, False])
@pytest.mark.parametrize("upstreams", [1, 2])
def test_normalize_backward_is_the_references(needs, with_grad_x, upstreams):
    """normalize_backward(grad_outs, grad_x, ...): the gradients of x, scale and shift that the
    reference gives for out's upstream gradient, the sum of grad_outs (two consumers of out:
    summed by the kernel as it loads them, the second in another dtype here), x's own gradient
    grad_x added (x's other consumers: the CfC residual); None where not needed."""
    raw = _return_input_raw()
    _, mean, rstd = adaln_kernel.normalize(**raw, eps=EPS)
    grad_outs = [torch.randn_like(raw["x"]), torch.randn_like(raw["x"]).float()][:upstreams]
    grad_x = torch.randn_like(raw["x"]) if with_grad_x else None
    with parity.poisoned_outputs():
        got = adaln_kernel.normalize_backward(grad_outs, grad_x, raw["x"], mean, rstd, raw["scale"], raw["shift"].dtype,
                                              needs)
    ins = parity.leaves(raw)
    out = functional.adaln_modulate(**ins, eps=EPS)
    grad_out = sum(g.to(out.dtype) for g in grad_outs)
    outputs, ups = (out, ins["x"]) if with_grad_x else (out,), (grad_out, grad_x) if with_grad_x else (grad_out,)
    want = torch.autograd.grad(outputs, [ins["x"], ins["scale"], ins["shift"]], ups)
    for name, g, w, need in zip(("x", "scale", "shift"), got, want, needs):
        if need:
            parity.assert_close(f"d {name}", g, w, 1e-12)
        else:
            assert g is None, name


# ---------------------------------------------------------------------------- return_input
def _return_input_raw(dtype=torch.float64):
    return {"x": torch.randn(2, 5, 4, 3, dtype=dtype, device=DEVICE).to(memory_format=torch.channels_last),
            "scale": torch.randn(2, 5, dtype=dtype, device=DEVICE),
            "shift": torch.randn(2, 5, dtype=dtype, device=DEVICE)}


@pytest.mark.parametrize("used", [(0, 1), (0,), (1,)])
@pytest.mark.parametrize("policy", ["auto", "torch"])
def test_return_input_adds_its_gradient_to_x(monkeypatch, used, policy):
    """return_input=True gives (out, x); x's gradient is out's through the norm plus the one the
    returned x brings (the block's CfC residual), whichever of them reaches the loss."""
    monkeypatch.setenv(runtime.ENV_VAR, policy)
    raw = _return_input_raw()
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    with parity.poisoned_outputs():
        got = adaln_modulate(**ins, return_input=True)
    want = (functional.adaln_modulate(**ref_ins), ref_ins["x"])
    parity.assert_close("out", got[0], want[0], 1e-12)
    assert torch.equal(got[1], ins["x"])
    ups = [torch.randn_like(w) for w in want]
    names = list(ins)
    with parity.poisoned_outputs():
        grads = torch.autograd.grad([got[i] for i in used], [ins[n] for n in names], [ups[i] for i in used],
                                    allow_unused=True)
    ref_grads = torch.autograd.grad([want[i] for i in used], [ref_ins[n] for n in names], [ups[i] for i in used],
                                    allow_unused=True)
    for name, g, w in zip(names, grads, ref_grads):
        if w is None:
            assert g is None or not g.any(), name
        else:
            parity.assert_close(f"d {name}", g, w, 1e-12)


@pytest.mark.slow
def test_return_input_torch_compile_fullgraph():
    def block(x, scale, shift):
        out, x = adaln_modulate(x, scale, shift, return_input=True)
        return out * 2.0 + x

    raw = _return_input_raw(torch.float32)
    compiled = torch.compile(block, fullgraph=True)
    parity.check_op(compiled, lambda x, scale, shift: functional.adaln_modulate(x, scale, shift) * 2.0 + x,
                    raw, TOL[torch.float32])


def test_return_input_needs_no_residual():
    with pytest.raises(ValueError, match="return_input: only without residual"):
        adaln_modulate(**_good(), return_input=True)

"""The Triton modulated SiLU (liquiddiff/kernels/modulated_silu.py) against the reference.

The launchers' value and gradients against functional.modulated_silu and its autograd, with one
shared upstream gradient and NaN-poisoned outputs, in fp32 and fp64, NCHW, channels_last and
channel slices, awkward shapes and backward programs that walk several tiles; then inside
kernels.silu_conv1x1 (where the spatial mix calls it); the same kernel as a gradient sum and as a
cast with pixel sums; gradcheck, opcheck, torch.compile, the runtime selection; the `gpu` tests
check bf16 under autocast at the model's size.
"""
import importlib

import pytest
import torch

import parity
from liquiddiff import functional, kernels
from liquiddiff.kernels import runtime

# The module (the package's attribute of that name is the op).
modulated_silu = importlib.import_module("liquiddiff.kernels.modulated_silu")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("nchw", "channels_last", "slice_nchw", "slice_channels_last")
NEEDS = ("z", "scale", "shift")


def _z(shape, dtype, layout):
    B, C, H, W = shape
    if layout.startswith("slice"):
        wide = torch.randn(B, C + 3, H, W, dtype=dtype, device=DEVICE)
        if layout == "slice_channels_last":
            wide = wide.contiguous(memory_format=torch.channels_last)
        return wide[:, 2:2 + C]
    z = torch.randn(shape, dtype=dtype, device=DEVICE)
    return z.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else z


def _inputs(shape, dtype=torch.float32, layout="channels_last"):
    B, C = shape[:2]
    return {"z": _z(shape, dtype, layout), "scale": 0.5 * torch.randn(B, C, dtype=dtype, device=DEVICE),
            "shift": torch.randn(B, C, dtype=dtype, device=DEVICE)}


def check_launchers(raw: dict, tol: float, needs=(True, True, True)) -> None:
    """forward and backward of the launchers vs the reference and its autograd."""
    ref_ins = parity.leaves(raw)
    ref = functional.modulated_silu(**ref_ins)
    up = torch.randn_like(ref)
    want = parity.grads_of(ref, ref_ins, up)
    with parity.poisoned_outputs():
        out = modulated_silu.forward(raw["z"], raw["scale"], raw["shift"], ref.dtype)
        got = modulated_silu.backward(up, raw["z"], raw["scale"], raw["shift"], needs)
    parity.assert_close("out", out, ref, tol)
    if raw["z"].is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last), "out keeps z's memory format"
    for name, grad, need in zip(NEEDS, got, needs):
        if need:
            parity.assert_close(name, grad, want[name], tol)
        else:
            assert grad is None, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_parity(layout, dtype, tol):
    check_launchers(_inputs((2, 5, 9, 11), dtype, layout), tol)


def test_parity_scale_and_shift_with_their_own_strides():
    # scale contiguous, shift every other column of a wider tensor: each is read through its own
    # strides (elsewhere the two always share theirs).
    raw = _inputs((2, 5, 6, 7), torch.float64)
    raw["shift"] = torch.randn(2, 10, dtype=torch.float64, device=DEVICE)[:, ::2]
    check_launchers(raw, 1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 17), (2, 70, 6, 5), (1, 130, 3, 3), (2, 4, 33, 40)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_parity_awkward_shapes(shape, layout):
    """One pixel, one row, C past a channel block (partial channel tiles), more pixels than a
    tile."""
    check_launchers(_inputs(shape, torch.float64, layout), 1e-12)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_parity_partial_needs(needs):
    check_launchers(_inputs((2, 5, 6, 7), torch.float64), 1e-12, needs)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_programs_walk_several_tiles(monkeypatch, layout):
    """Few programs, each walking several pixel tiles, the last one partial."""
    monkeypatch.setattr(modulated_silu, "_BWD_TILE", 64)
    monkeypatch.setattr(modulated_silu, "_BWD_MIN_PROGRAMS", 2)
    check_launchers(_inputs((1, 4, 13, 19), torch.float64, layout), 1e-12)


def test_nan_and_inf_propagate():
    raw = _inputs((1, 3, 4, 4), torch.float64)
    raw["z"][0, 0, 1, 1] = float("nan")
    raw["z"][0, 1, 2, 2] = float("inf")
    ref = functional.modulated_silu(**raw)
    out = modulated_silu.forward(raw["z"], raw["scale"], raw["shift"], torch.float64)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inside_silu_conv1x1(layout):
    """kernels.silu_conv1x1 with a modulation (the spatial mix's call) runs the kernels: value
    and every gradient against functional.silu_conv1x1."""
    raw = {**_inputs((2, 6, 5, 7), torch.float64, "nchw"), "weight": torch.randn(5, 6, 1, 1, dtype=torch.float64,
                                                                                  device=DEVICE),
           "bias": torch.randn(5, dtype=torch.float64, device=DEVICE)}
    raw["z"] = raw["z"].contiguous(memory_format=layout)
    parity.check_op(kernels.silu_conv1x1, functional.silu_conv1x1, raw, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_public_op(layout):
    """kernels.modulated_silu: the op with autograd, value and every gradient."""
    parity.check_op(kernels.modulated_silu, functional.modulated_silu, _inputs((2, 5, 6, 7), torch.float64, layout),
                    1e-12)


def test_public_op_follows_type_promotion():
    """bf16 z with fp32 scale and shift returns fp32, as the reference does."""
    raw = _inputs((1, 3, 4, 4), torch.float32)
    z = raw["z"].bfloat16()
    assert kernels.modulated_silu(z, raw["scale"], raw["shift"]).dtype == \
        functional.modulated_silu(z, raw["scale"], raw["shift"]).dtype == torch.float32


def test_bad_arguments_are_named():
    raw = _inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="z: expected a 4-D"):
        kernels.modulated_silu(raw["z"][0], raw["scale"], raw["shift"])
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 3\)"):
        kernels.modulated_silu(raw["z"], raw["scale"][:, :2], raw["shift"])
    with pytest.raises(TypeError, match="shift: expected a floating-point"):
        kernels.modulated_silu(raw["z"], raw["scale"], raw["shift"].long())


def test_runs_the_kernels_unless_told_not_to(monkeypatch):
    calls = []
    recompute = importlib.import_module("liquiddiff.kernels.recompute")
    real = recompute.modulated_silu_forward
    monkeypatch.setattr(recompute, "modulated_silu_forward", lambda *a: calls.append(1) or real(*a))
    # The SiLU -> 1x1 conv forward on cuDNN: under auto the Triton pointwise forward runs the
    # modulation in its prologue instead (runtime.FORWARD_ONLY).
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,pointwise_conv=torch")
    raw = {**_inputs((1, 3, 4, 4)), "weight": torch.randn(2, 3, 1, 1, device=DEVICE)}
    kernels.silu_conv1x1(**raw).sum()
    assert runtime.select_backend("modulated_silu", DEVICE).is_triton and len(calls) == 1
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,pointwise_conv=torch,modulated_silu=torch")
    kernels.silu_conv1x1(**raw)
    assert len(calls) == 1


@pytest.mark.parametrize("n_grads", [1, 2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_silu_backward_sums_gradients(n_grads, layout):
    """silu_backward(grads, z): SiLU's backward for the sum of its consumers' gradients, against
    autograd of torch's SiLU; the gradients in other layouts and dtypes than z."""
    z = _z((2, 5, 6, 7), torch.float64, layout)
    grads = [torch.randn(2, 5, 6, 7, dtype=dtype, device=DEVICE) for dtype in (torch.float32, torch.float64,
                                                                               torch.float64)[:n_grads]]
    grads[-1] = grads[-1].contiguous(memory_format=torch.channels_last)
    leaf = z.detach().clone().requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.silu(leaf), leaf, sum(g.double() for g in grads))[0]
    with parity.poisoned_outputs():
        got = modulated_silu.silu_backward(grads, z)
    parity.assert_close("d_z", got, want, 1e-12)


@pytest.mark.parametrize("n_grads", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 130, 33, 40)])
def test_silu_backward_bias_grad(n_grads, layout, shape):
    """silu_backward_bias_grad(grads, z): silu_backward's d_z, and d_z as stored summed over the
    batch and the pixels (the bias gradient of z's conv) in z's dtype. Computed in fp64 (an fp64
    gradient), stored in fp32: the sum is the stored values' (the gap to the unrounded values'
    sum is about 1e-8 here, the tolerance 1e-12)."""
    z = _z(shape, torch.float32, layout)
    grads = [torch.randn(shape, dtype=torch.float64, device=DEVICE) for _ in range(n_grads)]
    with parity.poisoned_outputs():
        d_z, d_bias = modulated_silu.silu_backward_bias_grad(grads, z)
    assert torch.equal(d_z, modulated_silu.silu_backward(grads, z))
    assert d_bias.dtype == torch.float32 and d_bias.shape == (shape[1],)
    parity.assert_close("d_bias", d_bias.double(), d_z.double().sum((0, 2, 3)).float().double(), 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 130, 33, 40)])
def test_cast_with_channel_sum(layout, shape):
    """cast_with_channel_sum(x, dtype): x.to(dtype) exactly, in x's layout, and that copy summed
    over the batch and the pixels (a conv's bias gradient from its rounded upstream) in ``dtype``:
    fp64 to fp32 here, the stored values' sum (about 1e-8 from the unrounded values')."""
    copy, channel_sum = _checked_cast(modulated_silu.cast_with_channel_sum, _z(shape, torch.float64, layout),
                                      torch.float32)
    assert channel_sum.dtype == torch.float32
    parity.assert_close("channel_sum", channel_sum.double(), copy.double().sum((0, 2, 3)).float().double(), 1e-12)


def _checked_cast(cast, x, dtype):
    """``cast(x, dtype)``'s (copy, sums), its outputs NaN-poisoned, the copy checked: exactly
    x.to(dtype), in x's memory format."""
    with parity.poisoned_outputs():
        copy, sums = cast(x, dtype)
    assert torch.equal(copy, x.to(dtype))
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert copy.is_contiguous(memory_format=torch.channels_last)
    return copy, sums


def test_opcheck_silu_backward_bias_grad():
    z = _z((2, 3, 5, 6), torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.liquiddiff.silu_backward_bias_grad.default,
                          ([torch.randn_like(z), torch.randn(2, 3, 5, 6, device=DEVICE)], z))


def test_opcheck_cast_with_channel_sum():
    torch.library.opcheck(torch.ops.liquiddiff.cast_with_channel_sum.default,
                          (_z((2, 3, 5, 6), torch.float64, "channels_last"), torch.float32))


def test_silu_backward_checks_its_gradients():
    z = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="grads: expected one to three"):
        modulated_silu.silu_backward([z] * 4, z)
    with pytest.raises(ValueError, match="grads: expected one to three"):
        modulated_silu.silu_backward_bias_grad([], z)


@pytest.mark.parametrize("n_grads", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sum_gradients_in_one_pass(n_grads, layout):
    """sum_gradients(grads, dtype): the plain sum, in ``dtype`` and the first gradient's memory format;
    the others in other dtypes and layouts, the last a per-channel gradient expanded over the
    pixels (as the spatial mix's pixel sum gives it)."""
    first = _z((2, 5, 6, 7), torch.float64, layout)
    grads = [first, torch.randn(2, 5, 6, 7, dtype=torch.float32, device=DEVICE).contiguous(
        memory_format=torch.channels_last)]
    if n_grads == 3:
        grads.append(torch.randn(2, 5, dtype=torch.float64, device=DEVICE)[:, :, None, None].expand(2, 5, 6, 7))
    with parity.poisoned_outputs():
        got = modulated_silu.sum_gradients(grads, torch.float64)
    assert got.dtype == torch.float64
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    parity.assert_close("sum", got, sum(g.double() for g in grads), 1e-15)
    with pytest.raises(ValueError, match="grads: expected two or three"):
        modulated_silu.sum_gradients(grads[:1], torch.float64)


def test_opcheck_sum_gradients():
    d = torch.randn(2, 3, 5, 6, device=DEVICE)
    per_channel = torch.randn(2, 3, device=DEVICE)[:, :, None, None].expand(2, 3, 5, 6)
    torch.library.opcheck(torch.ops.liquiddiff.gradient_sum.default,
                          ([d, torch.randn_like(d).bfloat16() if DEVICE == "cuda" else d.double(), per_channel],
                           torch.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 130, 33, 40)])
def test_cast_with_pixel_sum(layout, shape):
    """cast_with_pixel_sum(x, dtype): x in ``dtype`` (exactly x.to: fp32 to fp64 here, as the
    interpreter rounds to bf16 toward zero; the gpu test below checks bf16) in x's memory format,
    and x summed over its pixels, in x's dtype; outputs NaN-poisoned."""
    x = _z(shape, torch.float32, layout)
    _, pixel_sum = _checked_cast(modulated_silu.cast_with_pixel_sum, x, torch.float64)
    assert pixel_sum.dtype == torch.float32
    parity.assert_close("pixel_sum", pixel_sum, x.sum((2, 3)), 1e-6)


def test_opcheck_cast_with_pixel_sum():
    torch.library.opcheck(torch.ops.liquiddiff.cast_with_pixel_sum.default,
                          (_z((2, 3, 5, 6), torch.float32, "channels_last"), torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_cast_with_pixel_sum_to_bf16(layout):
    """The spatial mix's fp32 input at the model's size: the bf16 copy bit for bit x.to's."""
    x = _z((8, 64, 256, 256), torch.float32, layout)
    copy, pixel_sum = modulated_silu.cast_with_pixel_sum(x, torch.bfloat16)
    assert torch.equal(copy, x.bfloat16())
    parity.assert_close("pixel_sum", pixel_sum, x.sum((2, 3)), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_bias_gradients_in_bf16(layout):
    """The FeedForward's two bias gradients at the model's size: the fp32 upstream's bf16 copy
    bit for bit x.to's and its sum that copy's; SiLU's backward d_z that of silu_backward, and
    its sum d_z's as stored (bf16), each to bf16's rounding of the result."""
    x = _z((8, 64, 256, 256), torch.float32, layout)
    copy, copy_sum = modulated_silu.cast_with_channel_sum(x, torch.bfloat16)
    assert torch.equal(copy, x.bfloat16()) and copy_sum.dtype == torch.bfloat16
    parity.assert_close("copy_sum", copy_sum.double(), copy.double().sum((0, 2, 3)), 1e-2)
    z = _z((8, 128, 256, 256), torch.bfloat16, layout)
    grad = torch.randn_like(z)
    d_z, d_bias = modulated_silu.silu_backward_bias_grad([grad], z)
    assert torch.equal(d_z, modulated_silu.silu_backward([grad], z))
    parity.assert_close("d_bias", d_bias.double(), d_z.double().sum((0, 2, 3)), 1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 130, 33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_sum(layout, shape, dtype):
    """channel_sum(x, dtype): x summed over the batch and the pixels per channel (a conv's bias
    gradient), in ``dtype``, from any layout; the output NaN-poisoned."""
    x = _z(shape, torch.float32, layout)
    with parity.poisoned_outputs():
        got = modulated_silu.channel_sum(x, dtype)
    assert got.dtype == dtype and got.shape == (shape[1],)
    parity.assert_close("channel_sum", got, x.double().sum((0, 2, 3)).to(dtype), 1e-5)


def test_channel_sum_walks_several_tiles(monkeypatch):
    """Programs that loop over several pixel tiles (a large image) sum them all."""
    monkeypatch.setattr(modulated_silu, "_BWD_TILE", 64)
    monkeypatch.setattr(modulated_silu, "_BWD_MIN_PROGRAMS", 1)
    x = _z((2, 8, 40, 40), torch.float64, "channels_last")
    parity.assert_close("channel_sum", modulated_silu.channel_sum(x, torch.float64), x.sum((0, 2, 3)), 1e-12)


def test_channel_sum_checks_its_input():
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        modulated_silu.channel_sum(torch.randn(3, 4, device=DEVICE), torch.float32)


def test_opcheck_channel_sum():
    torch.library.opcheck(torch.ops.liquiddiff.channel_sum.default,
                          (_z((2, 3, 5, 6), torch.float32, "channels_last"), torch.float64))


@pytest.mark.parametrize("setting, calls", [("auto", 1), ("auto,conv_bias_grad=torch", 0)])
def test_conv_bias_gradient_after_cudnn_is_channel_sum(monkeypatch, setting, calls):
    """A conv left to aten (conv1x1 here) takes its bias gradient from channel_sum where that op
    runs Triton, from aten's convolution_backward otherwise: the same gradients either way."""
    recompute = importlib.import_module("liquiddiff.kernels.recompute")
    seen = []
    real = recompute.channel_sum
    monkeypatch.setattr(recompute, "channel_sum", lambda x, dtype: seen.append(x.shape) or real(x, dtype))
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    ins = {"x": _z((2, 4, 5, 6), torch.float64, "channels_last"),
           "weight": torch.randn(3, 4, 1, 1, dtype=torch.float64, device=DEVICE),
           "bias": torch.randn(3, dtype=torch.float64, device=DEVICE)}
    ref_ins, fused_ins = parity.leaves(ins), parity.leaves(ins)
    ref = functional.conv1x1(**ref_ins)
    up = torch.randn_like(ref)
    want, got = parity.grads_of(ref, ref_ins, up), parity.grads_of(kernels.conv1x1(**fused_ins), fused_ins, up)
    for name in ins:
        parity.assert_close(name, got[name], want[name], 1e-12)
    assert len(seen) == calls


def test_silu_convs_backward_runs_it(monkeypatch):
    """The CfC backbone's SiLU (kernels.silu_convs, heads on cuDNN/aten) takes its three heads'
    gradients through silu_backward, once."""
    calls = []
    recompute = importlib.import_module("liquiddiff.kernels.recompute")
    real = recompute.silu_backward
    monkeypatch.setattr(recompute, "silu_backward", lambda grads, z: calls.append(len(grads)) or real(grads, z))
    z = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    weights = [torch.randn(4, 4, 1, 1, device=DEVICE), torch.randn(4, 1, 3, 3, device=DEVICE),
               torch.randn(4, 1, 3, 3, device=DEVICE)]
    outs = kernels.silu_convs(z, weights, [None] * 3)
    torch.autograd.grad(sum(o.sum() for o in outs), z)
    assert calls == [3]


def test_opcheck_silu_backward():
    z = torch.randn(2, 3, 5, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.liquiddiff.silu_backward_sum.default,
                          ([torch.randn_like(z), torch.randn_like(z).double()], z))


def test_gradcheck_fp64():
    raw = {**_inputs((1, 3, 3, 4), torch.float64), "weight": torch.randn(2, 3, 1, 1, dtype=torch.float64,
                                                                         device=DEVICE)}
    ins = parity.leaves(raw)
    assert torch.autograd.gradcheck(lambda z, s, sh, w: kernels.silu_conv1x1(z, w, None, s, sh),
                                    (ins["z"], ins["scale"], ins["shift"], ins["weight"]))


def test_opcheck_forward():
    raw = _inputs((2, 3, 5, 6))
    torch.library.opcheck(torch.ops.liquiddiff.modulated_silu_forward.default,
                          (raw["z"], raw["scale"], raw["shift"], torch.float32))


@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("param_dtype", [None, torch.float16])
def test_opcheck_backward(needs, param_dtype):
    # scale and shift in a narrower dtype than the fp32 partials: d scale and d shift come back
    # stacked in their dtype, and the fake kernel must say so.
    raw = _inputs((2, 3, 5, 6))
    if param_dtype is not None:
        raw["scale"], raw["shift"] = raw["scale"].to(param_dtype), raw["shift"].to(param_dtype)
    args = (torch.randn_like(raw["z"]), raw["z"], raw["scale"], raw["shift"], needs)
    torch.library.opcheck(torch.ops.liquiddiff.modulated_silu_backward.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Compiled, silu_conv1x1's autograd.Function reaches the kernels as the custom ops."""
    raw = {**_inputs((2, 3, 5, 6)), "weight": torch.randn(4, 3, 1, 1, device=DEVICE)}
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    compiled = torch.compile(lambda z, scale, shift, weight: kernels.silu_conv1x1(z, weight, None, scale, shift),
                             fullgraph=True)
    out, ref = compiled(**ins), functional.silu_conv1x1(ref_ins["z"], ref_ins["weight"], None,
                                                         ref_ins["scale"], ref_ins["shift"])
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    parity.assert_close("out", out, ref, 1e-5)
    for name in ins:
        parity.assert_close(name, got[name], want[name], 1e-5)
    # The public op too.
    ins = parity.leaves(_inputs((2, 3, 5, 6)))
    ref_ins = parity.leaves(ins)
    out, ref = torch.compile(kernels.modulated_silu, fullgraph=True)(**ins), functional.modulated_silu(**ref_ins)
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    parity.assert_close("public op out", out, ref, 1e-5)
    for name in ins:
        parity.assert_close(f"public op {name}", got[name], want[name], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_bf16_at_model_size(layout):
    """bf16 z, scale and shift (the spatial mix under autocast) at [8, 64, 256, 256]: value and
    every gradient against fp64 on the same inputs."""
    raw = {n: t.bfloat16() for n, t in _inputs((8, 64, 256, 256), torch.float32, layout).items()}
    exact_ins = parity.leaves({n: t.double() for n, t in raw.items()})
    ref = functional.modulated_silu(**exact_ins)
    up = torch.randn_like(ref)
    want = parity.grads_of(ref, exact_ins, up)
    out = modulated_silu.forward(raw["z"], raw["scale"], raw["shift"], torch.bfloat16)
    got = modulated_silu.backward(up.bfloat16(), raw["z"], raw["scale"], raw["shift"], (True, True, True))
    parity.assert_close("out", out.double(), ref, 1e-2)
    for name, grad in zip(NEEDS, got):
        assert grad.dtype == torch.bfloat16
        parity.assert_close(name, grad.double(), want[name], 1e-2)

"""Convolutions that keep only their input for backward (kernels/recompute.py): same values and
gradients as the reference."""
import contextlib
import gc
import weakref

import pytest
import torch

from liquiddiff import functional, kernels
from liquiddiff.kernels import recompute
from tests.parity import assert_close, grads_of, leaves, poisoned_outputs, rel_err


def check_parity(op: str, raw: dict, tol: float, layout) -> None:
    """The op vs its reference: value (in the input's layout) and every gradient, one upstream."""
    ins, ref_ins = leaves(raw), leaves(raw)
    out, ref = getattr(kernels, op)(**ins), getattr(functional, op)(**ref_ins)
    up = torch.randn_like(ref)
    assert_close("out", out, ref, tol)
    assert out.is_contiguous(memory_format=layout)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    for name in ins:
        assert_close(name, got[name], want[name], tol)


def autocast_run(op: str, ins: dict, ref_ins: dict):
    """The op and its reference under CPU bf16 autocast, and the activations the op saved."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = getattr(kernels, op)(**ins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = getattr(functional, op)(**ref_ins)
    return out, ref, [t for t in saved if t.dim() == 4 and t.shape[0] == 2]


def _inputs(dtype=torch.float64, layout=torch.contiguous_format, bias=True, modulated=False, ci=6, co=5):
    z = torch.randn(2, ci, 5, 7, dtype=dtype).to(memory_format=layout)
    w = torch.randn(co, ci, 1, 1, dtype=dtype).to(memory_format=layout)
    ins = {"z": z, "weight": w, "bias": torch.randn(co, dtype=dtype) if bias else None}
    if modulated:
        ins.update(scale=torch.randn(2, ci, dtype=dtype), shift=torch.randn(2, ci, dtype=dtype))
    return ins


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias, modulated", [(True, False), (False, False), (True, True), (False, True)])
def test_matches_reference(dtype, tol, layout, bias, modulated):
    check_parity("silu_conv1x1", _inputs(dtype, layout, bias, modulated), tol, layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_matches_reference_with_the_modulation_on_aten(monkeypatch, layout):
    """modulated_silu on its torch backend: the modulation and its gradients (d z, d scale,
    d shift) come from aten ops in this op's backward, a path the default backends never take."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,modulated_silu=torch")
    check_parity("silu_conv1x1", _inputs(torch.float64, layout, True, True), 1e-12, layout)


@pytest.mark.parametrize("modulated", [False, True])
def test_matches_reference_under_autocast(modulated):
    raw = _inputs(torch.float32, torch.channels_last, modulated=modulated)
    # Under autocast activations (and the Linear-made scale/shift) are bf16, parameters fp32.
    for name in ("z", "scale", "shift"):
        if name in raw:
            raw[name] = raw[name].bfloat16()
    ins, ref_ins = leaves(raw), leaves(raw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.silu_conv1x1(**ins)
        ref = functional.silu_conv1x1(**ref_ins)
    assert out.dtype == ref.dtype == torch.bfloat16
    up = torch.randn_like(ref)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    if not modulated:  # the same aten ops in the same dtypes
        assert_close("out", out, ref, 1e-6)
        for name in ins:
            assert got[name].dtype == raw[name].dtype
            assert_close(name, got[name], want[name], 1e-6)
        return
    # Modulated, the Triton kernel computes the modulation and SiLU in fp32 and rounds once,
    # where the reference rounds each bf16 op: against fp64 on the same (rounded) inputs it must
    # be no further off than the reference.
    exact = {n: t.detach().bfloat16().double().requires_grad_() for n, t in raw.items() if t is not None}
    truth = functional.silu_conv1x1(**exact)
    truth_grads = grads_of(truth, exact, up.double())
    for name, value, ref_value, true_value in [("out", out, ref, truth)] + [
            (n, got[n], want[n], truth_grads[n]) for n in ins]:
        assert value.dtype == ref_value.dtype, name
        assert rel_err(value, true_value) <= 1.5 * rel_err(ref_value, true_value) + 1e-6, name


@pytest.mark.parametrize("modulated", [False, True])
def test_gradcheck(modulated):
    ins = leaves(_inputs(modulated=modulated))
    assert torch.autograd.gradcheck(lambda *a: kernels.silu_conv1x1(*a), tuple(ins.values()))


@pytest.mark.parametrize("modulated", [False, True])
def test_keeps_only_its_input(modulated):
    ins = leaves(_inputs(torch.float32, modulated=modulated))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.silu_conv1x1(**ins)
    activation_saves = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
    assert len(activation_saves) == 1 and activation_saves[0] is ins["z"]


def test_bad_arguments_are_named():
    z = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \[Co, 6, 1, 1\]"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 3, 3))
    with pytest.raises(ValueError, match="bias: expected shape"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 1, 1), torch.randn(4))
    with pytest.raises(TypeError, match="z: expected a floating-point"):
        kernels.silu_conv1x1(z.long(), torch.randn(5, 6, 1, 1))
    with pytest.raises(ValueError, match="scale, shift: give both"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 1, 1), scale=torch.randn(2, 6))
    with pytest.raises(ValueError, match="shift: expected shape"):
        kernels.silu_conv1x1(z, torch.randn(5, 6, 1, 1), scale=torch.randn(2, 6), shift=torch.randn(6))


def _depthwise_inputs(dtype=torch.float64, layout=torch.contiguous_format, k=7, c=6):
    return {
        "x": torch.randn(2, c, 9, 8, dtype=dtype).to(memory_format=layout),
        "weight": torch.randn(c, 1, k, k, dtype=dtype),
        "bias": torch.randn(c, dtype=dtype),
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_matches_reference(dtype, tol, layout, k):
    check_parity("depthwise_conv", _depthwise_inputs(dtype, layout, k), tol, layout)


def test_depthwise_keeps_its_fp32_input_under_autocast():
    """The model's case: an fp32 input (kept by the CfC op too) meets a bf16 autocast conv."""
    raw = _depthwise_inputs(torch.float32, torch.channels_last)
    ins, ref_ins = leaves(raw), leaves(raw)
    out, ref, saved = autocast_run("depthwise_conv", ins, ref_ins)
    assert saved == [ins["x"]]
    assert out.dtype == ref.dtype == torch.bfloat16
    up = torch.randn_like(ref)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    assert_close("out", out, ref, 1e-6)
    for name in ins:
        assert_close(name, got[name], want[name], 1e-6)


def _conv1x1_inputs(dtype=torch.float64, layout=torch.contiguous_format):
    raw = _inputs(dtype, layout)
    return {"x": raw.pop("z"), **raw}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv1x1_matches_reference(dtype, tol, layout):
    check_parity("conv1x1", _conv1x1_inputs(dtype, layout), tol, layout)


def test_conv1x1_keeps_its_fp32_input_under_autocast():
    """The FFN's case: its fp32 input (which backward remakes) meets a bf16 autocast conv."""
    raw = _conv1x1_inputs(torch.float32, torch.channels_last)
    ins, ref_ins = leaves(raw), leaves(raw)
    out, ref, saved = autocast_run("conv1x1", ins, ref_ins)
    assert saved == [ins["x"]]
    up = torch.randn_like(ref)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    assert_close("out", out, ref, 1e-6)
    for name in ins:
        assert_close(name, got[name], want[name], 1e-6)
    with pytest.raises(ValueError, match=r"weight: expected shape \[Co, 6, 1, 1\]"):
        kernels.conv1x1(raw["x"], torch.randn(5, 6, 3, 3))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_feedforward_keeps_its_input_and_remakes_the_hidden_tensor(x_dtype):
    """Under autocast, as the fused block calls it (its AdaLN writes x in bf16; fp32 outside a
    block): the FFN keeps x alone, not its hidden tensor (twice as wide), which backward remakes
    from x with the same conv: the output and every gradient are bit for bit those of the two
    convs keeping it (the bias gradients summed by the passes that round their gradients, in the
    order the conv's own reduction sums them)."""
    raw = {"x": torch.randn(2, 6, 5, 7).to(x_dtype, memory_format=torch.channels_last),
           "w1": torch.randn(12, 6, 1, 1), "b1": torch.randn(12), "w2": torch.randn(6, 12, 1, 1),
           "b2": torch.randn(6), "residual": torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)}
    up = torch.randn(2, 6, 5, 7)

    def hidden_kept(x, w1, b1, w2, b2, residual):
        return kernels.silu_conv1x1(kernels.conv1x1(x, w1, b1), w2, b2, residual=residual)

    def run(op):
        ins, saved = leaves(raw), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = op(**ins)
        activations = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
        return ins, out, grads_of(out, ins, up.to(out.dtype)), activations

    ins, out, grads, saved = run(kernels.feedforward)
    _, ref, ref_grads, ref_saved = run(hidden_kept)
    assert [t.shape[1] for t in ref_saved] == [6, 12]
    assert len(saved) == 1 and saved[0] is ins["x"]
    assert torch.equal(out, ref)
    for name in raw:
        assert torch.equal(grads[name], ref_grads[name]), name


def _feedforward_inputs(dtype=torch.float64, layout=torch.channels_last, biases=True, residual=True,
                        residual_dtype=None):
    return {"x": torch.randn(2, 6, 5, 7, dtype=dtype).to(memory_format=layout),
            "w1": torch.randn(12, 6, 1, 1, dtype=dtype), "b1": torch.randn(12, dtype=dtype) if biases else None,
            "w2": torch.randn(5, 12, 1, 1, dtype=dtype), "b2": torch.randn(5, dtype=dtype) if biases else None,
            "residual": torch.randn(2, 5, 5, 7, dtype=residual_dtype or dtype).to(memory_format=layout)
            if residual else None}


@pytest.mark.parametrize("setting", ["auto", "auto,modulated_silu=torch", "auto,conv_bias_grad=torch",
                                     "auto,pointwise_conv=triton"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("biases, residual", [(True, True), (True, False), (False, True)])
def test_feedforward_matches_reference(monkeypatch, setting, dtype, tol, layout, biases, residual):
    """The FeedForward node against functional.feedforward: value and every gradient, on each
    path its backward takes (SiLU's backward and the bias gradients on Triton or aten, the
    second conv on cuDNN or the Triton pointwise kernels)."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    raw = _feedforward_inputs(dtype, layout, biases, residual)
    ins, ref_ins = leaves(raw), leaves(raw)
    absent = {k: None for k, v in raw.items() if v is None}
    with poisoned_outputs():
        out, ref = kernels.feedforward(**ins, **absent), functional.feedforward(**ref_ins, **absent)
    assert out.is_contiguous(memory_format=layout)
    up = torch.randn_like(ref)
    assert_close("out", out, ref, tol)
    with poisoned_outputs():
        got = grads_of(out, ins, up)
    want = grads_of(ref, ref_ins, up)
    for name in ins:
        assert_close(name, got[name], want[name], tol)


@pytest.mark.parametrize("setting, bias_passes", [
    ("auto", ["silu_backward_bias_grad", "cast_with_channel_sum"]),
    ("auto,conv_bias_grad=torch", []),  # aten's convolution_backward sums both
    ("auto,modulated_silu=torch", ["cast_with_channel_sum", "channel_sum"]),  # aten's SiLU backward
])
def test_feedforward_bias_gradients_come_from_its_passes(monkeypatch, setting, bias_passes):
    """Both bias gradients from passes the backward makes anyway: SiLU's backward sums the hidden
    gradient as it writes it, and the cast of the wider upstream (an fp64 residual stream into
    fp32 convs) sums the rounded copy; no channel_sum reads either gradient back."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    passes = []
    for name in ("silu_backward_bias_grad", "cast_with_channel_sum", "channel_sum"):
        real = getattr(recompute, name)
        monkeypatch.setattr(recompute, name, lambda *a, _name=name, _real=real: passes.append(_name) or _real(*a))
    raw = _feedforward_inputs(torch.float32, residual_dtype=torch.float64)
    ins, ref_ins = leaves(raw), leaves(raw)
    out, ref = kernels.feedforward(**ins), functional.feedforward(**ref_ins)
    assert out.dtype == ref.dtype == torch.float64
    up = torch.randn_like(ref)
    got, want = grads_of(out, ins, up), grads_of(ref, ref_ins, up)
    assert sorted(passes) == sorted(bias_passes)
    for name in ins:
        assert_close(name, got[name], want[name], 1e-5)


@pytest.mark.parametrize("wanted", [("x",), ("b1",), ("w2", "b2"), ("residual",), ("w1", "residual")])
def test_feedforward_partial_gradients(wanted):
    """Only some inputs require grad: theirs are the reference's, the others stay None."""
    raw = _feedforward_inputs()
    ins = {k: v.clone().requires_grad_(k in wanted) for k, v in raw.items()}
    ref_ins = {k: v.clone().requires_grad_(k in wanted) for k, v in raw.items()}
    out, ref = kernels.feedforward(**ins), functional.feedforward(**ref_ins)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, [ins[k] for k in wanted], up)
    want = torch.autograd.grad(ref, [ref_ins[k] for k in wanted], up)
    for name, g, w in zip(wanted, got, want):
        assert_close(name, g, w, 1e-12)


@pytest.mark.parametrize("residual", [True, False])
def test_feedforward_gradcheck(residual):
    ins = leaves(_feedforward_inputs(residual=residual, layout=torch.contiguous_format))
    names = [k for k, v in ins.items() if v is not None]
    assert torch.autograd.gradcheck(lambda *a: kernels.feedforward(**dict(zip(names, a))),
                                    tuple(ins[k] for k in names))


def _mix_inputs(dtype=torch.float32):
    return {"x": torch.randn(2, 6, 9, 8, dtype=dtype).to(memory_format=torch.channels_last),
            "weights": [torch.randn(6, 1, k, k, dtype=dtype) for k in (3, 5, 7)],
            "biases": [torch.randn(6, dtype=dtype) for _ in range(3)]}


def _mix_leaves(raw):
    return {"x": raw["x"].clone().requires_grad_(), "weights": [w.clone().requires_grad_() for w in raw["weights"]],
            "biases": [b.clone().requires_grad_() for b in raw["biases"]]}


def _mix_grads(outs, ins, ups):
    flat = [ins["x"], *ins["weights"], *ins["biases"]]
    used = [(o, u) for o, u in zip(outs, ups) if u is not None]
    return torch.autograd.grad([o for o, _ in used], flat, [u for _, u in used])


@pytest.mark.parametrize("setting, one_pass", [
    ("auto,modulated_silu=torch", None),  # a cast and a sum
    ("auto", "cast_with_pixel_sum"),  # the Triton cast with pixel sums, then aten's conv
    ("auto,depthwise_conv=triton", "cast_with_pixel_sum"),  # the same, then the Triton conv
])
def test_spatial_mix_input_keeps_the_autocast_copy_like_the_reference(monkeypatch, setting, one_pass):
    """The spatial mix's input: nothing else keeps it fp32, so backward keeps the bf16 copy (as
    the reference does); the three outputs and every gradient are the reference's. With Triton
    the copy and the pixel sum come out of one pass over x."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    passes = []
    real = recompute.cast_with_pixel_sum
    monkeypatch.setattr(recompute, "cast_with_pixel_sum",
                        lambda *args: passes.append("cast_with_pixel_sum") or real(*args))
    raw = _mix_inputs()
    ins, ref_ins = _mix_leaves(raw), _mix_leaves(raw)
    out, ref, saved = autocast_run("spatial_mix_input", ins, ref_ins)
    assert passes == ([one_pass] if one_pass else [])
    assert len(saved) == 1 and saved[0].dtype == torch.bfloat16 and saved[0].shape == raw["x"].shape
    assert [o.dtype for o in out] == [r.dtype for r in ref] == [torch.bfloat16, torch.float32, torch.float32]
    ups = tuple(torch.randn_like(r) for r in ref)
    # Without Triton, the same aten ops. With it, bf16 rounding apart: the Triton kernel rounds
    # its fp32 sums once where the CPU's bf16 conv may not, and the interpreter rounds fp32 to
    # bf16 toward zero, not to nearest even (a GPU's copy is exact: test_kernel_modulated_silu's
    # gpu test). The fp32 sum: fp32 rounding apart.
    tol = 2e-2 if one_pass else 1e-6
    for name, o, r in zip(("local", "pixel_sum", "x"), out, ref):
        assert_close(name, o, r, 1e-6 if name != "local" else tol)
    for i, (g, w) in enumerate(zip(_mix_grads(out, ins, ups), _mix_grads(ref, ref_ins, ups))):
        assert_close(f"grad {i}", g, w, tol)


@pytest.mark.parametrize("setting", ["auto", "auto,depthwise_conv=triton"])
def test_spatial_mix_input_uses_a_precomputed_copy_and_pixel_sum(monkeypatch, setting):
    """precomputed=(copy, pixel sum) (the CfC kernel's): no pass over x for them, the copy saved
    for backward, and the outputs and every gradient those of the call that makes them."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    passes = []
    real = recompute.cast_with_pixel_sum
    monkeypatch.setattr(recompute, "cast_with_pixel_sum", lambda *args: passes.append(1) or real(*args))
    raw = _mix_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        made = real(raw["x"], torch.bfloat16)
    ins, ref_ins = _mix_leaves(raw), _mix_leaves(raw)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = kernels.spatial_mix_input(**ins, precomputed=made)
    assert passes == [] and any(t is made[0] for t in saved)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = kernels.spatial_mix_input(**ref_ins)
    assert passes == [1]
    ups = tuple(torch.randn_like(r) for r in ref)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    for g, w in zip(_mix_grads(out, ins, ups), _mix_grads(ref, ref_ins, ups)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("precomputed, message", [
    (lambda x: (x.bfloat16(), None), "precomputed: expected"),
    (lambda x: (x[:, :3].bfloat16(), x.sum((2, 3))), r"precomputed\[0\]: expected shape"),
    (lambda x: (x.bfloat16(), x.sum((1, 2))), r"precomputed\[1\]: expected shape"),
])
def test_spatial_mix_input_names_a_bad_precomputed_pair(precomputed, message):
    raw = _mix_inputs()
    with pytest.raises(ValueError, match=message):
        kernels.spatial_mix_input(**raw, precomputed=precomputed(raw["x"]))


@pytest.mark.parametrize("setting", ["auto", "auto,modulated_silu=torch", "auto,depthwise_conv=triton"])
@pytest.mark.parametrize("used", [(0,), (0, 2), (1, 2), (2,), (0, 1, 2)])
def test_spatial_mix_input_sums_the_gradients_of_the_outputs_used(monkeypatch, setting, used):
    """x's gradients from the outputs used: summed by the Triton gradient sum after aten's conv
    (auto), by torch (its fallback), or in the Triton depthwise kernel's epilogue."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    raw = _mix_inputs(torch.float64)
    ins, ref_ins = _mix_leaves(raw), _mix_leaves(raw)
    with poisoned_outputs():
        out, ref = kernels.spatial_mix_input(**ins), functional.spatial_mix_input(**ref_ins)
    ups = tuple(torch.randn_like(r) if i in used else None for i, r in enumerate(ref))
    flat = [ins["x"], *ins["weights"], *ins["biases"]]
    ref_flat = [ref_ins["x"], *ref_ins["weights"], *ref_ins["biases"]]
    with poisoned_outputs():
        got = torch.autograd.grad([out[i] for i in used], flat, [ups[i] for i in used], allow_unused=True)
    want = torch.autograd.grad([ref[i] for i in used], ref_flat, [ups[i] for i in used], allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.any(), f"grad {i}"
        else:
            assert_close(f"grad {i}", g, w, 1e-12)


def test_depthwise_gradcheck():
    ins = leaves(_depthwise_inputs(k=3, c=3))
    assert torch.autograd.gradcheck(kernels.depthwise_conv, tuple(ins.values()))


def test_depthwise_bad_arguments_are_named():
    x = torch.randn(2, 6, 5, 5)
    with pytest.raises(ValueError, match=r"weight: expected shape \[6, 1, k, k\] \(k odd\)"):
        kernels.depthwise_conv(x, torch.randn(6, 1, 4, 4))
    with pytest.raises(ValueError, match=r"weight: expected shape \[6, 1, k, k\]"):
        kernels.depthwise_conv(x, torch.randn(5, 1, 3, 3))
    with pytest.raises(ValueError, match="bias: expected shape"):
        kernels.depthwise_conv(x, torch.randn(6, 1, 3, 3), torch.randn(5))


def _fanout_inputs(dtype=torch.float64, layout=torch.contiguous_format, c=6):
    return {
        "z": torch.randn(2, c, 7, 5, dtype=dtype).to(memory_format=layout),
        "weights": [torch.randn(c, c, 1, 1, dtype=dtype), torch.randn(c, 1, 3, 3, dtype=dtype),
                    torch.randn(c, 1, 3, 3, dtype=dtype)],
        "biases": [torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype), None],
    }


def _fanout_leaves(raw):
    grad = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
    return {"z": grad(raw["z"]), "weights": [grad(w) for w in raw["weights"]],
            "biases": [grad(b) for b in raw["biases"]]}


def _flat(ins):
    return [ins["z"], *ins["weights"], *(b for b in ins["biases"] if b is not None)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("used", [(0, 1, 2), (1,)])
def test_silu_convs_matches_reference(dtype, tol, layout, used):
    raw = _fanout_inputs(dtype, layout)
    ins, ref_ins = _fanout_leaves(raw), _fanout_leaves(raw)
    outs, refs = kernels.silu_convs(**ins), functional.silu_convs(**ref_ins)
    assert len(outs) == 3
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close(f"out {i}", o, r, tol)
        assert o.is_contiguous(memory_format=layout)
    ups = [torch.randn_like(refs[i]) for i in used]
    got = torch.autograd.grad([outs[i] for i in used], _flat(ins), ups, allow_unused=True)
    want = torch.autograd.grad([refs[i] for i in used], _flat(ref_ins), ups, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.any(), i
        else:
            assert_close(f"grad {i}", g, w, tol)


def test_silu_convs_sums_the_heads_on_aten(monkeypatch):
    """modulated_silu on its torch backend: the heads' input gradients are summed by _summed and
    go through aten's SiLU backward, a path the default backends never take."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,modulated_silu=torch")
    raw = _fanout_inputs(torch.float64, torch.channels_last)
    ins, ref_ins = _fanout_leaves(raw), _fanout_leaves(raw)
    outs, refs = kernels.silu_convs(**ins), functional.silu_convs(**ref_ins)
    ups = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, _flat(ins), ups)
    want = torch.autograd.grad(refs, _flat(ref_ins), ups)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"grad {i}", g, w, 1e-12)


def test_silu_convs_under_autocast_keeps_only_z():
    raw = _fanout_inputs(torch.float32, torch.channels_last)
    raw["z"] = raw["z"].bfloat16()
    ins, ref_ins = _fanout_leaves(raw), _fanout_leaves(raw)
    outs, refs, saved = autocast_run("silu_convs", ins, ref_ins)
    assert saved == [ins["z"]]
    ups = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, _flat(ins), ups)
    want = torch.autograd.grad(refs, _flat(ref_ins), ups)
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype == torch.bfloat16
        assert_close("out", o, r, 1e-6)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype
        # dz sums three bf16 conv grads: this op in fp32, autograd in bf16 (bf16 rounding apart).
        assert_close(f"grad {i}", g, w, 1e-2 if i == 0 else 1e-6)


def test_silu_convs_gradcheck():
    ins = _fanout_leaves(_fanout_inputs(c=3))
    n = len(ins["weights"])

    def fn(z, *params):
        return kernels.silu_convs(z, list(params[:n]), [params[n], params[n + 1], None])

    assert torch.autograd.gradcheck(fn, tuple(_flat(ins)))


def test_silu_convs_bad_arguments_are_named():
    z = torch.randn(2, 6, 5, 5)
    with pytest.raises(ValueError, match="weights, biases: expected equally many"):
        kernels.silu_convs(z, [torch.randn(6, 6, 1, 1)], [])
    with pytest.raises(ValueError, match=r"weight: expected shape \[6, 1, k, k\] \(k odd\)"):
        kernels.silu_convs(z, [torch.randn(6, 1, 4, 4)], [None])


def _gated_step(ins: dict, other: torch.Tensor, recompute: bool):
    """sigmoid(other) * silu_conv1x1(z): the product saves the conv output, which
    ``recompute_saved`` replaces by its call; returns the loss and a weak reference to it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = kernels.silu_conv1x1(**ins)
        keep_less = kernels.recompute_saved((g, kernels.silu_conv1x1, tuple(ins.values())))
        with keep_less if recompute else contextlib.nullcontext():
            loss = (torch.sigmoid(other) * g).float().square().sum()
    return loss, weakref.ref(g)


def test_recompute_saved_frees_the_tensor_and_recomputes_it_exactly():
    raw = _inputs(torch.float32, torch.channels_last)
    raw["z"] = raw["z"].bfloat16()
    other = torch.randn(2, 5, 5, 7)
    grads = {}
    for recompute in (False, True):
        ins, other_leaf = leaves(raw), other.clone().requires_grad_(True)
        loss, conv_out = _gated_step(ins, other_leaf, recompute)
        gc.collect()
        # Only the recomputed run lets the conv output go as soon as the forward is done.
        assert (conv_out() is None) == recompute
        # Backward outside autocast, as a trainer runs it: the recipe brings the forward's back.
        grads[recompute] = torch.autograd.grad(loss, [*ins.values(), other_leaf])
    for name, got, want in zip([*raw, "other"], grads[True], grads[False]):
        assert torch.equal(got, want), name


def test_recompute_saved_hands_other_tensors_to_the_enclosing_hooks():
    x = torch.randn(4, 3, requires_grad=True)
    y = x * 2
    packed, unpacked = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: unpacked.append(t) or t):
        with kernels.recompute_saved((y, torch.mul, (x.detach(), 2))):
            out = torch.sigmoid(x) * y  # the product saves sigmoid's output and y (a recipe)
    assert len(packed) == 2 and all(t is not y for t in packed)
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert len(unpacked) == 2
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(dx, s * (1 - s) * 2 * x.detach() + s * 2)


def test_recompute_saved_remakes_a_calls_outputs_by_one_call():
    """A recipe for several outputs of one call (the block's n and its bf16 copy): backward
    unpacks both and runs the call once, each time it runs (a second backward: once more); the
    gradients are those of the tensors kept."""
    x = torch.randn(4, 3, requires_grad=True)
    calls = []

    def both(arg):
        calls.append(1)
        return arg * 2, arg * 3

    def step(recompute: bool):
        a, b = both(x.detach())
        with kernels.recompute_saved(((a, b), both, (x.detach(),))) if recompute else contextlib.nullcontext():
            out = x * a * b  # saves a * b's operands: a and b, each a recipe
        calls.clear()
        grads = [torch.autograd.grad(out.sum(), x, retain_graph=True)[0] for _ in range(2)]
        return grads, list(calls)

    (kept, kept_calls), (remade, remade_calls) = step(False), step(True)
    assert kept_calls == [] and remade_calls == [1, 1]
    for got, want in zip(remade, kept):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["silu_conv1x1", "spatial_mix_input"])
def test_double_backward_raises(op):
    raw = _inputs(torch.float32) if op == "silu_conv1x1" else _mix_inputs()
    ins = leaves(raw) if op == "silu_conv1x1" else _mix_leaves(raw)
    out = getattr(kernels, op)(**ins)
    first = out if op == "silu_conv1x1" else out[0]
    x = ins["z"] if op == "silu_conv1x1" else ins["x"]
    (grad,) = torch.autograd.grad(first.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_recompute_saved_lets_the_recipe_go_with_its_node():
    """The recipe's arguments live as long as the node that saved the recipe, not until Python's
    cycle collector runs: a block's input must not outlive its backward."""
    x = torch.randn(4, 3, requires_grad=True)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        arg = (x * 2).detach()
        y = arg * 3
        with kernels.recompute_saved((y, torch.mul, (arg, 3))):
            out = torch.sigmoid(x) * y
        recipe_arg = weakref.ref(arg)
        del arg, y
        assert recipe_arg() is not None  # the node that saved y keeps its recipe
        out.sum().backward()
        assert recipe_arg() is None
    finally:
        if gc_was_enabled:
            gc.enable()

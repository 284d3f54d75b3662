"""ParallelCfC's branch as one autograd node (kernels/parallel_cfc.py) against
functional.parallel_cfc: value and the gradient of every input (n, residual, a, b, rho, t and the
seven convolutions' weights and biases) for one shared upstream gradient, outputs NaN-poisoned;
both layouts, cuDNN, Triton depthwise and Triton pointwise convolutions, bf16 autocast; what it keeps for backward
and how often it remakes n; gradcheck, torch.compile, the fallback and argument errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from liquiddiff import functional, kernels
from liquiddiff.kernels import runtime

import parity
from benchmarks import cases

LAYOUTS = (torch.contiguous_format, torch.channels_last)


def _raw(dtype=torch.float64, layout=torch.channels_last, shape=(2, 6, 5, 7), residual=True):
    """Inputs by name: n, residual, a, b, rho, t, then <conv>_w and <conv>_b per CFC_CONVS."""
    B, C, H, W = shape
    act = {"n": torch.randn(shape, dtype=dtype).to(memory_format=layout)}
    act["residual"] = torch.randn(shape, dtype=dtype).to(memory_format=layout) if residual else None
    small = {"a": torch.randn(B, C, dtype=dtype), "b": torch.randn(B, C, dtype=dtype),
             "rho": torch.randn(C, dtype=dtype), "t": torch.rand(B, dtype=dtype)}
    convs = {}
    for name in functional.CFC_CONVS:
        k = {"backbone_dw": 7, "g_dw": 3, "h_dw": 3}.get(name)
        w_shape = (C, 1, k, k) if k else (C, C, 1, 1)
        # Scaled so that the activations stay O(1) through the chain (relative errors mean something).
        convs[f"{name}_w"] = torch.randn(w_shape, dtype=dtype) / (k or C ** 0.5)
        convs[f"{name}_b"] = torch.randn(C, dtype=dtype)
    return {**act, **small, **convs}


def _call(op):
    """``op`` with the inputs by name (as parity.check_op passes them)."""
    def call(n, a, b, rho, t, residual=None, **params):
        convs = [(params[f"{name}_w"], params.get(f"{name}_b")) for name in functional.CFC_CONVS]
        return op(n, convs, a, b, rho, t, residual=residual)
    return call


@pytest.fixture(params=["cudnn", "depthwise_conv=triton", "pointwise_conv=triton"])
def conv_kernels(request, monkeypatch):
    """The convolutions on aten (cuDNN on a GPU), or the opt-in Triton depthwise kernels, or the
    opt-in Triton pointwise ones (with the heads + gate forward kernel, cfc_heads.py)."""
    if request.param != "cudnn":
        monkeypatch.setenv("LIQUIDDIFF_KERNELS", f"auto,{request.param}")
    return request.param


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_reference(conv_kernels, layout, dtype, tol):
    out = parity.check_op(_call(kernels.parallel_cfc), _call(functional.parallel_cfc), _raw(dtype, layout), tol)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 9, 2), (1, 40, 4, 3)])
def test_matches_reference_awkward_shapes_without_residual(conv_kernels, shape):
    raw = _raw(torch.float64, torch.channels_last, shape, residual=False)
    parity.check_op(_call(kernels.parallel_cfc), _call(functional.parallel_cfc), raw, 1e-12)


@pytest.mark.parametrize("frozen", ["params", "n", "small", "backbone_pw", "all_but_backbone_dw_b", "backbone_dw_b",
                                    "all_but_g_dw_b"])
def test_partial_gradients(conv_kernels, frozen):
    """Only some inputs require grad (frozen weights, a constant input): the others' gradients
    are still right, and the frozen ones get none. The backbone's and g_dw's cases cover the
    needs of the biases moved on cuDNN (the 7x7's into the 1x1's, the 3x3s' into their SiLU)."""
    raw = _raw()
    keep = {"params": lambda k: not k.endswith(("_w", "_b")), "n": lambda k: k != "n",
            "small": lambda k: k not in ("a", "b", "rho", "t"),
            "backbone_pw": lambda k: not k.startswith("backbone_pw"),
            "all_but_backbone_dw_b": lambda k: k == "backbone_dw_b",
            "backbone_dw_b": lambda k: k != "backbone_dw_b", "all_but_g_dw_b": lambda k: k == "g_dw_b"}[frozen]
    ins = {k: v.clone().requires_grad_(keep(k)) for k, v in raw.items()}
    ref_ins = {k: v.clone().requires_grad_(keep(k)) for k, v in raw.items()}
    out, ref = _call(kernels.parallel_cfc)(**ins), _call(functional.parallel_cfc)(**ref_ins)
    up = torch.randn_like(ref)
    names = [k for k in ins if ins[k].requires_grad]
    got = torch.autograd.grad(out, [ins[k] for k in names], up)
    want = torch.autograd.grad(ref, [ref_ins[k] for k in names], up)
    for name, g, w in zip(names, got, want):
        parity.assert_close(name, g, w, 1e-12)


def _autocast_raw():
    raw = _raw(torch.float32, torch.channels_last, (2, 8, 6, 6))
    # As in the block: n and the residual stream fp32, a and b from autocast's Linear (bf16).
    raw["a"], raw["b"] = raw["a"].bfloat16(), raw["b"].bfloat16()
    return raw


def test_under_autocast_matches_reference_and_keeps_five_activations(conv_kernels):
    """bf16 autocast: the reference's dtypes and (to bf16 rounding) values; saved: n, the 7x7
    output, the backbone pre-activation and the g/h hidden tensors, nothing else of that size."""
    raw = _autocast_raw()
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _call(kernels.parallel_cfc)(**ins)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _call(functional.parallel_cfc)(**ref_ins)
    assert out.dtype == ref.dtype == torch.float32
    activations = [t for t in saved if t.dim() == 4 and t.shape[0] == 2 and t.shape[-1] == 6]
    assert len(activations) == 5
    assert activations[0] is ins["n"]
    assert [t.dtype for t in activations[1:]] == [torch.bfloat16] * 4
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    parity.assert_close("out", out, ref, 2e-2)
    for name in ins:
        parity.assert_close(name, got[name], want[name], 5e-2)


def test_n_is_remade_once():
    """With a recipe for n (the block's AdaLN), backward runs it once, for both of n's consumers."""
    raw = _raw(torch.float32)
    ins = parity.leaves(raw)
    calls = []

    def remake(x):
        calls.append(1)
        return x * 2

    source = ins.pop("n")
    n = remake(source)
    with kernels.recompute_saved((n, remake, (source.detach(),))):
        out = _call(kernels.parallel_cfc)(n=n, **ins)
    calls.clear()
    out.backward(torch.randn_like(out))
    assert len(calls) == 1
    assert source.grad is not None and torch.isfinite(source.grad).all()


@pytest.mark.parametrize("setting", ["auto", "auto,pointwise_conv=triton"])
def test_gradcheck(monkeypatch, setting):
    """Default backends (the Triton CfC kernel), and with the pointwise kernels (the heads + gate
    kernels of cfc_heads.py); the Triton depthwise kernels have their own gradcheck, and under
    the interpreter this one would take minutes with them."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    raw = _raw(torch.float64, torch.channels_last, (1, 2, 4, 3))
    names = list(raw)
    call = _call(kernels.parallel_cfc)
    leaves = [raw[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(lambda *xs: call(**dict(zip(names, xs))), leaves)


@pytest.mark.slow
def test_torch_compile_fullgraph(conv_kernels):
    raw = _raw(torch.float32, torch.channels_last, (2, 4, 6, 5))
    compiled = torch.compile(_call(kernels.parallel_cfc), fullgraph=True)
    parity.check_op(compiled, _call(functional.parallel_cfc), raw, 1e-5)


def test_torch_compile_traces_the_backward_in_its_layout():
    """Dynamo refuses a layout query on a tensor made inside an autograd.Function's backward; it
    then retraces that backward with every incoming gradient made .contiguous() (an NCHW copy of
    a channels_last one) and, in a model under autocast, left the backward's autocast(enabled=
    False) on for the rest of the trace (H100: torch.compile(fused) 170 -> 292 ms a step). The
    compiled backward of the cuDNN path copies nothing."""
    raw = _raw(torch.float32, torch.channels_last, (1, 4, 3, 5))
    leaves = {k: v.requires_grad_() for k, v in raw.items() if v is not None}
    copies = parity.compiled_backward_copies(_call(kernels.parallel_cfc), **leaves)
    assert not copies, copies


def test_runs_the_reference_without_the_triton_cfc_kernel():
    raw = _raw()
    with cases.kernels_setting("cfc_relax=torch"):
        assert not runtime.use_triton("cfc_relax", "cpu")
        parity.check_op(_call(kernels.parallel_cfc), _call(functional.parallel_cfc), raw, 1e-15)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(n=r["n"][0]), "n: expected a 4-D"),
    (lambda r: r.update(residual=r["residual"][:, :3]), "residual: expected shape"),
    (lambda r: r.update(g_dw_w=torch.randn(6, 1, 4, 4, dtype=torch.float64)), r"convs\[3\] \(g_dw\) weight"),
    (lambda r: r.update(f_proj_w=torch.randn(5, 6, 1, 1, dtype=torch.float64)), r"convs\[2\] \(f_proj\) weight"),
    (lambda r: r.update(h_pw_b=torch.randn(5, dtype=torch.float64)), r"convs\[6\] \(h_pw\) bias"),
    (lambda r: r.update(rho=torch.randn(5, dtype=torch.float64)), "rho: expected shape"),
    (lambda r: r.update(t=torch.ones(2, dtype=torch.int64)), "t: expected a floating"),
])
def test_bad_arguments_are_named(change, message):
    raw = _raw()
    change(raw)
    with pytest.raises((ValueError, TypeError), match=message):
        _call(kernels.parallel_cfc)(**raw)


def test_copy_dtype_adds_the_outputs_copy_and_pixel_sum(conv_kernels):
    """copy_dtype: the same output and gradients, the output's copy in that dtype and its pixel
    sum written by the CfC kernel, neither with a gradient of its own; (out, None, None) where
    the CfC heads kernel writes the output (pointwise_conv=triton)."""
    raw = _raw(torch.float32)
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    convs = [(ins[f"{name}_w"], ins[f"{name}_b"]) for name in functional.CFC_CONVS]
    out, copy, pixel_sum = kernels.parallel_cfc(ins["n"], convs, ins["a"], ins["b"], ins["rho"], ins["t"],
                                                residual=ins["residual"], copy_dtype=torch.float16)
    ref = _call(kernels.parallel_cfc)(**ref_ins)
    assert torch.equal(out, ref)
    if conv_kernels == "pointwise_conv=triton":
        assert copy is None and pixel_sum is None
    else:
        assert torch.equal(copy, out.detach().half()) and not copy.requires_grad
        parity.assert_close("pixel sum", pixel_sum, out.detach().sum((2, 3)), 1e-6)
        assert not pixel_sum.requires_grad
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    for name in ins:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("setting, launches", [
    ("auto", (2, 0)),  # runtime.FORWARD_ONLY: the g and h 1x1s on the SiLU -> 1x1 conv forward
    ("auto,modulated_silu=torch", (2, 0)),  # the 3x3 biases in the 3x3s, no modulation
    ("auto,pointwise_conv=torch", (0, 0)),
    ("auto,depthwise_conv=triton", (0, 2)),  # the g and h 3x3s in that forward's prologue too
    ("auto,depthwise_conv=triton,pointwise_conv=torch", (0, 0)),  # the Triton 3x3 pair, then SiLU + cuDNN
])
def test_the_1x1s_run_the_pointwise_forward(monkeypatch, setting, launches):
    """A call autograd does not record (sampling) runs the backbone's 1x1 conv with its SiLU in
    the Triton pointwise forward's epilogue, the g and h heads' SiLU -> 1x1 convs with their SiLU
    and 3x3 bias in its prologue (not the CfC heads kernel: its forward did not beat cuDNN's),
    and with the Triton depthwise kernels their 3x3 convs too; a call with gradient runs the g and
    h heads' forward and the backbone's 1x1 writing z (which backward keeps) with its SiLU (the
    3x3s feed the saved hidden tensors). Both the reference's values."""
    from liquiddiff.kernels import pointwise_conv

    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    names = ("forward", "depthwise_forward", "conv1x1_silu_forward", "conv1x1_and_silu_forward")
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(pointwise_conv, name)
        monkeypatch.setattr(pointwise_conv, name, lambda *a, _real=real, _name=name: calls.update(
            {_name: calls[_name] + 1}) or _real(*a))
    raw = _raw(torch.float64)
    on = launches != (0, 0)  # the pointwise forward on
    with parity.poisoned_outputs(), torch.no_grad():
        out = _call(kernels.parallel_cfc)(**raw)
    assert calls == dict(zip(names, (*launches, int(on), 0)))
    parity.assert_close("out", out, _call(functional.parallel_cfc)(**raw), 1e-12)
    calls.update(dict.fromkeys(names, 0))
    parity.check_op(_call(kernels.parallel_cfc), _call(functional.parallel_cfc), raw, 1e-12)
    assert calls == {"forward": 2 * on, "depthwise_forward": 0, "conv1x1_silu_forward": 0,
                     "conv1x1_and_silu_forward": int(on)}


def _normalized_raw(dtype=torch.float64, shape=(2, 6, 5, 7)):
    """Inputs by name for normalized_parallel_cfc: u, scale, shift, then _raw's without n and residual."""
    raw = _raw(dtype, torch.channels_last, shape)
    del raw["n"]
    B, C = shape[:2]
    return {"u": raw.pop("residual"), "scale": torch.randn(B, C, dtype=dtype), "shift": torch.randn(B, C, dtype=dtype),
            **raw}


def _normalized_call(op, copy_dtype=torch.float32):
    """normalized_parallel_cfc's output, or the composed reference's, from inputs by name."""
    def call(u, scale, shift, a, b, rho, t, **params):
        convs = [(params[f"{name}_w"], params.get(f"{name}_b")) for name in functional.CFC_CONVS]
        if op is None:  # the reference: AdaLN, then the branch with u as its residual
            n = functional.adaln_modulate(u, scale, shift, eps=1e-6)
            return functional.parallel_cfc(n, convs, a, b, rho, t, residual=u)
        return op(u, scale, shift, 1e-6, convs, a, b, rho, t, copy_dtype)[0]
    return call


@pytest.mark.parametrize("conv_kernels", ["cudnn", "depthwise_conv=triton"], indirect=True)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_normalized_matches_adaln_then_the_branch(conv_kernels, dtype, tol):
    """normalized_parallel_cfc against functional.adaln_modulate then functional.parallel_cfc
    with u as the residual: the value and the gradient of u, scale, shift, a, b, rho, t and every
    conv parameter, for one shared upstream gradient, outputs NaN-poisoned."""
    out = parity.check_op(_normalized_call(kernels.normalized_parallel_cfc), _normalized_call(None),
                          _normalized_raw(dtype), tol)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("frozen", [("u",), ("scale", "shift"), ("u", "scale", "shift")])
def test_normalized_partial_gradients(frozen):
    """u or the modulation constant: the other inputs' gradients are still the reference's and
    the constant ones get none (n's gradient is still needed for the weights upstream of it)."""
    raw = _normalized_raw()
    ins = {k: v.clone().requires_grad_(k not in frozen) for k, v in raw.items()}
    ref_ins = {k: v.clone().requires_grad_(k not in frozen) for k, v in raw.items()}
    out, ref = _normalized_call(kernels.normalized_parallel_cfc)(**ins), _normalized_call(None)(**ref_ins)
    up = torch.randn_like(ref)
    trainable = [k for k in ins if k not in frozen]
    got = torch.autograd.grad(out, [ins[k] for k in trainable], up)
    want = torch.autograd.grad(ref, [ref_ins[k] for k in trainable], up)
    for name, g, w in zip(trainable, got, want):
        parity.assert_close(name, g, w, 1e-12)
    assert all(ins[k].grad is None for k in frozen)


def test_normalized_gradcheck():
    raw = _normalized_raw(shape=(1, 2, 4, 3))
    names = list(raw)
    call = _normalized_call(kernels.normalized_parallel_cfc, copy_dtype=torch.float64)
    leaves = [raw[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(lambda *xs: call(**dict(zip(names, xs))), leaves)


def test_normalized_arguments_are_checked(monkeypatch):
    raw = _normalized_raw(torch.float32)
    convs = [(raw[f"{name}_w"], raw[f"{name}_b"]) for name in functional.CFC_CONVS]
    small = [raw[k] for k in ("a", "b", "rho", "t")]

    def call(scale=raw["scale"], eps=1e-6, copy_dtype=torch.float16, u=raw["u"]):
        return kernels.normalized_parallel_cfc(u, scale, raw["shift"], eps, convs, *small, copy_dtype)

    with pytest.raises(ValueError, match="u: expected a 4-D"):
        call(u=raw["u"][0])

    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 6\)"):
        call(scale=raw["scale"][:, :3])
    with pytest.raises(ValueError, match="eps: expected a positive finite float"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="copy_dtype: expected a floating torch.dtype"):
        call(copy_dtype=None)
    runs = kernels.normalized_parallel_cfc_runs
    assert runs(raw["u"], raw["scale"], raw["shift"], convs)
    # n in bf16, the convs in fp32: n's one fp32 copy would not be rounded to bf16 as n is
    assert not runs(raw["u"].bfloat16(), raw["scale"].bfloat16(), raw["shift"].bfloat16(), convs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the convs in bf16 too
        assert runs(raw["u"].bfloat16(), raw["scale"].bfloat16(), raw["shift"].bfloat16(), convs)
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,pointwise_conv=triton")  # the CfC heads kernel reads n
    assert not runs(raw["u"], raw["scale"], raw["shift"], convs)
    with pytest.raises(ValueError, match="u: normalized_parallel_cfc needs the Triton CfC and AdaLN kernels"):
        call()


def test_copy_dtype_is_checked():
    raw = _raw()
    convs = [(raw[f"{name}_w"], raw[f"{name}_b"]) for name in functional.CFC_CONVS]
    with pytest.raises(ValueError, match="copy_dtype: expected a floating torch.dtype"):
        kernels.parallel_cfc(raw["n"], convs, raw["a"], raw["b"], raw["rho"], raw["t"], copy_dtype=torch.int8)


def test_n_conv_is_checked():
    raw = _raw()
    convs = [(raw[f"{name}_w"], raw[f"{name}_b"]) for name in functional.CFC_CONVS]
    with pytest.raises(ValueError, match="n_conv: expected a float tensor of n's shape"):
        kernels.parallel_cfc(raw["n"], convs, raw["a"], raw["b"], raw["rho"], raw["t"], n_conv=raw["n"][:, :3])


def test_convs_are_counted():
    raw = _raw()
    convs = [(raw[f"{name}_w"], raw[f"{name}_b"]) for name in functional.CFC_CONVS][:6]
    with pytest.raises(ValueError, match="convs: expected 7"):
        kernels.parallel_cfc(raw["n"], convs, raw["a"], raw["b"], raw["rho"], raw["t"])


class _Casts(TorchDispatchMode):
    """Records the storage of each tensor cast to bf16."""

    def __init__(self):
        super().__init__()
        self.sources = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.sources.add(args[0].data_ptr())
        return func(*args, **kwargs)


def test_backward_casts_no_parameter(conv_kernels):
    """The forward casts each weight and bias to the conv dtype once and keeps the copy: the
    backward launches no cast of its own for them (a launch each, 13 per block)."""
    raw = _autocast_raw()
    ins = parity.leaves(raw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(kernels.parallel_cfc)(**ins)
    casts = _Casts()
    with casts:
        out.backward(torch.randn_like(out))
    params = {ins[f"{name}_{p}"].data_ptr() for name in functional.CFC_CONVS for p in "wb"}
    assert not params & casts.sources
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in ins.values())


@pytest.mark.parametrize("setting, sums", [
    ("auto", {"silu_backward_bias_grad": 1, "channel_sum": 3}),  # the backbone 1x1's with d_z
    ("auto,conv_bias_grad=torch", {"silu_backward_bias_grad": 0, "channel_sum": 0}),  # aten's
])
def test_backbone_bias_gradient_comes_from_silus_backward(monkeypatch, setting, sums):
    """The backbone's 1x1 bias gradient (and the folded 7x7 bias's, made from it) is summed by
    the SiLU backward pass that writes d_z, not by a channel_sum of d_z: three channel sums
    left (the f, g and h heads' 1x1 biases), and the gradients are the reference's."""
    from liquiddiff.kernels import recompute

    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    calls = {name: 0 for name in sums}
    for name in sums:
        real = getattr(recompute, name)
        monkeypatch.setattr(recompute, name, lambda *a, _real=real, _name=name: calls.update(
            {_name: calls[_name] + 1}) or _real(*a))
    parity.check_op(_call(kernels.parallel_cfc), _call(functional.parallel_cfc), _raw(torch.float32), 1e-5)
    assert calls == sums


def test_double_backward_raises():
    """The backward launches Triton kernels: a gradient of a gradient must fail loudly, not come
    back without its second-order terms."""
    ins = parity.leaves(_raw(torch.float32))
    out = _call(kernels.parallel_cfc)(**ins)
    (grad_n,) = torch.autograd.grad(out.square().sum(), ins["n"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_n.sum().backward()

"""The Triton depthwise convolution (liquiddiff/kernels/depthwise.py) against the reference.

It runs inside the recompute ops (kernels.depthwise_conv, kernels.silu_convs) when the
``depthwise_conv`` backend is Triton (opt-in). Value and every gradient vs
functional.depthwise_conv / silu_convs with one shared upstream gradient, outputs NaN-poisoned;
kernel sizes, layouts, awkward shapes; gradcheck; opcheck on the custom ops; the opt-in
selection. Without CUDA the kernels run under the Triton interpreter; the `gpu` tests check bf16
under autocast at the model's size.
"""
import pytest
import torch

from liquiddiff import functional, kernels
from liquiddiff.kernels import depthwise, runtime

import parity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = (torch.contiguous_format, torch.channels_last)


@pytest.fixture
def triton_dw(monkeypatch):
    """The depthwise convolutions run the Triton kernels (or the test fails: never cuDNN)."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,depthwise_conv=triton")
    assert runtime.select_backend("depthwise_conv", DEVICE).is_triton


def _inputs(shape, k, dtype=torch.float32, layout=torch.channels_last, bias=True):
    B, C, H, W = shape
    return {
        "x": torch.randn(shape, dtype=dtype, device=DEVICE).to(memory_format=layout),
        "weight": torch.randn(C, 1, k, k, dtype=dtype, device=DEVICE),
        "bias": torch.randn(C, dtype=dtype, device=DEVICE) if bias else None,
    }


def check_parity(raw: dict, tol: float, layout) -> None:
    out = parity.check_op(kernels.depthwise_conv, functional.depthwise_conv, raw, tol)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_parity(triton_dw, k, layout, dtype, tol):
    check_parity(_inputs((2, 5, 9, 11), k, dtype, layout), tol, layout)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 17), (2, 4, 13, 1), (1, 70, 6, 5), (1, 2, 16, 24)])
def test_parity_awkward_shapes(triton_dw, shape):
    """Single pixels, rows and columns; C past one channel block (64); tiles that divide evenly."""
    check_parity(_inputs(shape, 7), 1e-5, torch.channels_last)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_tiles_across_the_image(triton_dw, monkeypatch, k):
    """Small tiles (4 rows, 4 columns): tiles inside the image, on its edges and partly outside
    it, so every tap's halo and the masks of the last tiles are exercised."""
    monkeypatch.setattr(depthwise, "_FWD_TILE_H", 4)
    monkeypatch.setattr(depthwise, "_FWD_TILE_W", 4)
    check_parity(_inputs((1, 2, 9, 7), k, torch.float64), 1e-12, torch.channels_last)


@pytest.mark.parametrize("bias", [False, True])
def test_weight_gradient_rows_loop(triton_dw, monkeypatch, bias):
    """Fewer, longer weight-gradient programs (each walks several rows, a partial last chunk)."""
    monkeypatch.setattr(depthwise, "_WGRAD_MIN_PROGRAMS", 3)
    check_parity(_inputs((2, 6, 23, 10), 3, bias=bias), 1e-5, torch.channels_last)


def test_inf_beyond_the_edge_stays_out(triton_dw, monkeypatch):
    """An inf in the last row and column meets only the taps that read it, as in the reference,
    also in weight-gradient lanes past the image (5 of 8 columns, a row chunk past the end)."""
    monkeypatch.setattr(depthwise, "_WGRAD_MIN_PROGRAMS", 2)
    raw = _inputs((1, 2, 5, 5), 3, torch.float64)
    raw["x"][0, 0, 4, 4] = float("inf")
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    up = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE)
    got = parity.grads_of(kernels.depthwise_conv(**ins), ins, up)
    want = parity.grads_of(functional.depthwise_conv(**ref_ins), ref_ins, up)
    for name in ins:
        same_nonfinite = torch.equal(got[name].isfinite(), want[name].isfinite())
        assert same_nonfinite, name
        torch.testing.assert_close(got[name].nan_to_num(posinf=0, neginf=0), want[name].nan_to_num(posinf=0, neginf=0))


def _same_nonfinite(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), name
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], msg=name)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("where", ["x", "upstream"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_reach_only_the_outputs_they_feed(triton_dw, k, where, bad):
    """A NaN or inf in one pixel, of the input or of the upstream gradient, makes exactly the
    outputs and gradients non-finite that the reference's does: the sliding window's slots that
    a row does not feed meet it with weight 0, and 0 * NaN must not reach them."""
    raw = _inputs((1, 2, 12, 5), k, torch.float64)
    up = torch.randn(1, 2, 12, 5, dtype=torch.float64, device=DEVICE)
    (raw["x"] if where == "x" else up)[0, 0, 6, 2] = bad
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    out, ref = kernels.depthwise_conv(**ins), functional.depthwise_conv(**ref_ins)
    _same_nonfinite(out, ref, "out")
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    for name in ins:
        _same_nonfinite(got[name], want[name], name)


def test_nan_in_the_paired_heads_reaches_only_the_outputs_it_feeds(triton_dw):
    """The g/h pair (one launch each way: PAIR_OUT forward, PAIR_IN input gradient)."""
    z, weights, biases = _silu_convs_inputs(torch.float64, torch.channels_last)
    z[1, 2, 3, 4] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (z, weights[1], weights[2])]
    ref_leaves = [t.clone().requires_grad_() for t in (z, weights[1], weights[2])]
    outs = kernels.silu_convs(leaves[0], [weights[0], *leaves[1:]], biases)[1:]
    refs = functional.silu_convs(ref_leaves[0], [weights[0], *ref_leaves[1:]], biases)[1:]
    ups = [torch.randn_like(r) for r in refs]
    for i, (o, r) in enumerate(zip(outs, refs)):
        _same_nonfinite(o, r, f"out {i + 1}")
    got, want = torch.autograd.grad(outs, leaves, ups), torch.autograd.grad(refs, ref_leaves, ups)
    for name, g, w in zip(("z", "g weight", "h weight"), got, want):
        _same_nonfinite(g, w, name)


def _silu_convs_inputs(dtype, layout, g_bias=True, h_bias=False):
    """z and the CfC's three heads over it: f (1x1, cuDNN/aten), g and h (3x3 depthwise)."""
    z = torch.randn(2, 6, 7, 9, dtype=dtype, device=DEVICE).to(memory_format=layout)
    weights = [torch.randn(6, 6, 1, 1, dtype=dtype, device=DEVICE), torch.randn(6, 1, 3, 3, dtype=dtype, device=DEVICE),
               torch.randn(6, 1, 3, 3, dtype=dtype, device=DEVICE)]
    biases = [torch.randn(6, dtype=dtype, device=DEVICE) if use else None for use in (True, g_bias, h_bias)]
    return z, weights, biases


def check_silu_convs(z, weights, biases, tol, used=(0, 1, 2), z_grad=True):
    """kernels.silu_convs vs functional.silu_convs: the ``used`` outputs, with shared upstream
    gradients, and the gradient of every input that requires grad."""
    params = [t for t in (*weights, *biases) if t is not None]
    leaves = [z.clone().requires_grad_(z_grad), *(t.clone().requires_grad_() for t in params)]
    ref_leaves = [z.clone().requires_grad_(z_grad), *(t.clone().requires_grad_() for t in params)]

    def run(op, ls):
        it = iter(ls[1:])
        ws = [next(it) for _ in weights]
        return op(ls[0], ws, [None if b is None else next(it) for b in biases])

    with parity.poisoned_outputs():
        outs, refs = run(kernels.silu_convs, leaves), run(functional.silu_convs, ref_leaves)
        ups = [torch.randn_like(refs[i]) for i in used]
        wrt = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad([outs[i] for i in used], wrt, ups, allow_unused=True)
        want = torch.autograd.grad([refs[i] for i in used], [t for t in ref_leaves if t.requires_grad], ups,
                                   allow_unused=True)
    for i in used:
        parity.assert_close(f"out {i}", outs[i], refs[i], tol)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.any(), f"grad {i}: expected none"
        else:
            parity.assert_close(f"grad {i}", g, w, tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_silu_convs_depthwise_heads(triton_dw, layout, dtype, tol):
    """The CfC's f head (1x1, cuDNN/aten) and g/h depthwise heads (one Triton launch each way,
    whose input gradient adds f's and applies SiLU's backward) over one SiLU."""
    z, weights, biases = _silu_convs_inputs(dtype, layout)
    check_silu_convs(z, weights, biases, tol)


@pytest.mark.parametrize("used, z_grad, bias", [
    ((0, 2), True, (True, True)),  # g unused: h alone in the Triton launch
    ((1, 2), True, (False, True)),  # f unused: no addend, bias on the second head only
    ((0, 1, 2), False, (True, True)),  # z frozen: the weight gradients alone
])
def test_silu_convs_heads_partly_used(triton_dw, used, z_grad, bias):
    z, weights, biases = _silu_convs_inputs(torch.float64, torch.channels_last, *bias)
    check_silu_convs(z, weights, biases, 1e-12, used, z_grad)


def test_silu_convs_pairs_g_and_h(triton_dw, monkeypatch):
    """g and h take one launch each way (forward, input gradient, weight gradient)."""
    launches = []
    for name in ("_convolve", "_weight_grads"):
        real = getattr(depthwise, name)
        monkeypatch.setattr(depthwise, name, lambda *a, _real=real, _name=name, **kw:
                            launches.append((_name, len(a[0]))) or _real(*a, **kw))
    z, weights, biases = _silu_convs_inputs(torch.float32, torch.channels_last)
    check_silu_convs(z, weights, biases, 1e-5)
    # _convolve's first argument: the inputs (1 in forward, 2 summed in backward); the weight
    # gradient's: the grad_outs, one per head.
    assert launches == [("_convolve", 1), ("_convolve", 2), ("_weight_grads", 2)]


def test_multiscale_spatial_mix(triton_dw):
    """The spatial mix's input stage on the kernels: the merged 3x3 + 5x5 + 7x7 conv against the
    three-branch form, every branch's gradient, and x's three gradients (conv, pixel sum,
    residual) summed in the input gradient's epilogue."""
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last)
    params = [torch.randn(4, 1, k, k, dtype=torch.float64, device=DEVICE) for k in (3, 5, 7)]
    params += [torch.randn(4, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    ref_leaves = [t.clone().requires_grad_() for t in [x, *params]]

    def reference(x, weights, biases):
        return functional.multiscale_depthwise_conv_branches(x, weights, biases), x.sum((2, 3)), x

    with parity.poisoned_outputs():
        out = kernels.spatial_mix_input(leaves[0], leaves[1:4], leaves[4:])
        ref = reference(ref_leaves[0], ref_leaves[1:4], ref_leaves[4:])
        ups = [torch.randn_like(r) for r in ref]
        got, want = torch.autograd.grad(out, leaves, ups), torch.autograd.grad(ref, ref_leaves, ups)
    for name, o, r in zip(("local", "pixel_sum", "x"), out, ref):
        parity.assert_close(name, o, r, 1e-12)
    for i, (g, w) in enumerate(zip(got, want)):
        parity.assert_close(f"grad {i}", g, w, 1e-12)


def test_gradcheck_fp64(triton_dw):
    ins = parity.leaves(_inputs((1, 2, 4, 5), 3, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: kernels.depthwise_conv(*a), tuple(ins.values()), fast_mode=True)


@pytest.mark.parametrize("biases", [(False,), (True,), (True, False), (False, True)])
def test_opcheck_forward(biases):
    ins = _inputs((2, 3, 5, 6), 5)
    weights = [torch.randn_like(ins["weight"]) for _ in biases]
    bias_list = [torch.randn_like(ins["bias"]) if use else None for use in biases]
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_conv_forward.default,
                          (ins["x"], weights, bias_list, torch.float32))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, True, False], [False, False, True]])
def test_opcheck_backward(heads, needs):
    ins = _inputs((2, 3, 5, 6), 3)
    grads = [torch.randn_like(ins["x"]) for _ in range(heads)]
    weights = [torch.randn_like(ins["weight"]) for _ in range(heads)]
    x = ins["x"]
    # (silu_input, addend, channel_addend): the g/h pair's epilogue, or the spatial mix input's.
    epilogue = ((torch.randn_like(x), torch.randn_like(x), None) if heads == 2
                else (None, torch.randn_like(x, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)))
    args = (grads, ins["x"], weights, torch.float32, needs, *epilogue)
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_conv_backward.default, args)


def test_heads_are_checked():
    ins = _inputs((1, 2, 4, 4), 3)
    with pytest.raises(ValueError, match="weights: expected one or two"):
        depthwise.forward(ins["x"], [ins["weight"]] * 3, [None] * 3, torch.float32)
    with pytest.raises(ValueError, match="weights: expected one or two"):
        depthwise.forward(ins["x"], [ins["weight"], torch.randn(2, 1, 5, 5)], [None] * 2, torch.float32)
    with pytest.raises(ValueError, match="grad_outs: expected one per weight"):
        depthwise.backward([ins["x"]], ins["x"], [ins["weight"]] * 2, torch.float32, [True, True, True])


@pytest.mark.slow
def test_torch_compile_fullgraph(triton_dw):
    """Compiled, the recompute op's autograd.Function reaches the kernels as the custom ops."""
    raw = _inputs((2, 3, 6, 5), 3)
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    compiled = torch.compile(lambda x, weight, bias: kernels.depthwise_conv(x, weight, bias), fullgraph=True)
    out, ref = compiled(**ins), functional.depthwise_conv(**ref_ins)
    up = torch.randn_like(ref)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    parity.assert_close("out", out, ref, 1e-5)
    for name in ins:
        parity.assert_close(name, got[name], want[name], 1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_heads(triton_dw):
    """Compiled, the g/h pair reaches its kernels as the list-taking custom ops."""
    z, weights, biases = _silu_convs_inputs(torch.float32, torch.channels_last)
    compiled = torch.compile(lambda *a: kernels.silu_convs(a[0], a[1:4], a[4:]), fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (z, *weights, biases[0], biases[1])]
    ref_leaves = [t.clone().requires_grad_() for t in leaves]
    outs = compiled(*leaves, None)
    refs = functional.silu_convs(ref_leaves[0], ref_leaves[1:4], [*ref_leaves[4:], None])
    ups = [torch.randn_like(r) for r in refs]
    got, want = torch.autograd.grad(outs, leaves, ups), torch.autograd.grad(refs, ref_leaves, ups)
    for i, (o, r) in enumerate(zip((*outs, *got), (*refs, *want))):
        parity.assert_close(f"output/grad {i}", o, r, 1e-5)


def test_opt_in(monkeypatch):
    """cuDNN by default (no warning), the kernels when named; the global 'triton' turns them on."""
    calls = []
    monkeypatch.setattr(depthwise, "forward", lambda *a: calls.append(a) or torch.zeros(1))
    ins = _inputs((1, 2, 4, 4), 3)
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto")
    backend = runtime.select_backend("depthwise_conv", DEVICE)
    assert not backend.is_triton and "opt-in" in backend.reason
    kernels.depthwise_conv(**ins)
    assert not calls
    for setting in ("auto,depthwise_conv=triton", "triton"):
        monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
        kernels.depthwise_conv(**ins)
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_parity_bf16_autocast(triton_dw, k, layout):
    """At the model's size under bf16 autocast (fp32 parameters, an fp32 input rounded in
    registers): value and every gradient against fp64 on the same rounded inputs."""
    raw = _inputs((8, 64, 256, 256), k, torch.float32, layout)
    ins = parity.leaves(raw)
    rounded = {n: t.detach().bfloat16().double().requires_grad_() for n, t in raw.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernels.depthwise_conv(**ins)
    ref = functional.depthwise_conv(**rounded)
    assert out.dtype == torch.bfloat16
    up = torch.randn_like(out)
    got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, rounded, up.double())
    parity.assert_close("out", out.double(), ref, 1e-2)
    for name in ins:
        parity.assert_close(name, got[name].double(), want[name], 1e-2)


@pytest.mark.gpu
def test_gpu_silu_convs_pair_bf16_autocast(triton_dw):
    """The CfC heads at the model's size under bf16 autocast (a bf16 backbone z, fp32 weights):
    the g/h pair's outputs and every gradient against fp64 on the same rounded inputs."""
    z = torch.randn(8, 64, 256, 256, device=DEVICE).bfloat16().contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(64, 64, 1, 1, device=DEVICE) / 8] + [torch.randn(64, 1, 3, 3, device=DEVICE) / 3
                                                                for _ in range(2)]
    biases = [torch.randn(64, device=DEVICE) for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in (z, *weights, *biases)]
    rounded = [t.detach().bfloat16().double().requires_grad_() for t in (z, *weights, *biases)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = kernels.silu_convs(leaves[0], leaves[1:4], leaves[4:])
    refs = functional.silu_convs(rounded[0], rounded[1:4], rounded[4:])
    ups = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, ups)
    want = torch.autograd.grad(refs, rounded, [u.double() for u in ups])
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == torch.bfloat16
        parity.assert_close(f"out {i}", o.double(), r, 1e-2)
    for i, (g, w) in enumerate(zip(got, want)):
        parity.assert_close(f"grad {i}", g.double(), w, 1e-2)

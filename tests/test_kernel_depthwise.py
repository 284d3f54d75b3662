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
    ins, ref_ins = parity.leaves(raw), parity.leaves(raw)
    with parity.poisoned_outputs():
        out = kernels.depthwise_conv(**ins)
        ref = functional.depthwise_conv(**ref_ins)
        up = torch.randn_like(ref)
        got, want = parity.grads_of(out, ins, up), parity.grads_of(ref, ref_ins, up)
    parity.assert_close("out", out, ref, tol)
    assert out.is_contiguous(memory_format=layout)
    for name in ins:
        parity.assert_close(name, got[name], want[name], tol)


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
def test_sliding_window_across_strips(triton_dw, monkeypatch, k):
    """Small strips (4 rows, 4 columns): every strip starts and ends inside the image, the last
    ones partly outside, so the window's halo rows and the slot reuse are all exercised."""
    monkeypatch.setattr(depthwise, "_FWD_ROWS", 4)
    monkeypatch.setattr(depthwise, "_FWD_BLOCK_W", 4)
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


def test_silu_convs_depthwise_heads(triton_dw):
    """The CfC's f (1x1, cuDNN/aten) and g/h depthwise heads (Triton) over one SiLU."""
    z = torch.randn(2, 6, 7, 9, device=DEVICE).to(memory_format=torch.channels_last)
    weights = [torch.randn(6, 6, 1, 1, device=DEVICE), torch.randn(6, 1, 3, 3, device=DEVICE),
               torch.randn(6, 1, 3, 3, device=DEVICE)]
    biases = [torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE), None]
    leaves = [t.clone().requires_grad_() for t in [z, *weights, *biases[:2]]]
    ref_leaves = [t.clone().requires_grad_() for t in [z, *weights, *biases[:2]]]

    def run(op, ls):
        return op(ls[0], ls[1:4], [ls[4], ls[5], None])

    with parity.poisoned_outputs():
        outs, refs = run(kernels.silu_convs, leaves), run(functional.silu_convs, ref_leaves)
        ups = [torch.randn_like(r) for r in refs]
        got = torch.autograd.grad(outs, leaves, ups)
        want = torch.autograd.grad(refs, ref_leaves, ups)
    for i, (o, r) in enumerate(zip(outs, refs)):
        parity.assert_close(f"out {i}", o, r, 1e-5)
    for i, (g, w) in enumerate(zip(got, want)):
        parity.assert_close(f"grad {i}", g, w, 1e-5)


def test_multiscale_spatial_mix(triton_dw):
    """The spatial mix's merged 3x3 + 5x5 + 7x7 conv on the kernels: every branch's gradient."""
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=DEVICE).to(memory_format=torch.channels_last)
    params = [torch.randn(4, 1, k, k, dtype=torch.float64, device=DEVICE) for k in (3, 5, 7)]
    params += [torch.randn(4, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in [x, *params]]
    ref_leaves = [t.clone().requires_grad_() for t in [x, *params]]
    with parity.poisoned_outputs():
        out = kernels.multiscale_depthwise_conv(leaves[0], leaves[1:4], leaves[4:])
        ref = functional.multiscale_depthwise_conv_branches(ref_leaves[0], ref_leaves[1:4], ref_leaves[4:])
        up = torch.randn_like(ref)
        got, want = torch.autograd.grad(out, leaves, up), torch.autograd.grad(ref, ref_leaves, up)
    parity.assert_close("out", out, ref, 1e-12)
    for i, (g, w) in enumerate(zip(got, want)):
        parity.assert_close(f"grad {i}", g, w, 1e-12)


def test_gradcheck_fp64(triton_dw):
    ins = parity.leaves(_inputs((1, 2, 4, 5), 3, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: kernels.depthwise_conv(*a), tuple(ins.values()), fast_mode=True)


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_forward(bias):
    ins = _inputs((2, 3, 5, 6), 5, bias=bias)
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_conv_forward.default,
                          (ins["x"], ins["weight"], ins["bias"], torch.float32))


@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, True, False], [False, False, True]])
def test_opcheck_backward(needs):
    ins = _inputs((2, 3, 5, 6), 3)
    args = (torch.randn_like(ins["x"]), ins["x"], ins["weight"], torch.float32, needs)
    torch.library.opcheck(torch.ops.liquiddiff.depthwise_conv_backward.default, args)


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

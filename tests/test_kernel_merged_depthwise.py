"""The Triton merge of the spatial mix's depthwise kernels (liquiddiff/kernels/merged_depthwise.py)
against functional.merged_depthwise_weight: bitwise value and gradients (one shared upstream,
outputs NaN-poisoned) for several branch sets, dtypes and weight layouts; NaN propagation,
errors, the runtime switch, gradcheck, opcheck, torch.compile; bf16 on the GPU."""
import pytest
import torch

import parity
from liquiddiff import functional, kernels
from liquiddiff.kernels import merged_depthwise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _branches(sizes, channels=5, dtype=torch.float32, channels_last=False):
    weights = [torch.randn(channels, 1, k, k, dtype=dtype, device=DEVICE) for k in sizes]
    if channels_last:
        weights = [w.contiguous(memory_format=torch.channels_last) for w in weights]
    return weights, [torch.randn(channels, dtype=dtype, device=DEVICE) for _ in sizes]


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check_bitwise(weights, biases):
    """The op's (weight, bias) and every branch gradient equal the reference's exactly."""
    ins, ref_ins = _leaves(weights + biases), _leaves(weights + biases)
    n = len(weights)
    with parity.poisoned_outputs():
        out = kernels.merged_depthwise_weight(ins[:n], ins[n:])
        ref = functional.merged_depthwise_weight(ref_ins[:n], ref_ins[n:])
        ups = tuple(torch.randn_like(r) for r in ref)
        got = torch.autograd.grad(out, ins, ups)
        want = torch.autograd.grad(ref, ref_ins, ups)
    assert out[0].grad_fn is not None and "Merge" in type(out[0].grad_fn).__name__  # the kernel ran
    for name, g, w in [("weight", out[0], ref[0]), ("bias", out[1], ref[1]), *zip(map(str, range(2 * n)), got, want)]:
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), (name, parity.rel_err(g, w))


@pytest.mark.parametrize("sizes", [(3, 5, 7), (7, 3), (3, 3), (1, 5), (3, 5, 7, 9)])
# fp16: the kernel computes in fp32 and must round after each add as the reference's fp16 adds do
# (in fp32 and fp64 the compute dtype is the result dtype, where that rounding is invisible).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_bitwise_equal_to_reference(sizes, dtype):
    _check_bitwise(*_branches(sizes, dtype=dtype))


@pytest.mark.parametrize("channels", [1, 33, 70])
def test_channels_last_weights_and_channel_tails(channels):
    """The model's weights after .to(channels_last), and channel counts that leave a partial block."""
    _check_bitwise(*_branches((3, 5, 7), channels=channels, channels_last=True))


def test_nan_in_a_branch_shows_in_the_merged_kernel():
    weights, biases = _branches((3, 5, 7))
    weights[0][2, 0, 1, 1] = float("nan")
    biases[1][4] = float("inf")
    weight, bias = kernels.merged_depthwise_weight(weights, biases)
    assert torch.isnan(weight[2, 0, 3, 3]) and torch.isinf(bias[4])
    assert torch.isfinite(weight[[0, 1, 3, 4]]).all() and torch.isfinite(weight[2, 0, 0]).all()


def test_one_branch_is_returned_as_is_and_many_run_the_reference():
    weights, biases = _branches((5,))
    assert kernels.merged_depthwise_weight(weights, biases) == (weights[0], biases[0])
    weights, biases = _branches((1, 3, 3, 5, 7))  # more than MAX_BRANCHES
    assert len(weights) > merged_depthwise.MAX_BRANCHES
    out, ref = kernels.merged_depthwise_weight(weights, biases), functional.merged_depthwise_weight(weights, biases)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_branches_without_biases_merge_to_no_bias():
    weights, _ = _branches((3, 5, 7))
    weight, bias = kernels.merged_depthwise_weight(weights, [None] * 3)
    assert bias is None and torch.equal(weight, functional.merged_depthwise_weight(weights, [None] * 3)[0])


def test_bad_arguments_are_named():
    weights, biases = _branches((3, 5))
    with pytest.raises(ValueError, match="weights, biases"):
        kernels.merged_depthwise_weight(weights, biases[:1])
    with pytest.raises(TypeError, match=r"biases\[0\]: expected a torch.Tensor"):  # all biases or none
        kernels.merged_depthwise_weight(weights, [None, biases[1]])
    with pytest.raises(ValueError, match=r"weights\[1\].*k odd"):
        kernels.merged_depthwise_weight([weights[0], torch.randn(5, 1, 4, 4, device=DEVICE)], biases)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        kernels.merged_depthwise_weight([weights[0], torch.randn(6, 1, 5, 5, device=DEVICE)], biases)
    with pytest.raises(ValueError, match=r"biases\[0\]"):
        kernels.merged_depthwise_weight(weights, [torch.randn(4, device=DEVICE), biases[1]])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        kernels.merged_depthwise_weight([weights[0].long(), weights[1]], biases)


def test_runs_the_kernel_unless_told_not_to(monkeypatch):
    weights, biases = _branches((3, 5))
    weights = _leaves(weights)
    assert "Merge" in type(kernels.merged_depthwise_weight(weights, biases)[0].grad_fn).__name__
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "auto,merged_depthwise_weight=torch")
    assert "Merge" not in type(kernels.merged_depthwise_weight(weights, biases)[0].grad_fn).__name__


def test_parameters_skip_the_dispatcher_and_fake_ones_take_it(monkeypatch):
    """The model merges its Parameters: eager, they take the autograd.Function, as plain tensors
    do (through the custom op's dispatch the call took twice the host time); a Parameter made
    under FakeTensorMode is a fake tensor, and a real one under it (a model built outside, as the
    memory benchmarks run it) is faked by the mode: both need the custom op's fake kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dispatched = []
    real = merged_depthwise._forward_op
    monkeypatch.setattr(merged_depthwise, "_forward_op", lambda *a: dispatched.append(1) or real(*a))
    weights, biases = _branches((3, 5, 7))
    params = [torch.nn.Parameter(t) for t in weights + biases]
    out = kernels.merged_depthwise_weight(params[:3], params[3:])
    assert dispatched == [] and "Merge" in type(out[0].grad_fn).__name__
    assert torch.equal(out[0], functional.merged_depthwise_weight(weights, biases)[0])
    with FakeTensorMode():
        fake = [torch.nn.Parameter(torch.randn(5, 1, k, k, device=DEVICE)) for k in (3, 5, 7)]
        fake_out = kernels.merged_depthwise_weight(fake, [torch.nn.Parameter(torch.randn(5, device=DEVICE))] * 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        faked_out = kernels.merged_depthwise_weight(params[:3], params[3:])
    assert dispatched == [1, 1] and fake_out[0].shape == faked_out[0].shape == (5, 1, 7, 7)


def test_gradcheck_fp64():
    weights, biases = _branches((3, 5, 7), channels=3, dtype=torch.float64)
    ins = _leaves(weights + biases)
    assert torch.autograd.gradcheck(lambda *t: kernels.merged_depthwise_weight(t[:3], t[3:]), tuple(ins))


def test_opcheck():
    weights, biases = _branches((3, 5, 7), channels_last=True)
    torch.library.opcheck(torch.ops.liquiddiff.merged_depthwise_weight.default, (weights, biases))
    d_weight, d_bias = torch.randn(5, 1, 7, 7, device=DEVICE), torch.randn(5, device=DEVICE)
    torch.library.opcheck(torch.ops.liquiddiff.merged_depthwise_weight_backward.default,
                          (d_weight, d_bias, weights, biases))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    weights, biases = _branches((3, 5, 7))
    ins, ref_ins = _leaves(weights + biases), _leaves(weights + biases)
    out = torch.compile(lambda *t: kernels.merged_depthwise_weight(t[:3], t[3:]), fullgraph=True)(*ins)
    ref = functional.merged_depthwise_weight(ref_ins[:3], ref_ins[3:])
    ups = tuple(torch.randn_like(r) for r in ref)
    for g, w in zip(torch.autograd.grad(out, ins, ups), torch.autograd.grad(ref, ref_ins, ups)):
        assert torch.equal(g, w)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.gpu
def test_gpu_bf16_bitwise():
    """bf16 branches (a model cast to bf16) at the largest preset's width: each add rounds to
    bf16, as the reference's."""
    _check_bitwise(*_branches((3, 5, 7), channels=768, dtype=torch.bfloat16, channels_last=True))

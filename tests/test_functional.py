"""The reference ops: gradients (float64 gradcheck), dtype rules, and the merged depthwise conv."""
import pytest
import torch

from liquiddiff import functional as F_ref


def _cfc_inputs(B=2, C=3, H=4, W=5, dtype=torch.float64, residual=True):
    act = lambda: torch.randn(B, C, H, W, dtype=dtype, requires_grad=True)  # noqa: E731
    vec = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    t = torch.rand(B, dtype=dtype).add_(0.05).requires_grad_(True)
    ins = [act(), act(), act(), act(), vec(B, C), vec(B, C), vec(C), t]
    return ins + ([act()] if residual else [None])


@pytest.mark.parametrize("residual", [False, True])
def test_cfc_relax_gradcheck(residual):
    ins = _cfc_inputs(residual=residual)
    fn = lambda *a: F_ref.cfc_relax(*a[:8], residual=a[8] if residual else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(i for i in ins if i is not None))


@pytest.mark.parametrize("residual", [False, True])
def test_adaln_modulate_gradcheck(residual):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    if residual:
        r = torch.randn_like(x, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *a: F_ref.adaln_modulate(a[0], a[1], a[2], residual=a[3]), (x, scale, shift, r))
    else:
        assert torch.autograd.gradcheck(lambda *a: F_ref.adaln_modulate(*a), (x, scale, shift))


def test_adaln_normalises_each_pixel():
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64) * 5 + 3
    zeros = torch.zeros(2, 16, dtype=torch.float64)
    out = F_ref.adaln_modulate(x, zeros, zeros)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 3, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(2, 3, 3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_adaln_residual_returns_the_sum():
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    scale, shift = torch.randn(2, 4), torch.randn(2, 4)
    out, s = F_ref.adaln_modulate(x, scale, shift, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F_ref.adaln_modulate(x + r, scale, shift))


def test_dtype_promotion_follows_torch():
    f, g, h, x = (torch.randn(2, 3, 4, 4, dtype=torch.bfloat16) for _ in range(4))
    a, b = torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3, dtype=torch.bfloat16)
    out = F_ref.cfc_relax(f, g, h, x, a, b, torch.randn(3), torch.rand(2))
    assert out.dtype == torch.float32  # fp32 rho and t promote, as under autocast
    y, s = F_ref.adaln_modulate(x, a, b, residual=torch.randn(2, 3, 4, 4))
    assert y.dtype == torch.float32 and s.dtype == torch.float32


def test_relaxation_weight_limits():
    rho = torch.randn(5)
    assert torch.equal(F_ref.relaxation_weight(rho, torch.zeros(3)), torch.ones(3, 5))
    alpha = F_ref.relaxation_weight(rho, torch.ones(2))
    assert ((alpha > 0) & (alpha < 1)).all()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_merged_multiscale_conv_equals_branches(memory_format):
    C = 6
    x = torch.randn(2, C, 9, 11, dtype=torch.float64).to(memory_format=memory_format).requires_grad_(True)
    weights = [torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5, 7)]
    biases = [torch.randn(C, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    merged = F_ref.multiscale_depthwise_conv(x, weights, biases)
    branches = F_ref.multiscale_depthwise_conv_branches(x, weights, biases)
    torch.testing.assert_close(merged, branches)
    up = torch.randn_like(merged)
    g1 = torch.autograd.grad(merged, [x, *weights, *biases], up)
    g2 = torch.autograd.grad(branches, [x, *weights, *biases], up)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)

"""Every conv op that takes a bias reads it through its stride: a bias that is a view (every
other element of a longer tensor) gives exactly what its contiguous copy gives, value and
gradients, with every Triton kernel on (the opt-in depthwise and pointwise ones included, where
the bias is read in a kernel; elsewhere torch reads it).
"""
import pytest
import torch

from liquiddiff import kernels

C, DT = 5, torch.float64


def _randn(*shape):
    return torch.randn(*shape, dtype=DT)


def _depthwise_conv(x, biases):
    return kernels.depthwise_conv(x, _randn(C, 1, 7, 7), biases[0])


def _silu_convs(x, biases):
    weights = [_randn(C, C, 1, 1), _randn(C, 1, 3, 3), _randn(C, 1, 3, 3)]
    return sum(out.sum() for out in kernels.silu_convs(x, weights, biases[:3]))


def _silu_conv1x1(x, biases):
    return kernels.silu_conv1x1(x, _randn(C, C, 1, 1), biases[0], scale=_randn(2, C), shift=_randn(2, C))


def _spatial_mix_input(x, biases):
    return kernels.spatial_mix_input(x, [_randn(C, 1, 7, 7)], biases[:1])[0]


def _parallel_cfc(x, biases):
    kernel_sizes = (7, 1, 1, 3, 1, 3, 1)  # functional.CFC_CONVS
    convs = [(_randn(C, 1 if k > 1 else C, k, k) / C, bias) for k, bias in zip(kernel_sizes, biases)]
    return kernels.parallel_cfc(x, convs, _randn(2, C), _randn(2, C), _randn(C), torch.rand(2, dtype=DT))


@pytest.mark.parametrize("op", [_depthwise_conv, _silu_convs, _silu_conv1x1, _spatial_mix_input, _parallel_cfc],
                         ids=lambda op: op.__name__.strip("_"))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_strided_bias_gives_what_its_contiguous_copy_gives(monkeypatch, op, layout):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    x = _randn(2, C, 6, 5).contiguous(memory_format=layout)
    wide = [_randn(2 * C).requires_grad_() for _ in range(7)]
    dense = [w[::2].detach().clone().requires_grad_() for w in wide]
    outs = []
    for biases in ([w[::2] for w in wide], dense):
        torch.manual_seed(0)  # the same weights for both calls
        outs.append(op(x, biases))
    strided_out, dense_out = outs
    assert torch.equal(strided_out, dense_out)
    upstream = torch.randn_like(dense_out)
    strided_out.backward(upstream)
    dense_out.backward(upstream)
    used = [(w, d) for w, d in zip(wide, dense) if d.grad is not None]
    assert used
    for w, d in used:
        assert torch.equal(w.grad[::2], d.grad) and not w.grad[1::2].any()

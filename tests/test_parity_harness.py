"""The parity harness itself: poisoned outputs and the guards around them catch what they claim."""
import functools
import types

import pytest
import torch

from liquiddiff.kernels import _tensors, runtime
from tests import parity, strict_interpreter


@pytest.mark.parametrize("past", ["end", "start"])
def test_a_store_past_a_buffer_fails_the_check(past):
    with pytest.raises(AssertionError, match=f"stored 3 elements {'after' if past == 'end' else 'before'} a buffer"):
        with parity.poisoned_outputs():
            out = _tensors.empty_activation(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
                                            torch.float32)
            assert out.isnan().all() and out.is_contiguous(memory_format=torch.channels_last)
            # What a kernel with a loose mask does: three elements just outside the buffer.
            offset = out.storage_offset() + (out.numel() if past == "end" else -3)
            out.as_strided((3,), (1,), offset).fill_(1.0)


def test_untouched_guards_pass_and_poisoning_ends():
    with parity.poisoned_outputs():
        buf = _tensors.empty_buffer((4, 6), torch.float64, torch.device("cpu"))
        buf.fill_(2.0)
    assert not _tensors.poison_outputs and not _tensors.guarded
    assert not _tensors.empty_buffer((4, 6), torch.float64, torch.device("cpu")).storage_offset()


@functools.cache
def _kernels() -> types.SimpleNamespace:
    """Small kernels that each do one thing the strict interpreter must see (or let pass)."""
    import triton
    import triton.language as tl

    @triton.jit
    def masked_copy(x_ptr, y_ptr, n, OTHER: tl.constexpr, BLOCK: tl.constexpr):
        # A masked load, `other` given or not, stored to every lane.
        lanes = tl.arange(0, BLOCK)
        if OTHER:
            v = tl.load(x_ptr + lanes, mask=lanes < n, other=0.0)
        else:
            v = tl.load(x_ptr + lanes, mask=lanes < n)
        tl.store(y_ptr + lanes, v)

    @triton.jit
    def reaching_copy(x_ptr, y_ptr, n, load_reach, store_reach, BLOCK: tl.constexpr):
        # Loads and stores `reach` lanes past n, the loaded ones thrown away: right values,
        # wrong accesses.
        lanes = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + lanes, mask=lanes < n + load_reach, other=0.0)
        tl.store(y_ptr + lanes, tl.where(lanes < n, v, 0.0), mask=lanes < n + store_reach)

    @triton.jit
    def neighbour_sum(x_ptr, y_ptr, SHARED: tl.constexpr):
        # Program p stores y[p] = x[p] + x[p + 1] (x has one more element): programs share
        # inputs only. SHARED 1: each also stores y[0]; SHARED 2: each loads y[p - 1] first.
        p = tl.program_id(0)
        v = tl.load(x_ptr + p) + tl.load(x_ptr + p + 1)
        if SHARED == 2:
            v += tl.load(y_ptr + tl.maximum(p - 1, 0)) * 0.0
        tl.store(y_ptr + p, v)
        if SHARED == 1:
            tl.store(y_ptr, v)

    @triton.jit
    def square(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # y = x @ x for a [BLOCK, BLOCK] x: a dot whose K is BLOCK.
        at = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        x = tl.load(x_ptr + at)
        tl.store(y_ptr + at, tl.dot(x, x, input_precision="ieee"))

    @triton.jit
    def cast_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        # x cast to y's dtype.
        lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + lanes, mask=lanes < n, other=0.0)
        tl.store(y_ptr + lanes, v.to(y_ptr.dtype.element_ty), mask=lanes < n)

    @triton.jit
    def product(y_ptr, n, m, WIDE: tl.constexpr):
        # n * m in int32, or in int64 (WIDE).
        if WIDE:
            n = n.to(tl.int64)
        tl.store(y_ptr, (n * m).to(tl.float64))

    @triton.jit
    def narrow(y_ptr, n):
        # An int64 n cast to int32.
        tl.store(y_ptr, n.to(tl.int32).to(tl.float64))

    @triton.jit
    def program_ids(ids_ptr, grid_ptr):
        # Program (i, j) of an [n0, n1] grid stores i * n1 + j at [i, j], and n0 * n1 beside it.
        at = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(ids_ptr + at, at.to(tl.float32))
        tl.store(grid_ptr + at, (tl.num_programs(0) * tl.num_programs(1)).to(tl.float32))

    return types.SimpleNamespace(masked_copy=masked_copy, reaching_copy=reaching_copy, neighbour_sum=neighbour_sum,
                                 square=square, cast_copy=cast_copy, product=product, narrow=narrow,
                                 program_ids=program_ids)


strict = pytest.mark.skipif(not (runtime.interpreter_enabled() and strict_interpreter.supported()),
                            reason="the interpreter made strict (tests/strict_interpreter.py) only")


@strict
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_lanes_without_other_read_nan_under_the_interpreter(dtype):
    # What a GPU leaves undefined must not read as the interpreter's zeros, or a kernel that
    # sums those lanes passes here.
    x = torch.randn(5, dtype=dtype)
    y, y_other = torch.empty(8, dtype=dtype), torch.empty(8, dtype=dtype)
    _kernels().masked_copy[(1,)](x, y, 5, OTHER=False, BLOCK=8)
    _kernels().masked_copy[(1,)](x, y_other, 5, OTHER=True, BLOCK=8)
    assert torch.equal(y[:5], x) and y[5:].isnan().all(), y
    assert torch.equal(y_other[:5], x) and (y_other[5:] == 0).all(), y_other


@strict
def test_kernels_round_to_bf16_as_torch_does_under_the_interpreter():
    # A GPU rounds to nearest even, the plain interpreter toward zero. Exact ties (both ways of
    # breaking them), the largest finite floats (they round to inf), subnormals, inf and NaN.
    bits = torch.randint(0, 2**31 - 1, (4096,), dtype=torch.int64)
    bits[:1024] = (bits[:1024] & ~0xFFFF) | 0x8000
    x = bits.to(torch.int32).view(torch.float32) * torch.where(torch.rand(4096) < 0.5, -1.0, 1.0)
    x[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4028235e38, 1e-40, -3e-39])
    y = torch.empty(4096, dtype=torch.bfloat16)
    _kernels().cast_copy[(4,)](x, y, 4096, BLOCK=1024)
    want = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert same.all(), f"{int((~same).sum())} of 4096 differ, e.g. {x[~same][:3].tolist()}"


@strict
def test_an_access_outside_the_launchs_tensors_fails_under_the_interpreter():
    # What compute-sanitizer alone sees on a GPU when the values are discarded: an access just
    # past a view (here slices of larger tensors, so the memory is there).
    x, y = torch.randn(16), torch.zeros(16)
    _kernels().reaching_copy[(1,)](x[:8], y[:8], 8, 0, 0, BLOCK=16)
    assert torch.equal(y[:8], x[:8])
    # Past one view but inside another tensor of the launch, which holds it, is in bounds.
    z = torch.randn(16)
    _kernels().reaching_copy[(1,)](z[4:12], z, 8, 1, 0, BLOCK=16)
    with pytest.raises(Exception, match="reaching_copy: a load of 1 elements outside every tensor"):
        _kernels().reaching_copy[(1,)](x[:8], y[:8], 8, 1, 0, BLOCK=16)
    with pytest.raises(Exception, match="reaching_copy: a store of 2 elements outside every tensor"):
        _kernels().reaching_copy[(1,)](x[:8], y[:8], 8, 0, 2, BLOCK=16)


@strict
def test_programs_sharing_an_element_one_of_them_stores_fail_under_the_interpreter():
    # Programs run one after another here and in any order on a GPU: a kernel whose result
    # depends on that order must fail on the CPU.
    x, y = torch.randn(5), torch.full((4,), float("nan"))
    _kernels().neighbour_sum[(4,)](x, y, SHARED=0)
    assert torch.equal(y, x[:-1] + x[1:])
    with pytest.raises(Exception, match="neighbour_sum: 1 elements stored by more than one program"):
        _kernels().neighbour_sum[(4,)](x, y, SHARED=1)
    with pytest.raises(Exception, match="neighbour_sum: 3 elements stored by one program and loaded by another"):
        _kernels().neighbour_sum[(4,)](x, y, SHARED=2)


@strict
def test_a_dot_smaller_than_a_gpu_compiles_fails_under_the_interpreter():
    # Triton 3.6 compiles no tl.dot with K < 16 for an NVIDIA GPU; the interpreter ran any.
    x = torch.randn(16, 16)  # fp32: Triton 3.4's interpreter has no fp64 dot
    y = torch.empty_like(x)
    _kernels().square[(1,)](x, y, BLOCK=16)
    torch.testing.assert_close(y, x @ x)
    with pytest.raises(Exception, match="K >= 16"):
        _kernels().square[(1,)](x[:8, :8].contiguous(), y[:8, :8].contiguous(), BLOCK=8)


@strict
def test_int32_arithmetic_that_wraps_on_a_gpu_fails_under_the_interpreter():
    # An offset past 2**31 elements computed in int32 wraps on a GPU and addresses another place.
    y = torch.empty(1, dtype=torch.float64)
    _kernels().product[(1,)](y, 2**15, 2**15, WIDE=False)
    assert y.item() == 2**30
    _kernels().product[(1,)](y, 2**16, 2**15, WIDE=True)
    assert y.item() == 2**31
    with pytest.raises(Exception, match="product: mul of 1 elements does not fit int32"):
        _kernels().product[(1,)](y, 2**16, 2**15, WIDE=False)
    with pytest.raises(Exception, match="narrow: a cast of 1 elements does not fit int32"):
        _kernels().narrow[(1,)](y, 2**33)


@strict
def test_a_grid_a_gpu_refuses_fails_under_the_interpreter():
    ids = torch.empty(65536)
    with strict_interpreter.corner_programs():  # two of them: enough to show the launch is taken
        _kernels().program_ids[(1, 65535)](ids, ids.clone())
    with pytest.raises(Exception, match=r"program_ids: grid \(1, 65536\); a GPU takes at most"):
        _kernels().program_ids[(1, 65536)](ids, ids.clone())


@strict
def test_corner_programs_run_the_ends_of_every_axis_with_their_real_ids():
    ids, grid = torch.full((5, 3), float("nan")), torch.full((5, 3), float("nan"))
    with strict_interpreter.corner_programs():
        _kernels().program_ids[(5, 3)](ids, grid)
    ran = ~ids.isnan()
    assert ran.nonzero().tolist() == [[0, 0], [0, 2], [4, 0], [4, 2]]
    assert torch.equal(ids[ran], torch.tensor([0.0, 2.0, 12.0, 14.0])) and (grid[ran] == 15).all()
    _kernels().program_ids[(5, 3)](ids, grid)  # outside it, every program
    assert torch.equal(ids.flatten(), torch.arange(15.0)) and (grid == 15).all()

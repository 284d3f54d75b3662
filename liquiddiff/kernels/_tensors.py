"""Argument checks, dtype rules and layout helpers shared by the kernel launchers.

Every check runs before any launch and names the argument that is wrong.
"""
from __future__ import annotations

import functools
import inspect

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton missing: the launchers are never reached (runtime.select_backend)
    triton = tl = None


# Compile options every launch passes. FMA contraction on, as the kernels were validated: Triton
# 3.9 warns at the first compile when it is left to its default, and 3.10 turns that default off.
# (The interpreter drops launch options it does not know.)
COMPILE_OPTIONS = {"enable_fp_fusion": True}


# Launch-grid arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr-function objects in recent Triton, whose calls cost microseconds of host time each
# (a tenth of an eager CfC call's Python overhead, benchmarks/host_overhead.py).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def launches_on_input_device(launcher):
    """Run an op's launcher with the current CUDA device set to its first input's.

    Triton launches on the current device (and its current stream), not on the device of the
    pointers it is given: a model on cuda:1 in a process whose current device is cuda:0 would
    hand device-1 memory to kernels running on device 0. The first argument is a tensor or a
    sequence of tensors (the op's inputs share one device, checked before). Costs nothing when
    the device is already current: no context switch, as in every single-GPU or torchrun run.
    """

    @functools.wraps(launcher)
    def on_input_device(first, *args, **kwargs):
        t = first[0] if isinstance(first, (list, tuple)) else first
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    # torch.library.custom_op reads the signature and evaluates string annotations in the
    # function's module: give it the launcher's, already evaluated there.
    on_input_device.__signature__ = inspect.signature(launcher, eval_str=True)
    return on_input_device


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_activation(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """A [B, C, H, W] floating tensor, with the shape and device of ``like`` when given."""
    check_floating(name, t)
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D [B, C, H, W] tensor, got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(t.shape)}")
        check_device(name, t, like.device)


def check_vector(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """A small floating parameter tensor ([B, C], [C] or [B]) of exactly ``shape``."""
    check_floating(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    check_device(name, t, device)


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def result_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """PyTorch's type promotion over the given tensors, as the reference applies it."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def compute_dtype(*tensors: torch.Tensor | None):
    """Triton compute dtype: fp64 when any input is fp64 (gradcheck), else fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a floating torch dtype (a constexpr a kernel rounds or stores to)."""
    return {torch.float64: tl.float64, torch.float32: tl.float32,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def stacked_dtype(partials_dtype: torch.dtype, dtypes) -> torch.dtype:
    """The dtype of several parameters' gradients reduced as one stack: theirs when they share
    one (cast once, inside the op that reduces them), else the partials'."""
    return dtypes[0] if len(set(dtypes)) == 1 else partials_dtype


def unstack_grads(stacked: torch.Tensor, dtypes) -> tuple:
    """Gradients reduced as one stack ([n, ...]: one torch reduction of per-program partials for
    several parameters), each in its parameter's dtype, None where its dtype is None (not
    needed): one cast of the whole stack when the needed ones share a dtype (as scale and shift
    from one Linear do)."""
    wanted = {dtype for dtype in dtypes if dtype is not None}
    if not wanted:
        return (None,) * len(dtypes)
    if len(wanted) == 1:
        parts = stacked.to(wanted.pop()).unbind(0)
        return tuple(None if dtype is None else part for part, dtype in zip(parts, dtypes))
    return tuple(None if dtype is None else part.to(dtype) for part, dtype in zip(stacked.unbind(0), dtypes))


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(stride_b, stride_c, stride_pixel) viewing [B, C, H, W] as [B, C, H*W].

    Works for NCHW-contiguous (pixel stride 1), channels_last (channel stride 1) and channel
    slices of either, without a copy. None when H and W cannot be merged into one pixel axis.
    """
    _, _, height, width = t.shape
    sb, sc, sh, sw = t.stride()
    if height == 1 or width == 0:  # width 0: no pixel, any stride
        return sb, sc, sw
    if width == 1:
        return sb, sc, sh
    if sh == width * sw:
        return sb, sc, sw
    return None


def flat_pixels(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` with its pixel strides; a tensor whose H and W cannot merge is copied first.

    Only exotic views (a spatial crop, a transposed H/W) take the copy; the layouts the model
    produces never do.
    """
    strides = pixel_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = pixel_strides(t)
    return t, strides


def flat_all(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
    """Each tensor (copied only if H and W cannot merge) and its [B, C, H*W] strides."""
    flat = [flat_pixels(t) for t in tensors]
    return [t for t, _ in flat], [strides for _, strides in flat]


# Kernels index inside one batch item with 32-bit integers (their batch offsets are 64-bit)
# unless some tensor's item spans this many elements (2 GB in bf16); then with 64-bit ones,
# compiled apart (their ``WIDE`` constexpr), with more registers. 2**30, not 2**31: room for the
# offsets a tile computes past an item's end, for lanes its mask turns off.
WIDE_ITEM_ELEMENTS = 2**30


def wide_offsets(*tensors: torch.Tensor | None) -> bool:
    """Whether an offset inside one batch item of any of ``tensors`` ([B, ...]) can leave 32 bits."""
    # The storage's size first: a view spans no more, and it is all a launch of usual sizes costs.
    return any(t is not None and t.untyped_storage().nbytes() >= WIDE_ITEM_ELEMENTS * t.element_size()
               and sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) >= WIDE_ITEM_ELEMENTS
               for t in tensors)


# A GPU grid holds at most this many programs along axes 1 and 2, where the kernels put the
# batch (axis 0 holds their pixel tiles, which can be as many). A larger batch takes several
# launches of the kernels' SPLIT_BATCH variant, each adding its first item (``batch_start``, every
# kernel's last runtime argument) to its batch index (``batch_item``).
MAX_GRID_BATCH = 65535


def launch_over_batch(kernel, grid: tuple[int, ...], batch: int, *args, **kwargs) -> None:
    """``kernel`` over ``grid`` with ``batch`` items on a last grid axis: one launch, or, past
    ``MAX_GRID_BATCH`` items, one per part of at most that many, each given its first item
    after ``args`` and SPLIT_BATCH (partial sums keep the whole batch's layout: each part
    writes its own items' rows)."""
    if batch <= MAX_GRID_BATCH:
        kernel[(*grid, batch)](*args, 0, SPLIT_BATCH=False, **kwargs)
        return
    for start in range(0, batch, MAX_GRID_BATCH):
        kernel[(*grid, min(MAX_GRID_BATCH, batch - start))](*args, start, SPLIT_BATCH=True, **kwargs)


if triton is not None:

    @triton.jit
    def batch_item(axis: tl.constexpr, batch_start, SPLIT_BATCH: tl.constexpr):
        """The batch item of this program, the batch on grid ``axis`` (int64: batch offsets pass
        2**31). Only a split batch adds ``batch_start``, so that the one-launch variant compiles
        as it did before the argument existed (``benchmarks.kernel_resources`` prints the same):
        the add, or the argument anywhere but last, cost some kernels registers and occupancy."""
        item = tl.program_id(axis).to(tl.int64)
        if SPLIT_BATCH:
            item += batch_start
        return item


def compute_dtypes(*tensors: torch.Tensor | None):
    """The Triton compute dtype and the torch dtype of fp32/fp64 partial sums that goes with it."""
    tl_dtype = compute_dtype(*tensors)
    return tl_dtype, (torch.float64 if tl_dtype == tl.float64 else torch.float32)


def pixel_tile(C: int, P: int, channels_last: bool, elements: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) of an elementwise [channels, pixels] tile of ``elements``.

    channels_last: the contiguous run is the channels of one pixel, so the tile spans up to 128
    channels and as many pixels as fill it. Otherwise (NCHW, pixel stride 1, or anything else)
    it is a long pixel run over a few channels. ``per_thread`` elements per thread and tensor.
    """
    if channels_last:
        block_c = min(next_power_of_2(C), 128)
        block_p = min(next_power_of_2(P), max(elements // block_c, 1))
    else:
        block_p = min(next_power_of_2(P), 1024)
        block_c = min(next_power_of_2(C), max(elements // block_p, 1))
    return block_c, block_p, min(8, max(1, block_c * block_p // (32 * per_thread)))


def tiles_per_program(C: int, P: int, B: int, block_c: int, block_p: int, max_tiles: int, min_programs: int) -> int:
    """Pixel tiles one program walks (a backward with per-program partial sums: fewer, longer
    programs keep the partials small), while the grid keeps ``min_programs`` programs."""
    pixel_tiles = cdiv(P, block_p)
    one_tile_programs = pixel_tiles * cdiv(C, block_c) * B
    return max(1, min(max_tiles, pixel_tiles, one_tile_programs // min_programs))


# Tests switch this on (tests/parity.py): every buffer a launcher allocates starts as NaN, so an
# element that no program writes makes the parity check fail instead of passing by luck; and it
# lies between two guard regions of GUARD, at least its own size each, recorded in ``guarded``,
# so that a store past either end (a mask too loose, a grid too large), which the interpreter
# writes into whatever memory follows, changes a guard that the test then checks.
poison_outputs = False
GUARD = -31.5  # exact in every float dtype, and no value a kernel here computes by chance
guarded: list[tuple[torch.Tensor, int, int]] = []  # (the whole allocation, start, end of the buffer)


def _guarded_buffer(shape, stride, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A NaN buffer of ``shape`` and ``stride`` inside a larger allocation whose ends are GUARD."""
    span = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    margin = max(span, 1024)
    whole = torch.full((span + 2 * margin,), GUARD, dtype=dtype, device=device)
    whole[margin:margin + span] = float("nan")
    if torch._guards.detect_fake_mode() is None:  # a fake kernel's outputs have no memory to guard
        guarded.append((whole, margin, margin + span))
    return whole.as_strided(shape, stride, margin)


def empty_activation(like: torch.Tensor, dtype: torch.dtype, channels: int | None = None) -> torch.Tensor:
    """An output with the memory format of ``like`` (NCHW or channels_last); with ``channels``,
    that many channels instead of ``like``'s (a convolution's output)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        fmt = torch.channels_last
    else:
        fmt = torch.contiguous_format
    B, C, H, W = like.shape
    shape = (B, C if channels is None else channels, H, W)
    if poison_outputs:
        return _guarded_buffer(shape, torch.empty(shape, device="meta", memory_format=fmt).stride(), dtype, like.device)
    if channels is None:
        return torch.empty_like(like, dtype=dtype, memory_format=fmt)
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 like: torch.Tensor | None = None) -> torch.Tensor:
    """A scratch or output buffer (per-program partial sums, saved statistics); with ``like``,
    of its shape and strides."""
    if poison_outputs:
        if like is not None:
            return _guarded_buffer(tuple(like.shape), like.stride(), dtype, device)
        return _guarded_buffer(tuple(shape), torch.empty(shape, device="meta").stride(), dtype, device)
    if like is not None:
        return torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)

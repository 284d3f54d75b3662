"""Triton's interpreter made to do what a GPU does where the two differ, so that the CPU tests
see what a GPU would.

- Masked loads: ``tl.load(ptr, mask=m)`` without ``other`` leaves the masked-out lanes
  undefined (Triton's documentation): a GPU returns whatever its registers held, the
  interpreter returns 0. A kernel that lets those lanes reach a sum, a dot or a product with 0
  (garbage * 0 is NaN when the garbage is inf or NaN) passes every test on the CPU and is wrong
  on a GPU. Here those lanes read NaN, so such a kernel fails the parity tests. Loads that give
  ``other`` read it, as before.
- Out-of-bounds accesses: a GPU faults, or reads and writes another buffer, and only
  compute-sanitizer sees an access whose value is then discarded; the interpreter reads or
  writes the host's memory beyond the tensor. Here every load and store of a launch must lie
  inside one of the tensors it was given (each view's extent), or the launch raises.
- Programs of a launch: a GPU runs them at once, in any order; the interpreter one after
  another, so a kernel whose programs share an element that one of them stores (two stores,
  or a store and another's load) computes one of its possible results here and passes. Here
  such a launch raises: every kernel's result is the same in any order of its programs.
- tl.dot's smallest tile: Triton for NVIDIA GPUs refuses a dot whose K is under 16 (32 for
  8-bit inputs; Triton 3.6, the GPU machines', for every dtype; 3.9 takes 8 for fp32 and 4 for
  fp64); the interpreter takes any. Here a launcher whose tiles would not compile fails.
- bf16 rounding: a GPU rounds fp32 to bf16 to nearest even (Triton's default for a downcast),
  as torch does; the interpreter truncates (toward zero, seen on Triton 3.9), which biases every
  bf16 value a kernel stores. Here it rounds to nearest even.
- 32-bit integers: a GPU wraps an int32 sum, difference or product that does not fit (an
  offset past 2**31 elements computed in int32 addresses another place), and so does numpy in
  the interpreter, silently. Here such an operation, or a cast of a value that does not fit
  into 32 bits, raises.
- Grid: a GPU refuses a launch with more than 2**31 - 1 programs along axis 0 or 65535 along
  axis 1 or 2; the interpreter runs any. Here such a launch raises.

tests/conftest.py applies all seven (:func:`apply`); they act under the interpreter only.

:func:`corner_programs` is for tests at sizes the interpreter could not run in full (a tensor
past 2**31 elements): inside it each launch runs only the programs at both ends of every grid
axis, those that reach the largest offsets, with their real program ids and grid.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np


def _interpreter():
    """Triton's interpreter module where it has every hook wrapped here, else None."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    semantic = getattr(interpreter, "interpreter_semantic", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    hooks = ("cast_impl", "create_masked_load", "create_masked_store", *_INT_OPS, "set_grid_dim", "set_grid_idx")
    executor = getattr(interpreter, "GridExecutor", None)
    if not (hasattr(semantic, "load") and all(hasattr(builder, h) for h in hooks)
            and all(hasattr(executor, h) for h in ("__call__", "_restore_args_dev"))
            and isinstance(getattr(semantic.builder, "codegen_fns", None), dict)):
        return None
    return interpreter


def supported() -> bool:
    """Whether this Triton's interpreter can be made strict."""
    return _interpreter() is not None


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """fp32 values rounded to nearest even bf16, as the bits of a uint16 array (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # quiet, sign kept
    return rounded


class OutOfBounds(Exception):
    """A load or store of an interpreted launch outside every tensor it was given."""


class ProgramsOverlap(Exception):
    """An element that one program of a launch stores and another loads or stores."""


class IntegerOverflow(Exception):
    """A 32-bit integer operation of an interpreted kernel whose exact result does not fit."""


class GridTooLarge(Exception):
    """A launch grid that a CUDA GPU refuses: axis 0 past 2**31 - 1 programs, axis 1 or 2 past 65535."""


GPU_GRID_LIMITS = (2**31 - 1, 65535, 65535)


# The builder's integer operations that can leave 32 bits, with their exact (int64) form.
_INT_OPS = {"create_add": np.add, "create_sub": np.subtract, "create_mul": np.multiply}


def _check_fits(what: str, exact: np.ndarray, dtype: np.dtype) -> None:
    """Raise if an exact (int64) result does not fit ``dtype`` when that is a 32-bit integer."""
    if dtype.kind not in "iu" or dtype.itemsize != 4:
        return
    info = np.iinfo(dtype)
    outside = (exact < info.min) | (exact > info.max)
    if outside.any():
        raise IntegerOverflow(f"{_Launch.name or 'kernel'}: {what} of {int(outside.sum())} elements does not fit "
                              f"{dtype.name} (first {int(exact[outside].flat[0])}); a GPU wraps it")


class _Corners:
    """:func:`corner_programs`' state: whether it is on, and the grid of the launch running."""
    active = False
    grid = None


@contextlib.contextmanager
def corner_programs():
    """Inside, every interpreted launch runs only the programs whose index along each grid axis
    is its first or last (at most 8), with their real ``tl.program_id`` and ``tl.num_programs``;
    the others do not run, so what they would have written is left as it was. On the CPU a
    launch's tensors are the interpreter's host copies themselves, so the copy back after the
    launch (which would touch every page of a sparse 8 GB tensor) is left out."""
    _Corners.active = True
    try:
        yield
    finally:
        _Corners.active, _Corners.grid = False, None


def _extent(tensor) -> tuple[int, int]:
    """[first byte, past the last byte) of a view's elements in memory (empty when it has none)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    reach = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (reach + 1) * tensor.element_size()


class _Launch:
    """The launch being interpreted: its tensors' extents, sorted by start, and the addresses
    each of its programs loaded and stored."""
    name = None
    starts = ends = np.zeros(0, dtype=np.uint64)
    accesses = {"load": [], "store": []}

    @classmethod
    def begin(cls, name: str, args) -> None:
        extents = sorted(_extent(a) for a in args if hasattr(a, "data_ptr") and hasattr(a, "stride"))
        cls.name = name
        cls.starts = np.array([e[0] for e in extents], dtype=np.uint64)
        cls.ends = np.array([e[1] for e in extents], dtype=np.uint64)
        cls.accesses = {"load": [], "store": []}

    @classmethod
    def access(cls, kind: str, builder, ptrs, mask) -> None:
        """Check one load or store against the tensors and record it for :meth:`end`."""
        if cls.name is None:
            return
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)].ravel()
        size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
        owner = np.searchsorted(cls.starts, addresses, side="right") - 1
        outside = (owner < 0) | (addresses + size > cls.ends[np.maximum(owner, 0)])
        if outside.any():
            # Views of one storage can nest or overlap: an address past its nearest start's
            # end may still lie inside an earlier, longer tensor.
            rest = addresses[outside][:, None]
            outside[outside] = ~((cls.starts <= rest) & (rest + size <= cls.ends)).any(axis=1)
            if outside.any():
                raise OutOfBounds(f"{cls.name}: a {kind} of {int(outside.sum())} elements outside every "
                                  f"tensor the launch was given (first at {int(addresses[outside][0]):#x})")
        (x, y, z), (_, ny, nz) = builder.grid_idx, builder.grid_dim
        cls.accesses[kind].append((addresses, (x * ny + y) * nz + z))

    @classmethod
    def end(cls) -> None:
        """Raise if programs of the launch share an element one of them stores: on a GPU they
        run in any order, at once; here they ran one after another."""
        name, accesses = cls.name, cls.accesses
        cls.name, cls.accesses = None, {"load": [], "store": []}
        if not accesses["store"]:
            return
        addr, prog = _flatten(accesses["store"])
        order = np.lexsort((prog, addr))
        addr, prog = addr[order], prog[order]
        repeated = addr[1:] == addr[:-1]
        shared = repeated & (prog[1:] != prog[:-1])
        if shared.any():
            raise ProgramsOverlap(f"{name}: {np.unique(addr[1:][shared]).size} elements stored by more "
                                  f"than one program")
        first = np.concatenate([[True], ~repeated])
        stored, writer = addr[first], prog[first]
        if accesses["load"]:
            addr, prog = _flatten(accesses["load"])
            at = np.minimum(np.searchsorted(stored, addr), stored.size - 1)
            crossed = (stored[at] == addr) & (writer[at] != prog)
            if crossed.any():
                raise ProgramsOverlap(f"{name}: {np.unique(addr[crossed]).size} elements stored by one "
                                      f"program and loaded by another")


def _flatten(accesses) -> tuple[np.ndarray, np.ndarray]:
    """(addresses, programs) of a list of (addresses, program)."""
    addr = np.concatenate([a for a, _ in accesses])
    prog = np.concatenate([np.full(a.size, p, dtype=np.uint64) for a, p in accesses])
    return addr, prog


def _checked_grid(grid, args) -> tuple[int, ...]:
    """A launch's grid, once checked against a GPU's limits; under :func:`corner_programs` the
    grid of its corners (the real one kept in _Corners)."""
    real = tuple(grid(args) if callable(grid) else grid)
    if any(n > limit for n, limit in zip(real, GPU_GRID_LIMITS)):
        raise GridTooLarge(f"{_Launch.name}: grid {real}; a GPU takes at most {GPU_GRID_LIMITS}")
    if not _Corners.active:
        return real
    _Corners.grid = real + (1,) * (3 - len(real))
    return tuple(min(n, 2) for n in _Corners.grid)


def _gpu_min_dot_size(lhs_type, rhs_type) -> tuple[int, int, int]:
    """The smallest (M, N, K) of a tl.dot that Triton 3.6 compiles for an NVIDIA GPU."""
    return (1, 1, 32 if lhs_type.scalar.primitive_bitwidth == 8 else 16)


def apply() -> None:
    """Masked floating-point loads without ``other`` read NaN in their masked-out lanes, every
    access of a launch is checked against its tensors and its other programs' stores, tl.dot
    takes the GPU's smallest tiles, fp32 -> bf16 casts round to nearest even, and 32-bit
    integer results that do not fit and grids a GPU would refuse raise (idempotent; nothing
    unless ``TRITON_INTERPRET`` is on, or where not :func:`supported`). :func:`corner_programs`
    works from here on."""
    from liquiddiff.kernels import runtime  # here: liquiddiff must not jit before the env is set

    interpreter = _interpreter()
    if interpreter is None or not runtime.interpreter_enabled():
        return
    # The semantic's class, not the instance: Triton 3.6 makes one instance per patched builtin.
    semantic = type(interpreter.interpreter_semantic)
    if getattr(semantic.load, "strict", False):
        return
    import triton.language as tl

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    load, cast, run = semantic.load, builder.cast_impl, executor.__call__
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    set_grid_dim, set_grid_idx, restore = builder.set_grid_dim, builder.set_grid_idx, executor._restore_args_dev

    def run_checking_accesses(self, *args, **kwargs):
        _Launch.begin(getattr(self.fn, "__name__", "kernel"), [*args, *kwargs.values()])
        grid = self.grid
        self.grid = functools.partial(_checked_grid, grid)
        try:
            result = run(self, *args, **kwargs)
        except BaseException:
            _Launch.name = None
            raise
        finally:
            self.grid, _Corners.grid = grid, None
        _Launch.end()
        return result

    def real_grid_dim(self, nx, ny, nz):
        # The loop runs the corner grid's 2 x 2 x 2 (at most); the kernel sees the real one.
        set_grid_dim(self, *(_Corners.grid or (nx, ny, nz)))

    def corner_grid_idx(self, x, y, z):
        if _Corners.grid is not None:
            x, y, z = (i if i == 0 else n - 1 for i, n in zip((x, y, z), _Corners.grid))
        set_grid_idx(self, x, y, z)

    def restore_unless_on_cpu(self, args_dev, *rest):
        if not (_Corners.active and all(a.device.type == "cpu" for a in args_dev if hasattr(a, "data_ptr"))):
            restore(self, args_dev, *rest)

    def checked_int_op(name, op, exact):
        def checked(self, lhs, rhs):
            out = op(self, lhs, rhs)
            # Few numpy calls: this runs for every index computation of every program.
            if out.data.dtype.kind in "iu" and out.data.dtype.itemsize == 4:
                wide = exact(lhs.data, rhs.data, dtype=np.int64)
                if (wide != out.data).any():
                    _check_fits(name, wide, out.data.dtype)
            return out
        return checked

    def checked_load(self, ptrs, mask, *args, **kwargs):
        _Launch.access("load", self, ptrs, mask)
        return masked_load(self, ptrs, mask, *args, **kwargs)

    def checked_store(self, ptrs, value, mask, *args, **kwargs):
        _Launch.access("store", self, ptrs, mask)
        return masked_store(self, ptrs, value, mask, *args, **kwargs)

    def load_poisoning_masked_lanes(self, ptr, mask, other, *args, **kwargs):
        # Interpreted launches only: the class also compiles for GPUs (kernel_resources).
        if (isinstance(self.builder, builder) and mask is not None and other is None
                and ptr.type.scalar.element_ty.is_floating()):
            other = self.to_tensor(float("nan"))  # cast to the pointer's dtype by load
        return load(self, ptr, mask, other, *args, **kwargs)

    def cast_rounding_to_bf16(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(round_to_bf16(src.data), dst_type.scalar)
        out = cast(self, src, dst_type)
        if src.data.dtype.kind in "iu":
            _check_fits("a cast", src.data.astype(np.int64), out.data.dtype)
        return out

    load_poisoning_masked_lanes.strict = True
    semantic.load = load_poisoning_masked_lanes
    builder.cast_impl = cast_rounding_to_bf16
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    executor.__call__ = run_checking_accesses
    executor._restore_args_dev = restore_unless_on_cpu
    builder.set_grid_dim, builder.set_grid_idx = real_grid_dim, corner_grid_idx
    for name, exact in _INT_OPS.items():
        setattr(builder, name, checked_int_op(name.removeprefix("create_"), getattr(builder, name), exact))
    interpreter.interpreter_semantic.builder.codegen_fns["min_dot_size"] = _gpu_min_dot_size

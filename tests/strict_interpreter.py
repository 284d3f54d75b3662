"""Triton's interpreter made to do what a GPU does where the two differ, so that the CPU tests
see what a GPU would.

- Masked loads: ``tl.load(ptr, mask=m)`` without ``other`` leaves the masked-out lanes
  undefined (Triton's documentation): a GPU returns whatever its registers held, the
  interpreter returns 0. A kernel that lets those lanes reach a sum, a dot or a product with 0
  (garbage * 0 is NaN when the garbage is inf or NaN) passes every test on the CPU and is wrong
  on a GPU. Here those lanes read NaN, so such a kernel fails the parity tests. Loads that give
  ``other`` read it, as before.
- bf16 rounding: a GPU rounds fp32 to bf16 to nearest even (Triton's default for a downcast),
  as torch does; the interpreter truncates (toward zero, seen on Triton 3.9), which biases every
  bf16 value a kernel stores. Here it rounds to nearest even.

tests/conftest.py applies both (:func:`apply`) under the interpreter.
"""
from __future__ import annotations

import numpy as np


def _interpreter():
    """Triton's interpreter module where it has the two hooks wrapped here, else None."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    semantic = getattr(interpreter, "interpreter_semantic", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not hasattr(semantic, "load") or not hasattr(builder, "cast_impl"):
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


def apply() -> None:
    """Masked floating-point loads without ``other`` read NaN in their masked-out lanes, and
    fp32 -> bf16 casts round to nearest even (idempotent; nothing where not :func:`supported`)."""
    interpreter = _interpreter()
    if interpreter is None or getattr(interpreter.interpreter_semantic.load, "strict", False):
        return
    import triton.language as tl

    semantic, builder = interpreter.interpreter_semantic, interpreter.InterpreterBuilder
    load, cast = semantic.load, builder.cast_impl

    def load_poisoning_masked_lanes(ptr, mask, other, *args, **kwargs):
        if mask is not None and other is None and ptr.type.scalar.element_ty.is_floating():
            other = semantic.to_tensor(float("nan"))  # cast to the pointer's dtype by load
        return load(ptr, mask, other, *args, **kwargs)

    def cast_rounding_to_bf16(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(round_to_bf16(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    load_poisoning_masked_lanes.strict = True
    semantic.load = load_poisoning_masked_lanes
    builder.cast_impl = cast_rounding_to_bf16

"""Triton's interpreter made to compute what the compiled kernels compute (CPU tensors under
``TRITON_INTERPRET=1``: the CPU tests' path, and a user's way to run the fast ops without a GPU).

Three places where Triton's interpreter (3.6 to 3.8) departs from the compiled code, each patched once
per process by :func:`patch` (called by ``_launch.py`` at import under the interpreter), each only
where a probe shows the departure:

* **A scalar as a Python int.** The interpreter holds each scalar of a kernel (an argument, a loop
  bound computed from one) as a one-element NumPy array and turns it into an int (``range(n)``, an
  index) with ``__index__``. Triton 3.6 does that with ``int()`` of the array itself, which NumPy 2.4
  and later refuse for a 1-d array ("only 0-dimensional arrays can be converted to Python scalars"):
  every kernel that loops over a runtime bound (the OHEM select pass's zeroing, FBF's reductions)
  failed there: 216 CPU tests on torch 2.11 + triton 3.6 + NumPy 2.4, the oldest stack the project
  supports (the lent GPU machine's torch and Triton). Triton 3.8 squeezes the array first; the patch
  does the same.
* **fp32 -> bf16 rounds to nearest even.** Compiled kernels convert with ``cvt.rn.bf16.f32`` (LLVM's
  ``fptrunc``); the interpreter truncates the mantissa (``-8.623 -> -8.5625`` where the GPU and PyTorch
  give ``-8.625``), so a bf16 result checked on the CPU carried up to one more ulp of error than the
  same kernel on a GPU, and a tolerance fitted to it would hide a real rounding bug. The patch rounds
  as the GPU does (NaN stays NaN, overflow goes to infinity).

* **A bf16 ``tl.dot``** multiplies the operands' storage (the interpreter keeps bf16 as uint16 bit
  patterns) as integers; the tensor cores multiply the values. The patch widens bf16 operands to
  fp32 first (exact) and sums in fp32, as the compiled MMA does (fp32 accumulation of exact
  products, up to the order of the additions).

Compiled kernels (CUDA tensors) never pass through this code.
"""

from __future__ import annotations

import numpy as np

_DONE = {"patched": None}


def f32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 ``data``, rounded to nearest even like ``cvt.rn.bf16.f32``."""
    u = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def _index_is_broken(interpreter) -> bool:
    import triton.language as tl
    handle = interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32)

    class _Tensor:
        pass

    class _Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    probe = _Tensor()
    probe.handle = handle
    interpreter._patch_lang_tensor(_Tensor, _Scope())
    try:
        return _Tensor.__index__(probe) != 3
    except TypeError:
        return True


def _bf16_cast_truncates(interpreter) -> bool:
    import triton.language as tl
    src = interpreter.TensorHandle(np.array([1.0 + 2.0 ** -8 + 2.0 ** -12], dtype=np.float32), tl.float32)
    out = interpreter.InterpreterBuilder.cast_impl(None, src, tl.bfloat16)
    return int(np.asarray(out.data).view(np.uint16)[0]) != 0x3F81


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """fp32 values of bf16 bit patterns (uint16): exact."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _bf16_dot_is_broken(interpreter) -> bool:
    import triton.language as tl
    one = interpreter.TensorHandle(np.full((16, 16), 0x3F80, dtype=np.uint16), tl.bfloat16)     # 1.0
    acc = interpreter.TensorHandle(np.zeros((16, 16), dtype=np.float32), tl.float32)
    out = interpreter.InterpreterBuilder.create_dot(None, one, one, acc, None, None)
    return float(np.asarray(out.data)[0, 0]) != 16.0


def patch() -> tuple:
    """Apply the fixes this Triton's interpreter needs (idempotent). Returns the names of the fixes
    in force, of ``"index"``, ``"bf16_rne"`` and ``"bf16_dot"``; ``()`` for an interpreter that needs none."""
    if _DONE["patched"] is not None:
        return _DONE["patched"]
    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        _DONE["patched"] = ()
        return ()
    fixes = []
    if _index_is_broken(interpreter):
        original_patch = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope, *args, **kwargs):
            original_patch(tensor, scope, *args, **kwargs)
            # after the original's own set_attr: the scope restores both, in reverse order
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interpreter._patch_lang_tensor = _patch_lang_tensor
        fixes.append("index")
    if _bf16_cast_truncates(interpreter):
        builder = interpreter.InterpreterBuilder
        original_cast = builder.cast_impl

        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return interpreter.TensorHandle(f32_to_bf16_bits(src.data), dst_type.scalar)
            return original_cast(self, src, dst_type)

        builder.cast_impl = cast_impl
        fixes.append("bf16_rne")
    if _bf16_dot_is_broken(interpreter):
        builder = interpreter.InterpreterBuilder
        original_dot = builder.create_dot

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
                a_data = bf16_bits_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
                b_data = bf16_bits_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
                out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
                return interpreter.TensorHandle(out, d.dtype.scalar)
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        builder.create_dot = create_dot
        fixes.append("bf16_dot")
    _DONE["patched"] = tuple(fixes)
    return _DONE["patched"]

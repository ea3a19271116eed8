"""Fixes for Triton's CPU interpreter, applied by ``bi_torch/__init__.py``
only when the kernels run in that interpreter (``TRITON_INTERPRET=1`` at
import). GPU runs never reach this module.

* triton-lang/triton#9171: with numpy >= 2.4, a runtime loop bound
  (``range(0, K, BLOCK_K)``, the matmul's K loop) fails with "only
  0-dimensional arrays can be converted to Python scalars": the interpreter's
  scalars are 1-element arrays, and ``range`` needs ``__index__``.
* triton-lang/triton#11584: ``tl.dot`` on bf16 operands multiplies their raw
  16-bit storage and returns garbage without an error.
* A cast from fp32 to bf16 (every bf16 output, ``y.to(y_ptr.dtype.element_ty)``)
  drops the low 16 bits instead of rounding to nearest as the GPU does (the
  interpreter's conversion, added in triton-lang/triton#3811, is called without
  a rounding mode): one bf16 step off in about half of all outputs, and other
  bits than bi_jax's on the CPU. The cast is done with ``ml_dtypes``, which
  rounds to nearest even and keeps NaN a NaN.
* ``tl.dot`` is ``numpy.matmul``, and numpy's BLAS rounds a row of a tile by
  its position in the tile (edge micro-kernels): measured with numpy 2.5, 10
  of 16 rows of a 16 x 32 @ 32 x 32 fp32 product had other bits when the row
  sat first in an otherwise zero tile. A row's position in its tile follows
  the batch, so the CPU matmul was not batch-invariant.

The dot is therefore computed here as the contract states it: the operands
widened to fp32 (exact for bf16 and fp16), then ``k = 0, 1, 2, ...`` added in
order onto the accumulator, one product and one addition at a time, the same
arithmetic for every row. CPU bits differ from the GPU's (whose tensor cores
add in their own order); the CPU run proves the kernels' structure, not GPU
numerics.

Also, for speed only: the interpreter re-patches ``triton.language`` on every
call of a ``@triton.jit`` helper from inside a kernel
(``InterpretedFunction.__call__`` calls ``_patch_lang``, about 1 ms of
``inspect.getmembers`` each time, and never restores it), though the launch
has patched those same modules already; the attention backward calls its
helpers once per tile, so that re-patching took three quarters of its
interpreter time. A helper whose ``triton.language`` modules the running
launch has patched skips it; the patched functions are the same either way.

The patches replace private parts of ``triton.runtime.interpreter``
(Triton 3.6). If a Triton release no longer has them, nothing is patched and
``interpreter_ready()`` says why, so that ``bi_torch.matmul`` refuses to run
rather than return wrong bits.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

_APPLIED: bool | None = None
_WHY_NOT = ""


def _widen(h, tl) -> np.ndarray:
    """A dot operand's values in fp32."""
    if h.dtype == tl.bfloat16:
        return (h.data.astype(np.uint32) << 16).view(np.float32)
    return h.data.astype(np.float32)


def apply() -> None:
    """Patch the interpreter once (idempotent)."""
    global _APPLIED, _WHY_NOT
    if _APPLIED is not None:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if builder is None or patch_tensor is None or not all(hasattr(builder, a) for a in ("create_dot", "cast_impl")):
        _APPLIED = False
        _WHY_NOT = (
            "this Triton's interpreter lacks the internals that bi_torch patches for "
            "triton-lang/triton#9171 and #11584"
        )
        return

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a32, b32 = _widen(a, tl), _widen(b, tl)
        acc = np.array(d.data, dtype=np.float32, copy=True)
        for k in range(a32.shape[-1]):
            acc += a32[..., :, k : k + 1] * b32[..., k : k + 1, :]
        return interpreter.TensorHandle(acc.astype(d.data.dtype, copy=False), d.dtype.scalar)

    cast_impl = builder.cast_impl

    def _cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = np.asarray(src.data, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        return cast_impl(self, src, dst_type)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    builder.create_dot = _create_dot
    builder.cast_impl = _cast_impl
    _skip_repatching(interpreter, tl)
    _APPLIED = True


def _skip_repatching(interpreter, tl) -> None:
    """A ``@triton.jit`` helper called inside a launch whose ``triton.language``
    modules that launch has patched already (for its kernel or an earlier
    helper) runs without re-patching them (the patches stay in force until
    the launch ends); any other call, as before. Skipped (no speed-up, the same results) where this Triton's
    interpreter lacks the parts it wraps."""
    grid, device = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpretedFunction", None)
    error = getattr(interpreter, "InterpreterError", None)
    if grid is None or device is None or error is None or not hasattr(device, "rewrite"):
        return
    launches: list[set] = []  # the language modules patched within each running launch
    grid_call, device_call = grid.__call__, device.__call__

    def langs(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def launch(self, *args, **kwargs):
        launches.append(set(langs(self.fn)))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    def call(self, *args, **kwargs):
        mods = langs(self.fn)
        if not (launches and mods and mods <= launches[-1]):
            # Patches the helper's modules (triton.language's own helpers,
            # tl.sum for one, see only ``core``), which stay patched (the
            # interpreter never restores a helper's patches) for the rest of
            # the launch.
            if launches and mods:
                launches[-1] |= mods
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as the interpreter's own call reports it
            raise error(repr(e)) from e

    grid.__call__, device.__call__ = launch, call


def interpreter_ready() -> str | None:
    """None when the interpreter can run the matmul, else why not."""
    return None if _APPLIED else (_WHY_NOT or "the interpreter fixes were not applied")

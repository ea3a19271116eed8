"""``silu_and_mul``: SwiGLU's gated activation ``SiLU(g) * u`` of a fused
``[g | u]`` input (the twin of ``bi_torch.ops.activation``).

The Pallas kernel runs ``bi_core.activation``'s PTX, the instructions
bi_torch's Triton kernel runs, so on the GPU the two frameworks give the same
bits; XLA's own fusion of ``g / (1 + exp(-g)) * u`` need not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_core.activation import (
    NEG_LOG2E,
    SILU_MUL_ASM,
    SILU_MUL_GRAD_GATE_ASM,
    SILU_MUL_GRAD_UP_ASM,
    block_for,
    check_gated_width,
)
from bi_jax._checks import check_float_array, interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops._row_launch import MAX_LAUNCH_ELEMENTS, launch_rows
from bi_jax.ops.rows import _asm

__all__ = ["silu_and_mul"]


def _silu_mul(g, u, ptx):
    if ptx:
        return _asm(SILU_MUL_ASM, g, u)
    return g / (1.0 + jnp.exp2(g * NEG_LOG2E)) * u


def _grads(g, u, c, ptx):
    if ptx:
        return _asm(SILU_MUL_GRAD_GATE_ASM, g, u, c), _asm(SILU_MUL_GRAD_UP_ASM, g, c)
    d = 1.0 + jnp.exp2(g * NEG_LOG2E)
    s = 1.0 / d
    return (c * u) * (s * (1.0 + g * (1.0 - s))), c * (g / d)


def _kernel(x_ref, y_ref, *, n, block, ptx):
    row = jnp.broadcast_to(pl.program_id(0), (block,))
    cols = pl.program_id(1) * block + jnp.arange(block, dtype=jnp.int32)
    ok = cols < n
    g = pltriton.load(x_ref.at[row, cols], mask=ok, other=0.0).astype(jnp.float32)
    u = pltriton.load(x_ref.at[row, cols + n], mask=ok, other=0.0).astype(jnp.float32)
    pltriton.store(y_ref.at[row, cols], _silu_mul(g, u, ptx).astype(y_ref.dtype), mask=ok)


def _grad_kernel(x_ref, c_ref, dx_ref, *, n, block, ptx):
    row = jnp.broadcast_to(pl.program_id(0), (block,))
    cols = pl.program_id(1) * block + jnp.arange(block, dtype=jnp.int32)
    ok = cols < n
    g = pltriton.load(x_ref.at[row, cols], mask=ok, other=0.0).astype(jnp.float32)
    u = pltriton.load(x_ref.at[row, cols + n], mask=ok, other=0.0).astype(jnp.float32)
    c = pltriton.load(c_ref.at[row, cols], mask=ok, other=0.0).astype(jnp.float32)
    dg, du = _grads(g, u, c, ptx)
    pltriton.store(dx_ref.at[row, cols], dg.astype(dx_ref.dtype), mask=ok)
    pltriton.store(dx_ref.at[row, cols + n], du.astype(dx_ref.dtype), mask=ok)


def _call(kernel, name, rows, n, out_cols, dtype, interpret, *args):
    block = block_for(n)
    kernel = functools.partial(kernel, n=n, block=block, ptx=not interpret)
    return pallas_call(kernel, grid=(rows, pl.cdiv(n, block)), out_shape=jax.ShapeDtypeStruct((rows, out_cols), dtype),
                       compiler_params=pltriton.CompilerParams(num_warps=4 if block >= 512 else 1, num_stages=1),
                       interpret=interpret, name=name)(*args)


def launch(x2d, interpret: bool | None = None):
    """The kernel over ``x2d`` (rows, 2 n): the (rows, n) output."""
    interpret = interpret_mode("silu_and_mul") if interpret is None else interpret
    rows, n = x2d.shape[0], x2d.shape[1] // 2
    return _call(_kernel, "bi_silu_and_mul", rows, n, n, x2d.dtype, interpret, x2d)


def silu_and_mul_backward(x, grad, interpret: bool | None = None):
    """The gradient with respect to ``x = [g | u]`` for the output gradient
    ``grad``: ``[grad * u * s * (1 + g * (1 - s)) | grad * silu(g)]`` with
    ``s = sigmoid(g)``, in fp32 with ``bi_core.activation``'s arithmetic
    (bi_torch's bits), rounded once to ``x``'s dtype."""
    interpret = interpret_mode("silu_and_mul backward") if interpret is None else interpret
    n = x.shape[-1] // 2
    if n == 0 or x.size == 0:
        return jnp.zeros(x.shape, x.dtype)
    x2d, c2d = x.reshape(-1, 2 * n), grad.reshape(-1, n).astype(x.dtype)
    rows = x2d.shape[0]
    step = max(1, MAX_LAUNCH_ELEMENTS // (2 * n))  # launches that int32 offsets address
    parts = [_call(_grad_kernel, "bi_silu_and_mul_grad", min(step, rows - r), n, 2 * n, x.dtype, interpret,
                   x2d[r:r + step], c2d[r:r + step]) for r in range(0, rows, step)]
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts)).reshape(x.shape)


@jax.custom_vjp
def _silu_and_mul(x):
    n = x.shape[-1] // 2
    if n == 0 or x.size == 0:
        return jnp.zeros((*x.shape[:-1], n), x.dtype)
    x2d = x.reshape(-1, 2 * n)
    interpret = interpret_mode("silu_and_mul")
    y = launch_rows("silu_and_mul", lambda part: launch(part, interpret), x2d, interpret)
    return y.reshape(*x.shape[:-1], n)


def _fwd(x):
    return _silu_and_mul(x), x


def _bwd(x, grad):
    return (silu_and_mul_backward(x, grad),)


_silu_and_mul.defvjp(_fwd, _bwd)


def silu_and_mul(x: jax.Array) -> jax.Array:
    """SwiGLU's activation of a fused ``[gate | up]`` input: for ``x`` of shape
    ``(..., 2 n)``, ``silu(x[..., :n]) * x[..., n:]`` of shape ``(..., n)`` in
    ``x``'s dtype (float32, bfloat16 or float16), computed in fp32 and rounded
    once. On the GPU the bits equal ``bi_torch.silu_and_mul``'s for the same
    input (``bi_core.activation``). Differentiable (an elementwise backward
    kernel, bi_torch's bits too);
    works under ``jax.jit`` and ``jax.vmap``."""
    check_float_array("x", x, "silu_and_mul")
    check_gated_width("silu_and_mul", tuple(x.shape))
    return _silu_and_mul(x)

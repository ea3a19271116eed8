"""Embedding lookup whose weight gradient is summed in a fixed order (the
twin of ``bi_torch.ops.embedding``).

The forward is a gather (``jnp.take``): exact. Its transpose in JAX is a
scatter-add, which XLA's GPU scatter does with atomics. Here the token
positions are sorted stably by id (``jnp.argsort(stable=True)``), and a
Pallas program per (sorted position, block of columns) that starts a run of
equal ids adds that id's output gradients in increasing token position, in
fp32, rounding once into the table's dtype; rows no token looked up stay 0.
A given batch of ids and gradients always gives the same bits.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_jax._checks import interpret_mode
from bi_jax._pallas import pallas_call

_BLOCK = 1024  # columns per program, at most


def _grad_kernel(sorted_ref, order_ref, g_ref, zeros_ref, out_ref, *, n, h, num_rows, block):
    del zeros_ref  # the output's initial zeros (aliased)
    j = pl.program_id(0)
    cols = pl.program_id(1) * block + jnp.arange(block, dtype=jnp.int32)
    ok = cols < h
    row = sorted_ref[j]
    prev = sorted_ref[jnp.maximum(j - 1, 0)]

    # Ids outside the table (jnp.take fills their rows) take no gradient, as in
    # jnp.take's own transpose, and write nothing.
    @pl.when(((j == 0) | (prev != row)) & (row >= 0) & (row < num_rows))
    def _():
        def more(carry):
            k, _ = carry
            return (k < n) & (sorted_ref[jnp.minimum(k, n - 1)] == row)

        def add(carry):
            k, acc = carry
            pos = order_ref[k]
            rows = jnp.broadcast_to(pos, (block,))
            return k + 1, acc + pltriton.load(g_ref.at[rows, cols], mask=ok, other=0.0).astype(jnp.float32)

        _, acc = lax.while_loop(more, add, (j, jnp.zeros((block,), jnp.float32)))
        pltriton.store(out_ref.at[jnp.broadcast_to(row, (block,)), cols], acc.astype(out_ref.dtype), mask=ok)


def embedding_backward(ids, g, num_rows: int, dtype, interpret=None):
    """The gradient of ``jnp.take(weight, ids, axis=0)`` with respect to a
    ``(num_rows, h)`` weight, for the output gradient ``g``."""
    interpret = interpret_mode("embedding backward") if interpret is None else interpret
    h = g.shape[-1]
    flat = ids.reshape(-1).astype(jnp.int32)
    flat = jnp.where(flat < 0, flat + num_rows, flat)  # negative ids count from the end, as in jnp.take
    n = flat.shape[0]
    zeros = jnp.zeros((num_rows, h), dtype)
    if n == 0 or h == 0:
        return zeros
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sorted_ids = flat[order]
    block = min(_BLOCK, 1 << (h - 1).bit_length())
    if n * h >= 2**31 or num_rows * h >= 2**31:
        raise ValueError(f"embedding backward: {n} x {h} gradients or a {num_rows} x {h} table past 2**31 elements "
                         "(the kernel's offsets are int32)")
    kernel = functools.partial(_grad_kernel, n=n, h=h, num_rows=num_rows, block=block)
    return pallas_call(kernel, grid=(n, pl.cdiv(h, block)), out_shape=jax.ShapeDtypeStruct((num_rows, h), dtype),
                          input_output_aliases={3: 0}, interpret=interpret,
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
                          name="bi_embedding_grad")(sorted_ids, order, g.reshape(n, h), zeros)


@jax.custom_vjp
def _embedding(ids, weight):
    return jnp.take(weight, ids, axis=0)


def _forward(ids, weight):
    return _embedding(ids, weight), (ids, weight)


def _backward(residuals, g):
    ids, weight = residuals
    # Integer ids take a float0 cotangent.
    return np.zeros(ids.shape, jax.dtypes.float0), embedding_backward(ids, g, weight.shape[0], weight.dtype)


_embedding.defvjp(_forward, _backward)


def embedding(ids, weight):
    """``jnp.take(weight, ids, axis=0)``: rows of a ``(num_embeddings, dim)``
    floating-point table for integer ``ids`` of any shape (out-of-range ids
    as ``jnp.take`` treats them: negative ones count from the end, others
    give NaN rows and take no gradient). Its weight gradient is
    summed in a fixed order (module docstring), so a training step gives the
    same bits on every run."""
    ids, weight = jnp.asarray(ids), jnp.asarray(weight)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
    if weight.ndim != 2 or not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(f"embedding: weight must be a 2-D floating-point array, got {weight.shape} {weight.dtype}")
    return _embedding(ids, weight)

"""Tensor parallelism whose bits do not depend on the batch
(``bi_core.tensor_parallel``), for use inside ``jax.shard_map`` (or any
context with a named mesh axis): a fixed-order all-reduce and the row- and
column-parallel linear layers on it, the twins of ``bi_torch.distributed``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bi_jax._checks import check_float_array

__all__ = ["all_reduce", "all_gather", "row_parallel_linear", "column_parallel_linear"]


def all_reduce(x: jax.Array, axis_name) -> jax.Array:
    """The sum of ``x`` over the devices of ``axis_name``: gathered (a copy),
    then added elementwise in device order in fp32, rounded once to
    ``x.dtype``. ``jax.lax.psum`` leaves the order to the collective, which
    picks it from the message size."""
    check_float_array("x", x, "all_reduce")
    parts = jax.lax.all_gather(x, axis_name)
    total = parts[0].astype(jnp.float32)
    for i in range(1, parts.shape[0]):  # unrolled: one add per rank, in order
        total = total + parts[i].astype(jnp.float32)
    return total.astype(x.dtype)


def all_gather(x: jax.Array, axis_name, axis: int = -1) -> jax.Array:
    """The devices' ``x`` concatenated along ``axis`` in device order."""
    check_float_array("x", x, "all_gather")
    return jax.lax.all_gather(x, axis_name, axis=axis % x.ndim, tiled=True)


def row_parallel_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *, axis_name) -> jax.Array:
    """``x @ weight.T (+ bias)`` with the input features split over
    ``axis_name``: ``x`` (..., K_r) and ``weight`` (N, K_r) are this device's
    slices. Each partial is a bi_ product kept in fp32, summed by
    :func:`all_reduce`'s order, ``bias`` added once, one rounding."""
    from bi_jax.ops.matmul import matmul

    check_float_array("x", x, "row_parallel_linear")
    check_float_array("weight", weight, "row_parallel_linear")
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"row_parallel_linear: x {x.shape} and weight {weight.shape}: the weight must be "
                         "(out_features, this device's in_features) and x's last dimension its in_features")
    total = all_reduce(matmul(x, weight.T, preferred_element_type=jnp.float32), axis_name)
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"row_parallel_linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
        total = total + bias.astype(jnp.float32)
    return total.astype(x.dtype)


def column_parallel_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *, axis_name,
                           gather: bool = False) -> jax.Array:
    """``x @ weight.T (+ bias)`` with the output features split over
    ``axis_name``: ``weight`` (N_r, K), ``bias`` (N_r,) this device's rows;
    this device's columns, or with ``gather`` all of them in device order."""
    from bi_jax.ops.matmul import linear

    out = linear(x, weight, bias)
    return all_gather(out, axis_name, -1) if gather else out

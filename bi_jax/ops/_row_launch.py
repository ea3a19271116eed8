"""Launching one-program-per-row Pallas kernels (rms_norm and the row ops)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from bi_core.rms_norm import CHUNK

# Pallas's Triton backend computes offsets in int32: one launch covers at most
# this many elements, masked tail lanes of the last chunk included.
MAX_LAUNCH_ELEMENTS = 2**31 - 1 - CHUNK


def launch_rows(op: str, launch: Callable[[jax.Array], jax.Array], x2d: jax.Array, interpret: bool) -> jax.Array:
    """``launch`` over the rows of ``x2d``, split into launches that int32
    offsets can address (rows are independent, so the split changes no bits)."""
    m, n = x2d.shape
    if n > MAX_LAUNCH_ELEMENTS:
        raise ValueError(f"{op}: rows of {n} elements are too long (at most {MAX_LAUNCH_ELEMENTS}: int32 offsets)")
    rows = max(1, MAX_LAUNCH_ELEMENTS // max(n, 1))
    parts = [_launch_once(launch, x2d[s : s + rows], interpret) for s in range(0, m, rows)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _launch_once(launch, x2d, interpret):
    if interpret and x2d.shape[0] == 1:
        # Interpreted, a one-program grid loses its loop and XLA compiles the
        # body differently: 1-element rows then came out 1 ULP apart from the
        # same row in a larger launch. Two programs keep the loop.
        return launch(jnp.concatenate([x2d, x2d]))[:1]
    return launch(x2d)

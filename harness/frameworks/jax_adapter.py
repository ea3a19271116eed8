"""JAX adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from harness.frameworks.base import Adapter, ArrayOps

_INTS = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


@jax.jit
def _bits_equal(a: jax.Array, b: jax.Array) -> jax.Array:
    # One fused kernel: unjitted, the two bitcasts and the comparison each
    # took a copy of the arrays (GBs at a 128256-column vocabulary).
    ints = _INTS[a.dtype.itemsize]
    return jnp.array_equal(jax.lax.bitcast_convert_type(a, ints), jax.lax.bitcast_convert_type(b, ints))


class JaxOps(ArrayOps):
    def f32(self, x):
        return x.astype(jnp.float32)

    def cast(self, y, like):
        return y.astype(like.dtype)

    def split(self, x, sections, axis):
        return jnp.array_split(x, sections, axis=axis)

    def sum(self, x, axis, keepdims=False):
        return jnp.sum(x, axis=axis, keepdims=keepdims)

    def amax(self, x, axis, keepdims=False):
        return jnp.max(x, axis=axis, keepdims=keepdims)

    def exp(self, x):
        return jnp.exp(x)

    def rsqrt(self, x):
        return jax.lax.rsqrt(x)

    def matmul_f32(self, a, b):
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


class JaxAdapter(Adapter):
    name = "jax"
    package = "bi_jax"
    xp = JaxOps()

    def __init__(self) -> None:
        self.device = jax.devices()[0]

    def to_native(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(np.require(a, requirements="C"), self.device)

    def to_numpy(self, t: jax.Array) -> np.ndarray:
        return np.asarray(t)

    def take_rows(self, t: jax.Array, start: int, stop: int) -> jax.Array:
        return t[start:stop]

    def bitwise_equal(self, a: jax.Array, b: jax.Array) -> bool:
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(_bits_equal(a, b))

    def count_differing_rows(self, a: jax.Array, b: jax.Array) -> int:
        ints = _INTS[a.dtype.itemsize]
        diff = jax.lax.bitcast_convert_type(a, ints) != jax.lax.bitcast_convert_type(b, ints)
        return int(jnp.sum(jnp.any(diff.reshape(diff.shape[0], -1), axis=1)))

    def synchronize(self, t) -> None:
        jax.block_until_ready(t)

    def grad(self, fn, wrt):
        def of(**kwargs):
            out, pullback = jax.vjp(lambda x: fn(**{**kwargs, wrt: x}), kwargs[wrt])
            (g,) = pullback(out)
            return g

        return of

    def primal(self, fn, wrt):
        def forward(**kwargs):
            out, _ = jax.vjp(lambda x: fn(**{**kwargs, wrt: x}), kwargs[wrt])
            return out

        return forward

"""JAX adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from harness.frameworks.base import Adapter, Fn


@jax.jit
def _bits_equal(a: jax.Array, b: jax.Array) -> jax.Array:
    # One fused kernel: unjitted, the two bitcasts and the comparison each
    # took a copy of the arrays (GBs at a 128256-column vocabulary).
    ints = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[a.dtype.itemsize]
    return jnp.array_equal(jax.lax.bitcast_convert_type(a, ints), jax.lax.bitcast_convert_type(b, ints))


class JaxAdapter(Adapter):
    name = "jax"
    package = "bi_jax"

    def __init__(self) -> None:
        self.device = jax.devices()[0]

    def to_native(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(np.require(a, requirements='C'), self.device)

    def to_numpy(self, t: jax.Array) -> np.ndarray:
        return np.asarray(t)

    def take_rows(self, t: jax.Array, start: int, stop: int) -> jax.Array:
        return t[start:stop]

    def bitwise_equal(self, a: jax.Array, b: jax.Array) -> bool:
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(_bits_equal(a, b))

    def count_differing_rows(self, a: jax.Array, b: jax.Array) -> int:
        ints = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[a.dtype.itemsize]
        diff = jax.lax.bitcast_convert_type(a, ints) != jax.lax.bitcast_convert_type(b, ints)
        return int(jnp.sum(jnp.any(diff.reshape(diff.shape[0], -1), axis=1)))

    def synchronize(self, t) -> None:
        jax.block_until_ready(t)

    def default(self, op: str) -> Fn | None:
        return _DEFAULTS.get(op)



@jax.jit
def _default_rms_norm_impl(x, weight, eps):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def _default_rms_norm(x, weight=None, eps=1e-6):
    """XLA's fused ``x * rsqrt(mean(x^2) + eps) * w`` in fp32."""
    return _default_rms_norm_impl(x, weight, eps)


_default_matmul = jax.jit(lambda a, b: jnp.dot(a, b))
_default_linear = jax.jit(lambda x, weight, bias: jnp.dot(x, weight.T) + bias)
_default_bmm = jax.jit(lambda a, b: jnp.matmul(a, b))


def _split_by_batch_matmul(a, b):
    """Control: K split into a batch-dependent number of fp32 partial products,
    as a split-K heuristic tuned per shape would."""
    splits = 1 + a.shape[0] % 4
    bounds = [a.shape[-1] * i // splits for i in range(splits + 1)]
    acc = jnp.zeros((a.shape[0], b.shape[-1]), jnp.float32)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        acc = acc + jnp.dot(a[:, lo:hi].astype(jnp.float32), b[lo:hi].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    return acc.astype(a.dtype)


def _split_by_batch_rms_norm(x, weight=None, eps=1e-6):
    """Control: a sum of squares split into a batch-dependent number of chunks."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    splits = 1 + rows.shape[0] % 4
    sumsq = jnp.zeros((rows.shape[0], 1), jnp.float32)
    for chunk in jnp.array_split(rows, splits, axis=-1):
        sumsq = sumsq + jnp.sum(chunk * chunk, axis=-1, keepdims=True)
    y = rows * jax.lax.rsqrt(sumsq / rows.shape[-1] + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype).reshape(x.shape)


def _split_by_batch_sum(x, axis=-1):
    """Control: the row split into a batch-dependent number of fp32 partial sums."""
    rows = x.astype(jnp.float32)
    splits = 1 + rows.shape[0] % 4
    total = jnp.zeros(rows.shape[0], jnp.float32)
    for chunk in jnp.array_split(rows, splits, axis=axis):
        total = total + jnp.sum(chunk, axis=axis)
    return total.astype(x.dtype)


def _split_by_batch_softmax(x, axis=-1):
    """Control: softmax whose sum of exponentials is split by batch size."""
    rows = x.astype(jnp.float32)
    e = jnp.exp(rows - jnp.max(rows, axis=axis, keepdims=True))
    return (e / jnp.expand_dims(_split_by_batch_sum(e, axis), axis)).astype(x.dtype)


_DEFAULTS: dict[str, Fn] = {
    "sum": jax.jit(lambda x, axis=-1: jnp.sum(x, axis=axis), static_argnames="axis"),
    "mean": jax.jit(lambda x, axis=-1: jnp.mean(x, axis=axis), static_argnames="axis"),
    "softmax": jax.jit(lambda x, axis=-1: jax.nn.softmax(x, axis=axis), static_argnames="axis"),
    "log_softmax": jax.jit(lambda x, axis=-1: jax.nn.log_softmax(x, axis=axis), static_argnames="axis"),
    "rms_norm": _default_rms_norm,
    "matmul": _default_matmul,
    "linear": _default_linear,
    "bmm": _default_bmm,
}
CONTROLS: dict[tuple[str, str], Fn] = {
    ("rms_norm", "split_by_batch"): _split_by_batch_rms_norm,
    ("matmul", "split_by_batch"): _split_by_batch_matmul,
    ("sum", "split_by_batch"): _split_by_batch_sum,
    ("softmax", "split_by_batch"): _split_by_batch_softmax,
}
JaxAdapter.controls = CONTROLS

"""Row reductions over the last axis: sum, mean, softmax, log_softmax.

The reduced axis is the features axis; torch's keyword is ``dim``, JAX's
``axis`` (``Impl.kwargs``).
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.controls import split_row_sums
from harness.opspec import Bench, Impl, OpSpec, Tolerance, lazy_jit

_DIM = {"dim": -1}
_AXIS = {"axis": -1}


def _inputs_offset(rng: np.random.Generator, batch: int, features: int, dtype: str):
    # Mean 1: sums grow with the row instead of cancelling (accuracy is then
    # relative), and 32000 of them still fit float16.
    x = 1.0 + rng.standard_normal((batch, features), dtype=np.float32)
    return {"x": x.astype(np_dtype(dtype))}


def _inputs_logits(rng: np.random.Generator, batch: int, features: int, dtype: str):
    x = 4.0 * rng.standard_normal((batch, features), dtype=np.float32)
    return {"x": x.astype(np_dtype(dtype))}


def _ref_log_softmax(inputs):
    x = inputs["x"].astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _read_bytes(batch: int, features: int, dtype: str) -> float:
    return float(batch * features * np_dtype(dtype).itemsize)


def _read_write_bytes(batch: int, features: int, dtype: str) -> float:
    return 2.0 * _read_bytes(batch, features, dtype)


def _split_sum(xp):
    def sum_(x, **_):
        return xp.cast(split_row_sums(xp, xp.f32(x)), x)

    return sum_


def _split_softmax(xp):
    def softmax(x, **_):
        rows = xp.f32(x)
        e = xp.exp(rows - xp.amax(rows, -1, keepdims=True))
        return xp.cast(e / split_row_sums(xp, e).reshape(-1, 1), x)

    return softmax


def _torch(fn_name: str):
    def default(x, dim=-1):
        import torch

        return getattr(torch, fn_name)(x, dim)

    default.__name__ = f"torch_{fn_name}"
    return default


def _jax(path: str):
    """``jnp.sum``, ``jax.nn.softmax``, ...: jitted with a static axis."""
    module, fn_name = path.rsplit(".", 1)

    def default(x, axis=-1):
        import importlib

        return getattr(importlib.import_module(module), fn_name)(x, axis=axis)

    default.__name__ = f"jax_{fn_name}"
    return lazy_jit(default, static_argnames="axis")


# fp32 accumulation (sum, mean) or fp32 math with approximate ex2/lg2 (a few
# 1e-7 relative), then one rounding to the output dtype.
_SUM_TOL = {
    "float32": Tolerance(rtol=2e-5, atol=1e-5),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-2),
    "float16": Tolerance(rtol=2e-3, atol=1e-3),
}
_SOFTMAX_TOL = {
    "float32": Tolerance(rtol=1e-5, atol=1e-8),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-6),
    # float16 flushes the smallest probabilities to subnormals or zero.
    "float16": Tolerance(rtol=2e-3, atol=1e-6),
}
_LOG_SOFTMAX_TOL = {
    "float32": Tolerance(rtol=1e-5, atol=1e-5),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-2),
    "float16": Tolerance(rtol=2e-3, atol=2e-3),
}
# Both backward passes read the forward's output; the cotangent of
# ``harness.grads`` is that output, rounded to the dtype as the kernel saved it.
def _grad_softmax(inputs, g):
    return g * (g - (g * g).sum(axis=-1, keepdims=True))


def _grad_log_softmax(inputs, g):
    return g - np.exp(g) * g.sum(axis=-1, keepdims=True)


def _split_softmax_grad(xp):
    """The gradient of ``x`` with its row dot product split by the batch size."""
    softmax = _split_softmax(xp)

    def grad_x(x, **_):
        y = xp.f32(softmax(x))
        return xp.cast(y * (y - split_row_sums(xp, y * y).reshape(-1, 1)), x)

    return grad_x


# A hidden size, and vocabularies (the segmented path for long rows) for softmax.
_SUM_BENCH = Bench(features=(4096, 8192), bound="memory", work=_read_bytes)
_SOFTMAX_BENCH = Bench(features=(32000, 128256), bound="memory", work=_read_write_bytes)
# One warp, masked tails, rows read in chunks; for softmax a 256k vocabulary.
_SUM_CROSS = (100, 4096, 24576)
_SOFTMAX_CROSS = (100, 4096, 32000, 262144)


def _impls(name: str, jax_path: str) -> dict[str, Impl]:
    return {
        "torch": Impl(name, _torch(name), f"torch.{name}", kwargs=_DIM, grad=True),
        "jax": Impl(name, _jax(jax_path), jax_path.replace("jax.numpy", "jnp"), kwargs=_AXIS, grad=True),
    }


SUM = OpSpec(
    name="sum", batch_arg="x", make_inputs=_inputs_offset,
    reference=lambda i: i["x"].astype(np.float64).sum(axis=-1),
    tolerances=_SUM_TOL, impls=_impls("sum", "jax.numpy.sum"), bench=_SUM_BENCH,
    controls={"split_by_batch": _split_sum}, cross_features=_SUM_CROSS,
    grads={"x": lambda i, g: np.broadcast_to(g[..., None], i["x"].shape)},
    sweeps={"float32": (4096, 24576)}, sweep_batch=16384, host_features=2048,
)
MEAN = OpSpec(
    name="mean", batch_arg="x", make_inputs=_inputs_offset,
    reference=lambda i: i["x"].astype(np.float64).mean(axis=-1),
    tolerances=_SUM_TOL, impls=_impls("mean", "jax.numpy.mean"), bench=_SUM_BENCH,
    grads={"x": lambda i, g: np.broadcast_to(g[..., None] / i["x"].shape[-1], i["x"].shape)},
    cross_features=_SUM_CROSS, sweeps={"bfloat16": (4096,)}, sweep_batch=16384, host_features=2048,
)
SOFTMAX = OpSpec(
    name="softmax", batch_arg="x", make_inputs=_inputs_logits,
    reference=lambda i: np.exp(_ref_log_softmax(i)),
    tolerances=_SOFTMAX_TOL, impls=_impls("softmax", "jax.nn.softmax"), bench=_SOFTMAX_BENCH,
    controls={"split_by_batch": _split_softmax}, cross_features=_SOFTMAX_CROSS,
    grads={"x": _grad_softmax}, grad_controls={"split_by_batch": _split_softmax_grad},
    sweeps={"bfloat16": (32000, 128256), "float32": (32000,)}, sweep_batch=4096,
    host_features=32000,
)
LOG_SOFTMAX = OpSpec(
    name="log_softmax", batch_arg="x", make_inputs=_inputs_logits,
    reference=_ref_log_softmax,
    tolerances=_LOG_SOFTMAX_TOL, impls=_impls("log_softmax", "jax.nn.log_softmax"), bench=_SOFTMAX_BENCH,
    grads={"x": _grad_log_softmax},
    cross_features=_SOFTMAX_CROSS, sweeps={"float32": (32000, 128256)}, sweep_batch=4096, host_features=32000,
)

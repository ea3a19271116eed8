"""RMSNorm over the last axis: ``x * rsqrt(mean(x**2) + eps) * weight``."""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.controls import split_row_sums
from harness.opspec import Bench, Impl, OpSpec, Tolerance, lazy_jit

EPS = 1e-6


def make_inputs(rng: np.random.Generator, batch: int, features: int, dtype: str):
    dt = np_dtype(dtype)
    x = rng.standard_normal((batch, features), dtype=np.float32).astype(dt)
    weight = (1.0 + 0.5 * rng.standard_normal(features, dtype=np.float32)).astype(dt)
    return {"x": x, "weight": weight}


def reference(inputs) -> np.ndarray:
    x = inputs["x"].astype(np.float64)
    w = inputs["weight"].astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def _bytes(batch: int, features: int, dtype: str) -> float:
    size = np_dtype(dtype).itemsize
    return float(2 * batch * features * size + features * size)  # read x, write y, read w


def _torch_default(x, weight=None, eps=EPS):
    import torch

    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@lazy_jit
def _jax_default(x, weight, eps):
    """XLA's fused ``x * rsqrt(mean(x^2) + eps) * w`` in fp32."""
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def _split_by_batch(xp):
    def rms_norm(x, weight=None, eps=EPS):
        rows = xp.f32(x.reshape(-1, x.shape[-1]))
        sumsq = split_row_sums(xp, rows * rows).reshape(-1, 1)
        y = rows * xp.rsqrt(sumsq / rows.shape[-1] + eps)
        if weight is not None:
            y = y * xp.f32(weight)
        return xp.cast(y, x).reshape(x.shape)

    return rms_norm


def _grad_x(inputs, g):
    x, w = inputs["x"], inputs["weight"]
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    gw = g * w
    return r * (gw - x * r * r * np.mean(gw * x, axis=-1, keepdims=True))


def _grad_weight(inputs, g):
    x = inputs["x"]
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    return (g * x * r).reshape(-1, x.shape[-1]).sum(axis=0)


def _split_grad(xp):
    """The gradient of ``x`` with its row dot product split by the batch size."""
    def grad_x(x, weight=None, eps=EPS):
        rows = xp.f32(x)
        r = xp.rsqrt(xp.sum(rows * rows, -1, keepdims=True) / rows.shape[-1] + eps)
        w = xp.f32(weight) if weight is not None else 1.0
        g = xp.f32(xp.cast(rows * r * w, x))
        gw = g * w
        dot = split_row_sums(xp, gw * rows).reshape(-1, 1) / rows.shape[-1]
        return xp.cast(r * (gw - rows * r * r * dot), x)

    return grad_x


SPEC = OpSpec(
    name="rms_norm",
    batch_arg="x",
    make_inputs=make_inputs,
    reference=reference,
    # fp32 math with one final rounding: a few ULPs of the output dtype.
    tolerances={
        "float32": Tolerance(rtol=1e-5, atol=1e-6),
        "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-3),
        "float16": Tolerance(rtol=2e-3, atol=1e-4),
    },
    impls={
        "torch": Impl("rms_norm", _torch_default, "torch.nn.functional.rms_norm", grad=True),
        "jax": Impl("rms_norm", lambda x, weight=None, eps=EPS: _jax_default(x, weight, eps), "XLA (fused expression)",
                    grad=True),
    },
    kwargs={"eps": EPS},
    bench=Bench(features=(4096, 8192), bound="memory", work=_bytes),
    controls={"split_by_batch": _split_by_batch},
    grads={"x": _grad_x, "weight": _grad_weight},
    grad_controls={"split_by_batch": _split_grad},
    # One warp up to masked tails, 16 warps, and rows read in chunks (24576).
    cross_features=(100, 1024, 4096, 5120, 8192, 16384, 24576),
    sweeps={"bfloat16": (4096, 8192, 24576), "float32": (4096, 8192, 24576)},
    sweep_batch=16384,
    host_features=2048,
)

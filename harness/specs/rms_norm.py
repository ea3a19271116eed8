"""RMSNorm over the last axis: ``x * rsqrt(mean(x**2) + eps) * weight``."""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.registry import BenchSpec, Tolerance, register, OpSpec

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


SPEC = register(
    OpSpec(
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
        kwargs={"eps": EPS},
        bench=BenchSpec(features=(4096, 8192), bound="memory", work=_bytes),
        controls=("split_by_batch",),
    )
)

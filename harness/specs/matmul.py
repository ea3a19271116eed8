"""Matrix product ``x @ weight`` with ``x`` of shape (batch, K) and weight (K, N).

Until ``bi_torch.matmul`` / ``bi_jax.matmul`` exist this spec serves the
negative controls: the framework defaults (cuBLAS through ``torch.matmul``,
XLA through ``jnp.dot``) must be caught varying with the batch on the GPU.
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.registry import BenchSpec, OpSpec, Tolerance, register


def make_inputs(rng: np.random.Generator, batch: int, features: int, dtype: str):
    dt = np_dtype(dtype)
    x = rng.standard_normal((batch, features), dtype=np.float32).astype(dt)
    # Scaled so that outputs stay O(1) for any K.
    weight = (rng.standard_normal((features, features), dtype=np.float32) / np.sqrt(features)).astype(dt)
    return {"x": x, "weight": weight}


def reference(inputs) -> np.ndarray:
    return inputs["x"].astype(np.float64) @ inputs["weight"].astype(np.float64)


def _flops(batch: int, features: int, dtype: str) -> float:
    return 2.0 * batch * features * features


SPEC = register(
    OpSpec(
        name="matmul",
        batch_arg="x",
        make_inputs=make_inputs,
        reference=reference,
        tolerances={
            "float32": Tolerance(rtol=1e-4, atol=1e-4),
            "bfloat16": Tolerance(rtol=2e-2, atol=2e-2),
            "float16": Tolerance(rtol=4e-3, atol=4e-3),
        },
        bench=BenchSpec(features=(4096,), bound="compute", work=_flops),
        controls=("default",),
    )
)

"""SwiGLU's gated activation: ``silu(g) * u`` of a fused ``x = [g | u]``.

The feature size is the output width ``n``; the input has ``2 n`` columns.
Elementwise: no order of a sum is involved, so there is no negative control
(no implementation varies with the batch); what the bi_ kernel fixes is the
arithmetic, which the cross-framework equality check proves.
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.opspec import Bench, Impl, OpSpec, Tolerance, lazy_jit


def _inputs(rng: np.random.Generator, batch: int, features: int, dtype: str):
    # Scale 4: gates far into both tails (exp(-g) overflowing fp16's range).
    x = 4.0 * rng.standard_normal((batch, 2 * features), dtype=np.float32)
    return {"x": x.astype(np_dtype(dtype))}


def _halves(x):
    n = x.shape[-1] // 2
    return x[..., :n], x[..., n:]


def _reference(inputs):
    g, u = _halves(inputs["x"].astype(np.float64))
    return g / (1.0 + np.exp(-g)) * u


def _grad_x(inputs, c):
    g, u = _halves(inputs["x"])
    s = 1.0 / (1.0 + np.exp(-g))
    return np.concatenate([c * u * s * (1.0 + g * (1.0 - s)), c * g * s], axis=-1)


def _torch_default(x):
    """``F.silu(g) * u``: two kernels, rounding to the dtype twice."""
    import torch

    g, u = _halves(x)
    return torch.nn.functional.silu(g) * u


def _jax_default(x):
    """``jax.nn.silu(g) * u``, one XLA fusion."""
    import jax

    g, u = _halves(x)
    return jax.nn.silu(g) * u


def _bytes(batch: int, features: int, dtype: str) -> float:
    """``[g | u]`` read, the output written."""
    return 3.0 * batch * features * np_dtype(dtype).itemsize


SPEC = OpSpec(
    name="silu_and_mul",
    batch_arg="x",
    make_inputs=_inputs,
    reference=_reference,
    # fp32 arithmetic (ex2.approx: 2 ULP) rounded once to the dtype.
    tolerances={
        "float32": Tolerance(rtol=1e-5, atol=1e-6),
        "bfloat16": Tolerance(rtol=8e-3, atol=1e-5),
        "float16": Tolerance(rtol=1e-3, atol=1e-5),
    },
    impls={
        "torch": Impl("silu_and_mul", _torch_default, "F.silu(g) * u", grad=True),
        "jax": Impl("silu_and_mul", lazy_jit(_jax_default), "jax.nn.silu(g) * u (XLA)", grad=True),
    },
    features_of=lambda inputs: inputs["x"].shape[-1] // 2,
    row_elements=lambda n: 2 * n,
    bench=Bench(features=(14336, 28672), bound="memory", work=_bytes),
    grads={"x": _grad_x},
    cross_features=(1, 100, 1000, 4096, 14336),
    sweeps={"bfloat16": (14336,)},
    host_features=14336,
)

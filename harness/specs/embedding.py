"""Embedding lookup: ``weight[ids]`` for a batch of token ids.

The batch argument is the ids (one token per row); the feature size is the
table's width. Property tests draw a 512-row table, so that a batch repeats
ids and the weight gradient adds several tokens per row; the benchmark uses
a 128256 x 4096 table (Llama 3's vocabulary and hidden size), given as
``(rows, width)`` features.
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.opspec import Bench, Impl, OpSpec, Tolerance, lazy_jit

TEST_ROWS = 512


def _shape(features) -> tuple[int, int]:
    return tuple(features) if isinstance(features, tuple) else (TEST_ROWS, int(features))


def _inputs(rng: np.random.Generator, batch: int, features, dtype: str):
    rows, width = _shape(features)
    weight = rng.standard_normal((rows, width), dtype=np.float32).astype(np_dtype(dtype))
    return {"ids": rng.integers(0, rows, (batch,)).astype(np.int64), "weight": weight}


def _reference(inputs):
    return inputs["weight"].astype(np.float64)[inputs["ids"]]


def _grad_weight(inputs, g):
    """The table's gradient: each row the sum of its tokens' output gradients."""
    out = np.zeros(inputs["weight"].shape, np.float64)
    np.add.at(out, inputs["ids"], g)
    return out


def _torch_embedding(ids, weight):
    import torch

    return torch.nn.functional.embedding(ids, weight)


def _jax_take(ids, weight):
    import jax.numpy as jnp

    return jnp.take(weight, ids, axis=0)


def _bytes(batch: int, features, dtype: str) -> float:
    """Rows read and written."""
    return 2.0 * batch * _shape(features)[1] * np_dtype(dtype).itemsize


# The forward is a gather (exact); the table's gradient adds tokens in fp32
# and rounds once to the dtype (these are its tolerances, scaled by
# harness.grads).
_TOL = {
    "float32": Tolerance(rtol=2e-5, atol=1e-5),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-2),
    "float16": Tolerance(rtol=2e-3, atol=1e-3),
}

SPEC = OpSpec(
    name="embedding", batch_arg="ids", make_inputs=_inputs, reference=_reference, tolerances=_TOL,
    impls={
        "torch": Impl("embedding", _torch_embedding, "F.embedding", grad=True),
        "jax": Impl("embedding", lazy_jit(_jax_take), "jnp.take", grad=True),
    },
    features_of=lambda inputs: inputs["weight"].shape[-1],
    bench=Bench(features=((128256, 4096),), bound="memory", work=_bytes),
    grads={"weight": _grad_weight},
)

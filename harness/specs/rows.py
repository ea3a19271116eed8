"""Row reductions over the last axis: sum, mean, softmax, log_softmax.

The reduced axis is the features axis; torch's keyword is ``dim``, JAX's
``axis`` (``OpSpec.framework_kwargs``).
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.registry import BenchSpec, OpSpec, Tolerance, register

_LAST = {"torch": {"dim": -1}, "jax": {"axis": -1}}


def _inputs_offset(rng: np.random.Generator, batch: int, features: int, dtype: str):
    # Mean 1: sums grow with the row instead of cancelling (accuracy is then
    # relative), and 32000 of them still fit float16.
    x = 1.0 + rng.standard_normal((batch, features), dtype=np.float32)
    return {"x": x.astype(np_dtype(dtype))}


def _inputs_logits(rng: np.random.Generator, batch: int, features: int, dtype: str):
    x = 4.0 * rng.standard_normal((batch, features), dtype=np.float32)
    return {"x": x.astype(np_dtype(dtype))}


def _ref_sum(inputs):
    return inputs["x"].astype(np.float64).sum(axis=-1)


def _ref_mean(inputs):
    return inputs["x"].astype(np.float64).mean(axis=-1)


def _ref_log_softmax(inputs):
    x = inputs["x"].astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _ref_softmax(inputs):
    return np.exp(_ref_log_softmax(inputs))


def _read_bytes(batch: int, features: int, dtype: str) -> float:
    return float(batch * features * np_dtype(dtype).itemsize)


def _read_write_bytes(batch: int, features: int, dtype: str) -> float:
    return 2.0 * _read_bytes(batch, features, dtype)


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

for _name, _make, _ref, _tol, _bench in (
    ("sum", _inputs_offset, _ref_sum, _SUM_TOL, BenchSpec(features=(4096, 8192), bound="memory", work=_read_bytes)),
    ("mean", _inputs_offset, _ref_mean, _SUM_TOL, BenchSpec(features=(4096, 8192), bound="memory", work=_read_bytes)),
    ("softmax", _inputs_logits, _ref_softmax, _SOFTMAX_TOL,
     BenchSpec(features=(32000, 128256), bound="memory", work=_read_write_bytes)),
    ("log_softmax", _inputs_logits, _ref_log_softmax, _LOG_SOFTMAX_TOL,
     BenchSpec(features=(32000, 128256), bound="memory", work=_read_write_bytes)),
):
    register(
        OpSpec(
            name=_name,
            batch_arg="x",
            make_inputs=_make,
            reference=_ref,
            tolerances=_tol,
            framework_kwargs=_LAST,
            bench=_bench,
            controls=("split_by_batch",) if _name in ("sum", "softmax") else (),
        )
    )

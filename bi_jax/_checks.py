"""Input validation and backend selection shared by the bi_jax ops."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from bi_core.validation import check_eps  # noqa: F401  (re-exported for the ops)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_float_array(name: str, a: object) -> None:
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be a jax.Array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in [np.dtype(d) for d in SUPPORTED_DTYPES]:
        raise TypeError(
            f"{name} has dtype {a.dtype}; supported dtypes are float32, bfloat16 and float16"
        )


def interpret_mode(op: str) -> bool:
    """Whether the Pallas kernels run in the interpreter.

    On a GPU backend the kernels are compiled; on the CPU backend they run in
    the Pallas interpreter (same kernel, same reduction structure, for tests
    and machines without a GPU). ``BI_JAX_INTERPRET=1`` forces the interpreter.
    Any other backend is refused rather than served by a non-invariant path.
    """
    if os.environ.get("BI_JAX_INTERPRET", "0") not in ("", "0"):
        return True
    backend = jax.default_backend()
    if backend == "gpu":
        return False
    if backend == "cpu":
        return True
    raise NotImplementedError(
        f"{op}: bi_jax has kernels for NVIDIA GPUs (and the CPU interpreter); backend '{backend}' is not supported"
    )

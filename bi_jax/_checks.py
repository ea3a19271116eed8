"""Input validation and backend selection shared by the bi_jax ops."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bi_core.devices import nvidia_gpu_present, requested_device
from bi_core.rows import MODES as ROW_MODES
from bi_core.validation import check_eps  # noqa: F401  (re-exported for the ops)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# The names of the bi_jax kernels' pallas_calls: the batch_invariant transform
# runs these as they are (they are the kernels it routes to) and refuses other
# Pallas kernels in strict mode.
KERNEL_NAMES = frozenset({
    "bi_attention", "bi_attention_splits", "bi_attention_merge", "bi_matmul_triton", "bi_matmul_wgmma",
    "bi_rms_norm", "bi_silu_and_mul", "bi_silu_and_mul_grad", *(f"bi_{m}{part}" for m in ROW_MODES for part in ("", "_segment_stats", "_segment_write")),
    # The backward kernels (bi_jax.ops.attention_grad, bi_jax.ops.embedding).
    *(f"bi_attention_bwd_{k}" for k in ("stats", "dkdv", "dq")), "bi_embedding_grad",
})


def check_float_array(name: str, a: object, op: str | None = None) -> None:
    where = f"{op}: " if op else ""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{where}{name} must be a jax.Array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in [np.dtype(d) for d in SUPPORTED_DTYPES]:
        raise TypeError(
            f"{where}{name} has dtype {a.dtype}; supported dtypes are float32, bfloat16 and float16"
        )


def interpret_mode(op: str) -> bool:
    """Whether the Pallas kernels run in the interpreter.

    On a GPU backend the kernels are compiled; on the CPU backend they run in
    the Pallas interpreter (same kernel, same reduction structure, for tests
    and machines without a GPU). ``BI_JAX_INTERPRET=1`` forces the interpreter.
    Any other backend is refused rather than served by a non-invariant path.

    A CPU backend on a machine whose driver sees an NVIDIA GPU usually means
    a jaxlib without its CUDA plugin: the kernels then run in the interpreter,
    thousands of times slower. That is said once, at the first use
    (``RuntimeWarning``), unless the CPU was asked for (``JAX_PLATFORMS=cpu``
    or ``BI_DEVICE=cpu``); with ``BI_DEVICE=gpu`` it is an error.
    """
    if os.environ.get("BI_JAX_INTERPRET", "0") not in ("", "0"):
        return True
    backend = jax.default_backend()
    if backend == "gpu":
        return False
    if backend == "cpu":
        _check_cpu_backend(op)
        return True
    raise NotImplementedError(
        f"{op}: bi_jax has kernels for NVIDIA GPUs (and the CPU interpreter); backend '{backend}' is not supported"
    )


_CUDA_PLUGIN_FIX = (
    "install JAX's CUDA plugin, for example pip install 'batch-invariant-kernels[jax,cuda13]' "
    "(or 'jax[cuda13]'; cuda12 for a CUDA 12 driver)"
)
_warned_cpu_backend = False


def _check_cpu_backend(op: str) -> None:
    global _warned_cpu_backend
    requested = requested_device()
    if requested == "gpu":
        raise RuntimeError(f"{op}: BI_DEVICE=gpu, but JAX has no GPU backend here: {_CUDA_PLUGIN_FIX}")
    if requested == "cpu" or _warned_cpu_backend or _cpu_asked_for():
        return
    if nvidia_gpu_present():
        _warned_cpu_backend = True
        warnings.warn(
            f"bi_jax: this machine has an NVIDIA GPU but JAX runs on the CPU (a jaxlib without its CUDA plugin), "
            f"so {op} and every other bi_jax kernel run in the Pallas interpreter, thousands of times slower. "
            f"To use the GPU, {_CUDA_PLUGIN_FIX}. To run on the CPU on purpose, set JAX_PLATFORMS=cpu; "
            "BI_DEVICE=gpu makes this an error.",
            RuntimeWarning,
            stacklevel=4,
        )


def _cpu_asked_for() -> bool:
    """Whether JAX was told to use the CPU (``JAX_PLATFORMS=cpu``)."""
    return "cpu" in str(jax.config.jax_platforms or "").split(",")

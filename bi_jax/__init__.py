"""Batch-invariant Pallas kernels for JAX.

Same op names and semantics as ``bi_torch``; on the same inputs the two give
the same bits on the GPU.
"""

from bi_jax.ops.matmul import dot_general, linear, matmul
from bi_jax.ops.rms_norm import rms_norm

__all__ = ["dot_general", "linear", "matmul", "rms_norm"]
__version__ = "0.1.0"

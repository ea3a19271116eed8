"""Batch-invariant Pallas kernels for JAX.

Same op names and semantics as ``bi_torch``; on the same inputs the two give
the same bits on the GPU.
"""

from bi_jax.ops.activation import silu_and_mul
from bi_jax.ops.attention import attention, dot_product_attention, paged_attention, varlen_attention
from bi_jax.ops.embedding import embedding
from bi_jax.ops.matmul import dot_general, einsum, linear, matmul
from bi_jax.ops.rms_norm import rms_norm
from bi_jax.ops.rows import log_softmax, mean, softmax, sum
from bi_jax.transform import BatchVarianceRisk, batch_invariant

__all__ = [
    "BatchVarianceRisk",
    "attention",
    "batch_invariant",
    "dot_general",
    "dot_product_attention",
    "einsum",
    "embedding",
    "linear",
    "log_softmax",
    "matmul",
    "mean",
    "paged_attention",
    "rms_norm",
    "silu_and_mul",
    "softmax",
    "sum",
    "varlen_attention",
]
__version__ = "0.1.0"

"""Batch-invariant Triton kernels for PyTorch.

Every op returns, for each row of its input, bits that do not depend on how
many rows were computed together or where the row sat in the batch.
"""

from bi_torch import _checks

if _checks.interpreting():
    # Triton's CPU interpreter: two upstream defects fixed while it is active.
    from bi_torch import _interpreter

    _interpreter.apply()

from bi_torch.ops.activation import silu_and_mul
from bi_torch.ops.attention import attention, paged_attention, scaled_dot_product_attention, varlen_attention
from bi_torch.ops.embedding import embedding
from bi_torch.ops.matmul import linear, matmul
from bi_torch.ops.rms_norm import rms_norm
from bi_torch.ops.rows import log_softmax, mean, softmax, sum
from bi_torch.mode import BatchVarianceRisk, is_batch_invariant_mode_enabled, set_batch_invariant_mode
from bi_torch.compile import compile_backend
from bi_torch.switch import (
    BatchVarianceWarning,
    disable_batch_invariant_mode,
    enable_batch_invariant_mode,
    is_batch_invariant_mode,
)

__all__ = [
    "BatchVarianceRisk",
    "BatchVarianceWarning",
    "attention",
    "compile_backend",
    "disable_batch_invariant_mode",
    "embedding",
    "enable_batch_invariant_mode",
    "is_batch_invariant_mode",
    "is_batch_invariant_mode_enabled",
    "linear",
    "log_softmax",
    "matmul",
    "mean",
    "paged_attention",
    "rms_norm",
    "scaled_dot_product_attention",
    "set_batch_invariant_mode",
    "silu_and_mul",
    "softmax",
    "sum",
    "varlen_attention",
]
__version__ = "0.1.0"

from bi_torch import switch as _switch  # noqa: E402

_switch._from_environment()  # BI_BATCH_INVARIANT=1: the process-wide switch on at import

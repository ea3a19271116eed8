"""Batch-invariant Triton kernels for PyTorch.

Every op returns, for each row of its input, bits that do not depend on how
many rows were computed together or where the row sat in the batch.
"""

from bi_torch.ops.matmul import linear, matmul
from bi_torch.ops.rms_norm import rms_norm
from bi_torch.ops.rows import log_softmax, mean, softmax, sum

__all__ = ["linear", "log_softmax", "matmul", "mean", "rms_norm", "softmax", "sum"]
__version__ = "0.1.0"

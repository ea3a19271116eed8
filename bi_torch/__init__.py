"""Batch-invariant Triton kernels for PyTorch.

Every op returns, for each row of its input, bits that do not depend on how
many rows were computed together or where the row sat in the batch.
"""

from bi_torch.ops.matmul import linear, matmul
from bi_torch.ops.rms_norm import rms_norm

__all__ = ["linear", "matmul", "rms_norm"]
__version__ = "0.1.0"

"""Framework-neutral numerics contracts shared by ``bi_torch`` and ``bi_jax``.

Each module here fixes, for one op, everything that decides the order of its
floating-point reductions (block sizes, chunk counts, warps, exact PTX for the
scalar epilogue) as a function of the reduced length and dtype only. Both
framework packages read the same contract, which is what lets a Triton kernel
launched from PyTorch and a Pallas kernel launched from JAX produce the same
bits.
"""

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

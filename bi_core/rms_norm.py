"""Reduction contract for RMSNorm."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

# Rows up to this many elements are held in registers and read once; longer
# rows are reduced in chunks of CHUNK elements (fp32 partial per lane).
MAX_FUSED = 16384
CHUNK = 8192


@dataclass(frozen=True)
class RmsNormConfig:
    block: int
    num_chunks: int
    num_warps: int
    inv_n: float  # fp32 value of 1/n


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def f32(value: float) -> float:
    """Round a Python float to the nearest fp32 value."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_hex(value: float) -> str:
    """PTX immediate for an fp32 value (``0fXXXXXXXX``)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


@lru_cache(maxsize=None)
def rms_norm_config(n: int) -> RmsNormConfig:
    """Kernel shape for rows of ``n`` elements. Depends on ``n`` only."""
    if n <= 0:
        raise ValueError(f"row length must be positive, got {n}")
    if n <= MAX_FUSED:
        block, chunks = max(_next_pow2(n), 16), 1
    else:
        block, chunks = CHUNK, -(-n // CHUNK)
    # About 16 fp32 values per thread up to 4096-element blocks, 32 above
    # (fewer warps to combine), 1..16 warps.
    num_warps = min(max(block // 512 if block <= 4096 else block // 1024, 1), 16)
    return RmsNormConfig(block=block, num_chunks=chunks, num_warps=num_warps, inv_n=f32(1.0 / n))


@lru_cache(maxsize=None)
def rstd_asm(inv_n: float, eps: float) -> str:
    """PTX for ``1 / sqrt(sumsq * inv_n + eps)`` with every step IEEE-rounded.

    ``$1`` is the fp32 sum of squares and ``$0`` the result. The ``.rn``
    suffixes forbid contraction into an FMA and approximate square roots, so
    every compiler that emits this string computes the same bits.
    """
    return (
        "{ .reg .f32 t; "
        f"mul.rn.f32 t, $1, {f32_hex(inv_n)}; "
        f"add.rn.f32 t, t, {f32_hex(eps)}; "
        "sqrt.rn.f32 t, t; "
        "rcp.rn.f32 $0, t; }"
    )

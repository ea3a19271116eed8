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


@dataclass(frozen=True)
class SumTree:
    """The order in which a row's ``block`` squares are added.

    Element ``(r * threads + t) * vec + v`` of the row is ``x[r, t, v]``. The
    ``vec`` values of each ``(r, t)`` are added in adjacent pairs, level by
    level, then the ``reps`` results of each ``t`` likewise, and the last
    ``threads`` values are left to the compiler's cross-thread reduction (a
    lane butterfly, then the warps), which both Triton compilers emit alike.

    Written out with reductions of size 2 only (``a + b == b + a``), so that no
    compiler can associate it differently. ``tl.sum`` over a thread's
    registers is not such an order: triton 3.6 adds them in sequence and the
    Triton inside jaxlib 0.11 in pairs, which is why the two frameworks'
    sums differed in about 20 % of rows before this tree was written out
    (``bench/probe_reduction_order.py``). The shape follows the blocked layout
    that both compilers give a row (one 16-byte vector per thread, repeated),
    so every level is register arithmetic.
    """

    reps: int
    threads: int
    vec: int


@lru_cache(maxsize=None)
def sum_tree(block: int, num_warps: int, itemsize: int) -> SumTree:
    """The reduction tree of a ``block``-element row loaded from ``itemsize``-byte values."""
    threads = min(32 * num_warps, block)
    vec = max(1, min(16 // itemsize, block // threads))
    reps = block // (threads * vec)
    # The kernels write out up to 4 pair levels for each of vec and reps.
    assert reps * threads * vec == block and reps <= 16 and vec <= 16, (block, num_warps, itemsize)
    return SumTree(reps=reps, threads=threads, vec=vec)


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

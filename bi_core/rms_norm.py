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


# Column slices (``column_split``): few rows would leave most multiprocessors
# idle while one program per row reads, scales and writes its whole row. A row
# is then written by several programs, one column slice of at least MIN_SLICE
# elements each; every one of them reduces the whole row with the same tree
# (the extra reads hit L2), so the row's sum, and with it every output bit, is
# the same as with one program per row.
MIN_SLICE = 128
# On an H100 (bench/NOTES.md, "RMSNorm v5"; bf16, N = 4096 and 8192), 4 slices
# per row were the fastest at M <= 16 and 2 to 4 at M = 32; more slices lost
# to the extra reads of the row (64 slices: 2.2 against 1.6 us at M = 8), and
# any split lost from M = 64 on.
SPLIT_TARGET_PROGRAMS = 64
MAX_SPLIT = 4


@lru_cache(maxsize=None)
def column_split(rows: int, n: int) -> int:
    """Programs per row (a power of two, 1 for no split) for ``rows`` rows of
    ``n`` elements. A speed choice only: any split gives the same bits."""
    if rows >= SPLIT_TARGET_PROGRAMS:
        return 1
    most = max(1, min(MAX_SPLIT, rms_norm_config(n).block // MIN_SLICE))
    return min(most, _next_pow2(-(-SPLIT_TARGET_PROGRAMS // rows)))


# The programs of a split launch are numbered slice first (grid (split, rows)),
# so that the programs of one row are launched next to each other. On an H100
# (bench/NOTES.md, "RMSNorm v7") that made a bf16 launch of 8192 columns
# 0.03-0.16 us faster at 8-48 rows than numbering rows first. A speed choice
# only: each program computes the same values either way.
def slices_adjacent(split: int) -> bool:
    """Whether a ``split``-way launch numbers a row's slices consecutively."""
    return split > 1


# Loading the weight before the reduction hides its latency, which matters
# when a launch is one wave of short programs, but keeps it live across the
# reduction: 78 registers per thread at N = 8192 on an H100, 3 programs per
# multiprocessor, so 512 rows took two waves. From this many rows the weight is
# loaded after the reduction. A speed choice only: the arithmetic is the same.
EARLY_WEIGHT_BELOW_ROWS = 384


def early_weight(rows: int) -> bool:
    """Whether a launch over ``rows`` rows loads the weight before the reduction."""
    return rows < EARLY_WEIGHT_BELOW_ROWS


@dataclass(frozen=True)
class RmsNormLaunch:
    """How a launch over a batch spreads its rows over programs: a speed
    choice only, the arithmetic of every row is the same whatever it is.

    ``split`` programs per row (``column_split``), numbered slice first when
    ``adjacent`` (``slices_adjacent``), loading the weight before the
    reduction when ``early_weight`` (``early_weight``).
    """

    split: int = 1
    adjacent: bool = False
    early_weight: bool = True

    def __post_init__(self) -> None:
        if self.split < 1 or self.split & (self.split - 1):
            raise ValueError(f"split must be a power of two, got {self.split}")


def launch_config(rows: int, n: int) -> RmsNormLaunch:
    """The shipped launch policy for ``rows`` rows of ``n`` elements."""
    split = column_split(rows, n)
    return RmsNormLaunch(split=split, adjacent=slices_adjacent(split), early_weight=early_weight(rows))


@dataclass(frozen=True)
class SumTree:
    """The order in which a row's ``block`` fp32 values are added (RMSNorm's
    squares, the row ops' elements or exponentials).

    Element ``(r * threads + t) * vec + v`` of the row is ``x[r, t, v]``. The
    ``vec`` values of each ``(r, t)`` are added in adjacent pairs, level by
    level, then the ``reps`` results of each ``t`` likewise. The last
    ``threads`` values, ``t = w * lanes + l``, are added as a warp butterfly
    does it: pairs ``l, l ^ lanes/2`` first, down to ``l, l ^ 1``, then the
    warps' sums, pairs ``w, w ^ warps/2`` first.

    Written out with reductions of size 2 only (``a + b == b + a``), so that no
    compiler can associate it differently. ``tl.sum`` over a thread's
    registers is not such an order: triton 3.6 adds them in sequence and the
    Triton inside jaxlib 0.11 in pairs, which is why the two frameworks'
    sums differed in about 20 % of rows before this tree was written out
    (bench/NOTES.md, "Cross-framework bits").

    The last ``threads`` values are written out only where the compilers'
    register layout can vary (``explicit_threads``). Rows whose length in
    bytes is a multiple of 16 are loaded in 16-byte vectors by both compilers
    whatever the number of rows (both kernels take the row length as a
    compile-time constant), so ``threads`` is the layout's thread count and
    the compilers' own cross-thread reduction (a lane butterfly, then the
    warps) adds in the order above: on an H100 both frameworks' sums equal
    the tree replayed in numpy (bench/NOTES.md, "Row alignment and the
    one-row JAX launch"). Other rows get a layout that depends on facts outside the row: Pallas folds the row
    index of a one-program grid to the constant 0, which makes the row look
    aligned, so a one-row batch was loaded in vectors and its sums left the
    butterfly's order (2 ULP in fp32 softmax at 1869 columns on an H100).
    Such rows take the written-out levels, which no layout can change.
    """

    reps: int
    threads: int
    vec: int
    explicit_threads: bool = False

    @property
    def lanes(self) -> int:
        return min(self.threads, 32)

    @property
    def warps(self) -> int:
        return self.threads // self.lanes


# Rows whose length in bytes is a multiple of this are loaded in vectors of this
# many bytes by both Triton compilers, for any number of rows.
VECTOR_BYTES = 16


@lru_cache(maxsize=None)
def sum_tree(block: int, num_warps: int, itemsize: int, n: int) -> SumTree:
    """The reduction tree of an ``n``-element row held in ``block`` lanes,
    loaded from ``itemsize``-byte values."""
    threads = min(32 * num_warps, block)
    vec = max(1, min(16 // itemsize, block // threads))
    reps = block // (threads * vec)
    # The kernels write out up to 4 pair levels for each of vec, reps and the
    # warps, 5 for the lanes.
    assert reps * threads * vec == block and reps <= 16 and vec <= 16, (block, num_warps, itemsize)
    assert threads <= 32 or threads % 32 == 0 and threads // 32 <= 16, (block, num_warps)
    return SumTree(reps=reps, threads=threads, vec=vec, explicit_threads=(n * itemsize) % VECTOR_BYTES != 0)


def reduce_tree(v, tree: SumTree, xp, explicit_threads: bool | None = None, elementwise: bool = False):
    """The sum of a ``reps * threads * vec``-element fp32 vector ``v`` in the tree's order,
    as a 1-element array, with array module ``xp`` (``jax.numpy`` inside the
    Pallas kernel, ``numpy`` to replay the kernels' sums on the host).

    Every level sums an axis of size 2. The cross-thread levels are written
    out when ``explicit_threads`` (default: ``tree.explicit_threads``), else
    left to ``xp.sum`` (the compiler's cross-thread reduction in a kernel).

    ``elementwise`` writes each level as an add of two slices instead of a sum
    over a size-2 axis. The Pallas interpreter needs it: XLA:CPU merges chained
    reductions into one reduction over several axes, whose order it picks per
    fusion, and its fusions change with the shape of the array the kernel reads
    (one row's fp32 ``sum`` at 65 columns had other bits alone than in a batch
    of 4). Elementwise IEEE adds cannot be merged or reassociated.
    """
    explicit = tree.explicit_threads if explicit_threads is None else explicit_threads

    def pairs(x, axis):
        if not elementwise:
            return xp.sum(x, axis=axis)
        first = [slice(None)] * x.ndim
        second = list(first)
        first[axis], second[axis] = 0, 1
        return x[tuple(first)] + x[tuple(second)]

    reps, threads = tree.reps, tree.threads
    x = v.reshape(reps * threads, tree.vec)
    while x.shape[1] > 1:
        x = pairs(x.reshape(reps * threads, x.shape[1] // 2, 2), 2)
    x = x.reshape(reps, threads)
    while x.shape[0] > 1:
        x = pairs(x.reshape(x.shape[0] // 2, 2, threads), 1)
    if not explicit:
        return xp.sum(x.reshape(threads), axis=0, keepdims=True)
    warps, lanes = tree.warps, tree.lanes
    x = x.reshape(warps, lanes)
    while x.shape[1] > 1:  # x[w, l] + x[w, l + half]: one butterfly level
        x = pairs(x.reshape(warps, 2, x.shape[1] // 2), 1)
    x = x.reshape(warps)
    while x.shape[0] > 1:
        x = pairs(x.reshape(2, x.shape[0] // 2), 0)
    return x.reshape(1)


@lru_cache(maxsize=None)
def rstd_asm(inv_n: float, eps: float) -> str:
    """PTX for ``rsqrt(sumsq * inv_n + eps)``.

    ``$1`` is the fp32 sum of squares and ``$0`` the result. The mean and the
    ``eps`` are IEEE-rounded (``.rn`` also forbids contracting them into an
    FMA); the reciprocal square root is one ``rsqrt.approx.f32``, the hardware
    instruction (relative error below 2**-22, the same bits on every run and
    from every compiler that emits this string). A correctly rounded
    ``rcp.rn(sqrt.rn(.))`` gives other bits and took about 0.05 us longer per
    launch on an H100 (bench/NOTES.md, "RMSNorm v6"): at small M this epilogue
    is on the critical path of the whole kernel.
    """
    return (
        "{ .reg .f32 t; "
        f"mul.rn.f32 t, $1, {f32_hex(inv_n)}; "
        f"add.rn.f32 t, t, {f32_hex(eps)}; "
        "rsqrt.approx.f32 $0, t; }"
    )

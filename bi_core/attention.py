"""Reduction contract for attention, followed by bi_torch and bi_jax.

One output row is one query row ``q[s, p, h]`` (sequence ``s``, absolute
position ``p``, head ``h``). Its bits depend only on that row and on the keys
and values of ``s`` at the positions it attends to: not on the batch, on where
``s`` sits in a packed batch, on whether ``p`` is computed in one prefill, in
chunks or one token at a time, on the KV-cache page size or page order, nor on
the longest sequence of the batch. This is how:

* Keys are walked in **blocks of ``block_n(head_dim)`` keys at absolute
  positions** ``[b * n, (b + 1) * n)``, from the lowest block up. Block
  boundaries never follow the query tile, the chunk or the batch.
* Blocks are grouped into **splits of ``SPLIT`` keys** (also at absolute
  positions). Within a split, a row's scores are folded block after block
  with the online softmax (running maximum ``m``, sum ``l`` and fp32
  accumulator ``acc``, started empty at every split):

      m' = max(m, max_j(qk_j) * c)          c = scale * log2(e), rounded to fp32
      p_j = 2 ** fma(qk_j, c, -m')          (masked keys: p_j = 0)
      p~ = p rounded to v's dtype
      l' = fma(l, 2 ** (m - m'), (p~ @ ones)[:, 0])
      acc' = acc * 2 ** (m - m') + p~ @ v   (each product from zero in fp32,
                                            then one rounded multiply and
                                            one add)

  The row sum is a tile product (against a block of ones) like ``p~ @ v``, not a
  reduction: a reduction's order follows the register layout of the tile,
  which the tile config and each framework's compiler choose (on the H200 a
  ``tl.sum`` made bi_torch and bi_jax differ in a few elements per million,
  and a 16-row tile differ from a 64-row one).

* With an additive bias ``b`` (the drop-ins' float mask), the exponent is
  ``t_j = fma(qk_j, c, b_j * log2(e))`` (the product rounded to fp32),
  ``m' = max(m, max_j t_j)`` and ``p_j = 2 ** (t_j - m')``; a boolean mask hides
  keys as the causal and window bounds do.
* The splits' partial results are then folded **in split order**,
  ``s = 0, 1, 2, ...`` (``M' = max(M, m_s)``, ``L' = L a + l_s b``,
  ``ACC' = ACC a + acc_s b`` with ``a = 2 ** (M - M')``, ``b = 2 ** (m_s - M')``;
  each product rounded, then one fused add, as ``FOLD_ASM``), and the output
  is ``ACC / L`` (correctly rounded), rounded once to the output dtype. A row
  with no visible key gives zeros.

The fold in split order is what lets the splits be spread over programs at
small batch (split-KV decode) or walked inside one program (prefill) with the
same bits: both run the same arithmetic on the same partials. A block or
split with no visible key for a row leaves that row's state bit for bit as
it was (``2 ** 0 = 1``, ``p = 0``), so a program may walk more blocks than a
given row needs: its tile's range.

Which rows share a program (the query tile, the heads of a GQA group packed
into it), how many programs the splits are spread over and the pipelining
depth are chosen for speed and change no bits: the suite proves every config
the dispatch can pick (``tile_configs``) against the others.

The steps with a transcendental or a rounding that compilers might reorder
are written as PTX (below), so that the two frameworks' Triton compilers emit
the same instructions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bi_core.rms_norm import f32_hex

# Keys per split (a whole number of blocks): part of the contract, as is
# ``block_n``; changing either changes the bits. On the H200, bf16, head dim
# 128, 128-key blocks ran a causal prefill at 258 / 322 TFLOP/s (S = 4k / 16k)
# against 241 / 294 with 64 (bench/NOTES.md, attention v1); 256 keys do not
# fit shared memory at head dim 256.
SPLIT = 512


def block_n(head_dim: int) -> int:
    """Keys per block for ``head_dim``."""
    return 64 if head_dim > 128 else 128

HEAD_DIMS = (64, 128, 256)

# Rows of a program's tile: (query, head of the GQA group) pairs.
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    num_warps: int
    num_stages: int


# Shared memory of an H100/H200 block (227 KB): the pipeline keeps two stages
# of a tile's key and value blocks (and of its mask or bias tile) only when
# they fit, with the query tile resident.
SHARED_MEMORY = 232448


def _stages(block_m: int, head_dim: int, itemsize: int, score_bytes: int) -> int:
    n = block_n(head_dim)
    per_stage = 2 * n * head_dim * itemsize + block_m * n * score_bytes
    return 2 if block_m * head_dim * itemsize + 2 * per_stage <= SHARED_MEMORY else 1


def tile_configs(head_dim: int, itemsize: int = 2, score_bytes: int = 0) -> tuple[TileConfig, ...]:
    """Every tile config the dispatch may use for ``head_dim``, inputs of
    ``itemsize`` bytes and ``score_bytes`` bytes per score of mask and bias
    (0 without; 1 for a mask, 4 for an fp32 bias), smallest tile first. The
    suite proves them bitwise equal (``harness.attention.check_tile_configs``);
    the stage count never changes the arithmetic."""
    check_head_dim(head_dim)
    # 16 rows (the smallest tensor-core tile) for decode: one query of a
    # 4-head GQA group fills 4 of them, against 4 of 64. On the H200 (bf16,
    # 32/8 heads, head dim 128) it read the cache 1.85-2.35x faster than the
    # 64-row tile (bench/NOTES.md, attention v2).
    shapes = ((16, 4), (64, 8)) if head_dim == 256 else ((16, 4), (64, 4), (128, 8))
    # Two stages of fp32 key and value blocks at head dim 128 (64 KB each),
    # or of a bf16 tile with an fp32 bias at 128 rows, do not fit.
    return tuple(TileConfig(m, w, _stages(m, head_dim, itemsize, score_bytes)) for m, w in shapes)


def tile_config(head_dim: int, rows: int, itemsize: int = 2, score_bytes: int = 0) -> TileConfig:
    """The tile for ``rows`` query rows per (sequence, KV head): the 16-row
    tile when they fit it (decode), the largest for prefill-sized work, the
    middle one between."""
    configs = tile_configs(head_dim, itemsize, score_bytes)
    if rows <= configs[0].block_m:
        return configs[0]
    return configs[-1] if rows >= 4 * configs[-1].block_m else configs[1]


def check_head_dim(head_dim: int, op: str = "attention") -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim {head_dim} is not supported; supported head dims are "
                         f"{', '.join(map(str, HEAD_DIMS))}")


def check_shapes(op: str, names, shapes, dtypes, q_dims: int, kv_dims: int) -> int:
    """The framework-neutral checks of (q, k, v): ranks, one dtype, one K/V
    shape, one head dim (a supported one), query heads a multiple of KV heads.
    ``dtypes`` are comparable values (strings); returns the GQA group size."""
    (qn, kn, vn), (qs, ks, vs) = names, [tuple(s) for s in shapes]
    if len(qs) != q_dims:
        raise ValueError(f"{op}: {qn} must have {q_dims} dimensions, got shape {qs}")
    for name, shape in ((kn, ks), (vn, vs)):
        if len(shape) != kv_dims:
            raise ValueError(f"{op}: {name} must have {kv_dims} dimensions, got shape {shape}")
    if len(set(dtypes)) != 1:
        raise TypeError(f"{op}: {qn}, {kn} and {vn} must have one dtype, got {', '.join(map(str, dtypes))}")
    if ks != vs:
        raise ValueError(f"{op}: {kn} and {vn} must have the same shape, got {ks} and {vs}")
    if ks[-1] != qs[-1]:
        raise ValueError(f"{op}: head dims differ: {qn} has {qs[-1]}, {kn} and {vn} have {ks[-1]}")
    check_head_dim(qs[-1], op)
    hq, hkv = qs[-2], ks[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: {hq} query heads are not a multiple of {hkv} key/value heads")
    return hq // hkv


def qk_scale(scale: float | None, head_dim: int, op: str = "attention") -> float:
    """``scale * log2(e)`` rounded to fp32 (the default scale is ``1/sqrt(E)``),
    computed once on the host in float64, as both frameworks pass it."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    s = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{op}: scale must be a positive finite number, got {scale!r}")
    return float(np.float32(s * math.log2(math.e)))


# Effectively unbounded window sides (fit int32 arithmetic in the kernels).
UNBOUNDED = 1 << 30


def window_sides(causal: bool, window, op: str = "attention") -> tuple[int, int]:
    """(left, right): a query at position p sees keys in [p - left, p + right].

    ``window`` is None, an int ``w`` (the same as ``(w, w)``, as
    ``jax.nn.dot_product_attention``'s ``local_window_size``) or a pair
    ``(left, right)``, where ``-1`` or None means unbounded on that side
    (flash-attn's ``window_size``; an int -1 is unbounded on both sides).
    ``causal`` sets ``right`` to 0."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__} {causal!r}")
    left = right = UNBOUNDED
    if window is not None:
        if isinstance(window, (tuple, list)):
            if len(window) != 2:
                raise ValueError(f"{op}: window must be an int or a (left, right) pair, got {window!r}")
            sides = [UNBOUNDED if w is None or (_is_int(w) and w == -1) else w for w in window]
        else:
            sides = [UNBOUNDED if _is_int(window) and window == -1 else window] * 2
        for w in sides:
            if not _is_int(w) or w < 0:
                raise ValueError(f"{op}: window sides must be non-negative ints (-1: unbounded), got {window!r}")
        left, right = (min(int(w), UNBOUNDED) for w in sides)
    if causal:
        right = 0
    return left, right


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_split_kv(split_kv, op: str = "attention") -> None:
    if split_kv is not None and not isinstance(split_kv, (bool, np.bool_)):
        raise TypeError(f"{op}: split_kv must be True, False or None, got {split_kv!r}")


def check_max_seqlen(value, name: str, op: str) -> int | None:
    """None, or a non-negative Python int (it sizes the launch grid)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")
    return int(value)


def backward_packed(cu_seqlens_q, cu_seqlens_k, kv_lengths, max_seqlen_q, max_seqlen_k) -> bool:
    """Whether a backward call is over packed sequences (both offsets given,
    with both host maxima, and no key lengths), or refuses the mix."""
    packed = cu_seqlens_q is not None
    if packed != (cu_seqlens_k is not None) or (packed and kv_lengths is not None):
        raise ValueError("attention backward: cu_seqlens_q and cu_seqlens_k go together, without kv_lengths")
    if packed and (max_seqlen_q is None or max_seqlen_k is None):
        raise ValueError("attention backward: packed sequences need max_seqlen_q and max_seqlen_k")
    return packed


INT32_MAX = 2**31 - 1


def num_splits(max_kv_len: int) -> int:
    """Splits that cover ``max_kv_len`` keys."""
    return max(1, -(-max_kv_len // SPLIT))


# Tiles of at least this many rows (prefill) walk the blocks that every row of
# the tile sees whole without the bounds' selects, which would keep each score
# as it is: speed only, same bits. On the H200 (bf16, 32/8 heads, head dim 128,
# causal) it ran prefill 1.06 / 1.15 / 1.21x as fast at 1k / 4k / 16k keys;
# 16-row decode tiles ran 0.94-1.02x, so they keep the selects (bench/NOTES.md,
# attention v4).
WHOLE_BLOCKS_FROM_ROWS = 64

# Causal (or windowed to the left) prefill grids of at most this many
# programs run their tiles last first: the longest rows start in the first
# wave and the grid's tail is short tiles. Measured on the H200 (bf16, 32/8
# heads of 128, B = 1): 4 % faster at 1k (256 programs) and 9 % at 4k (1024);
# 4 % slower at 16k (4096 programs) and 2 % at B = 16, 4k, where many waves
# hide the tail. A schedule only: the bits are the same in either order.
REVERSE_UP_TO_PROGRAMS = 2048

# Spread the splits over programs when fewer programs than this would run
# otherwise (about the SM count of an H100/H200): speed only, same bits.
SPREAD_BELOW_PROGRAMS = 132


def spread_splits(programs: int, max_kv_len: int, sm_count: int = SPREAD_BELOW_PROGRAMS) -> bool:
    return num_splits(max_kv_len) > 1 and programs < sm_count


_LOG2E = 1.4426950408889634
LOG2E_F32 = float(np.float32(_LOG2E))

# $0 = 2 ** fma($1, $2, $3)
EXP2_FMA_ASM = "{ .reg .f32 t; fma.rn.f32 t, $1, $2, $3; ex2.approx.f32 $0, t; }"
# $0 = 2 ** ($1 - $2)
EXP2_DIFF_ASM = "{ .reg .f32 t; sub.rn.f32 t, $1, $2; ex2.approx.f32 $0, t; }"
# $0 = $1 * $2 + $3 (fused)
FMA_ASM = "fma.rn.f32 $0, $1, $2, $3;"
# $0 = $1 * $2 + $3 * $4: the second product rounded, then one fused add.
FOLD_ASM = "{ .reg .f32 t; mul.rn.f32 t, $3, $4; fma.rn.f32 $0, $1, $2, t; }"
# $0 = $1 * $2, rounded (never contracted into a following add)
MUL_ASM = "mul.rn.f32 $0, $1, $2;"
# $0 = $1 + $2
ADD_ASM = "add.rn.f32 $0, $1, $2;"
# $0 = $1 / $2, correctly rounded
DIV_ASM = "div.rn.f32 $0, $1, $2;"

def backward_blocks(head_dim: int) -> tuple[int, int]:
    """(query rows, keys) per tile of the fused attention backward
    (``bi_torch.ops.attention_grad``, ``bi_jax.ops.attention_grad``). Part of its contract: each gradient
    element sums its tiles in a fixed order, so these sizes fix the bits."""
    return (32, 32) if head_dim > 128 else (64, 64)


class BackwardLaunch(NamedTuple):
    """One kernel of the fused attention backward: its tile (query rows,
    keys) and Triton launch settings."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


BACKWARD_KERNELS = ("stats", "dkdv", "dq")

# From this many queries or keys, the gradient kernels walk the tiles that see
# every key without the mask, in runs of their own (the same values and
# order, so the same bits either way). On an H100 (bf16, D = 128, causal,
# bench/NOTES.md), against the single loop: 2-9 % faster at 4096, 1-6 % at
# 2048, 2-4 % slower at 1024, where the single loop stays.
MASK_FREE_FROM = 2048


def backward_launches(head_dim: int) -> dict[str, BackwardLaunch]:
    """The launch of each backward kernel (``BACKWARD_KERNELS``) at
    ``head_dim``: the contract's tiles (``backward_blocks``), four warps, and
    the measured pipelining depths."""
    block_m, block_n = backward_blocks(head_dim)
    # Two pipeline stages for the gradient kernels: on an H100 at D = 128, bf16,
    # dK/dV took 7.1 ms against 9.6 ms with three (bench/NOTES.md), dQ 9.1
    # against 9.7, with the same bits (the stages change when tiles load, not
    # how they are summed).
    return {"stats": BackwardLaunch(block_m, block_n), "dkdv": BackwardLaunch(block_m, block_n, 4, 2),
            "dq": BackwardLaunch(block_m, block_n, 4, 2)}


__all__ = [
    "block_n",
    "SPLIT",
    "HEAD_DIMS",
    "TileConfig",
    "tile_config",
    "tile_configs",
    "qk_scale",
    "window_sides",
    "num_splits",
    "spread_splits",
    "f32_hex",
    "backward_blocks",
    "BackwardLaunch",
    "BACKWARD_KERNELS",
    "MASK_FREE_FROM",
    "backward_launches",
]


"""Reduction contract for the row ops: sum, mean, softmax, log_softmax.

A row (the reduced trailing dims, flattened) is reduced by one program, with
the block, warps and chunk count of ``row_config`` (a function of the row
length only) and the sum order of
``bi_core.rms_norm.SumTree``. Rows longer than ``MAX_FUSED`` are read in
chunks of ``CHUNK`` elements, accumulated per element in chunk order, then
summed with the same tree (sum, mean). Maxima are exact in any order.

softmax and log_softmax over such rows work in segments of ``CHUNK``
elements: segment ``c`` has its maximum ``m_c`` and ``s_c``, the tree's sum of
``exp(x - m_c)``; the segments are then folded in order, ``c = 0, 1, ...``,
into the row's maximum ``M`` and ``S = sum exp(x - M)``
(``M' = max(M, m_c)``, ``S' = S * exp(M - M') + s_c * exp(m_c - M')``, as
``FOLD_ASM``), and every output is computed from ``x``, ``M`` and ``S``. The
segment statistics and the fold can run in one program per row, or in one
program per segment with the fold in a second kernel; the arithmetic is the
same, so the choice (``split_segments``, from the number of rows) is for
speed only.

The transcendental steps are written as PTX so that both Triton compilers
emit the same instructions: ``exp(x - m)`` as ``ex2.approx`` of an IEEE-rounded
``(x - m) * log2(e)``, ``log(s)`` as ``lg2.approx`` times ``ln 2``, the mean's
division as ``div.rn`` and softmax's ``1 / s`` as ``rcp.rn`` (each output is
``exp(x - m)`` times that reciprocal: one multiply per element instead of a
division, at most one more rounding in fp32).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from bi_core.rms_norm import CHUNK, MAX_FUSED, RmsNormConfig, f32_hex, rms_norm_config, sum_tree  # noqa: F401

MODES = ("sum", "mean", "softmax", "log_softmax")

LOG2E_HEX = f32_hex(1.4426950408889634)
LN2_HEX = f32_hex(0.6931471805599453)

# $0 = exp($1 - $2)
EXP_ASM = (
    "{ .reg .f32 t; sub.rn.f32 t, $1, $2; "
    f"mul.rn.f32 t, t, {LOG2E_HEX}; ex2.approx.f32 $0, t; }}"
)
# $0 = log($1)
LOG_ASM = f"{{ .reg .f32 t; lg2.approx.f32 t, $1; mul.rn.f32 $0, t, {LN2_HEX}; }}"
# $0 = $1 / $2, correctly rounded
DIV_ASM = "div.rn.f32 $0, $1, $2;"
# $0 = 1 / $1, correctly rounded
RCP_ASM = "rcp.rn.f32 $0, $1;"
# $0 = $1 * $2 + $3 * $4: the product of $3 and $4 rounded, then one fused
# multiply-add (the fold of a segment's sum into the running sum).
FOLD_ASM = "{ .reg .f32 t; mul.rn.f32 t, $3, $4; fma.rn.f32 $0, $1, $2, t; }"

# Warps for rows read in chunks: on an H100, softmax at 32000 columns took
# 6.2 us at M = 1 and 207 us at M = 4096 with 16 warps, against 7.5 and 242 us
# with 8 (bench/NOTES.md, row ops v3).
CHUNKED_WARPS = 16


@lru_cache(maxsize=None)
def row_config(n: int) -> RmsNormConfig:
    """Kernel shape for rows of ``n`` elements (a function of ``n`` only):
    RMSNorm's, with ``CHUNKED_WARPS`` warps for rows read in chunks."""
    cfg = rms_norm_config(n)
    return replace(cfg, num_warps=CHUNKED_WARPS) if cfg.num_chunks > 1 else cfg


# One program per segment (and a second kernel for the fold) below this many
# rows: one program per row would leave most of the GPU's SMs idle there.
SPLIT_BELOW_ROWS = 128
# Above this many segments a row is always one program: the second kernel's
# programs each fold every segment of their row.
MAX_SPLIT_SEGMENTS = 64


# A launch that is not recorded into a CUDA graph (torch's eager calls) costs
# about 5 us of host time, more than the split saves in GPU time on rows of a
# few segments (32000 columns at M = 1 on an H100: 3.6 us split against 6.2 us
# one program per row, bench/NOTES.md "v4"): such rows, up to this many
# segments, stay one launch there.
ONE_LAUNCH_SEGMENTS = 4


def split_segments(rows: int, n: int, eager: bool = False) -> bool:
    """Whether softmax/log_softmax of ``rows`` rows of ``n`` elements runs one
    program per segment; ``eager``: each launch costs host time (a torch call
    outside CUDA-graph capture). Either way gives the same bits (see above)."""
    segments = row_config(n).num_chunks
    if eager and segments <= ONE_LAUNCH_SEGMENTS:
        return False
    return 1 < segments <= MAX_SPLIT_SEGMENTS and rows < SPLIT_BELOW_ROWS

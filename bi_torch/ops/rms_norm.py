"""RMSNorm over the last axis: Triton kernel and launcher.

One program normalises one row, or, for few rows, one column slice of a row
after reducing the whole row (``bi_core.rms_norm.column_split``). The block
size, the number of warps and the number of column chunks depend only on the
row length (and so does the Triton specialisation, because inputs are made
contiguous and aligned first), never on the number of rows, so the reduction
order of every row is fixed by its length; the slices change only which
program writes an output, not how it is computed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bi_torch import direct as _direct
from bi_torch._checks import (
    check_eps,
    check_float_tensor,
    check_launchable,
    check_row_length,
    canonical,
    interpreting,
)
from bi_torch import _plan
from bi_torch._launch import fast, recording
from bi_torch.ops import grad as _grad
from bi_core.rms_norm import RmsNormLaunch, SumTree, launch_config, rms_norm_config, rstd_asm, sum_tree

__all__ = ["rms_norm", "launch"]


@triton.jit
def _square(x, PTX: tl.constexpr):
    if PTX:
        # mul.rn cannot be contracted into the following adds, so the sum of
        # squares is the same whatever FMA policy the compiler applies.
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return x * x


@triton.jit
def _pair_lanes(x, WARPS: tl.constexpr, HALF: tl.constexpr):
    """``x[w, l] + x[w, l + HALF]``: one level of a warp butterfly."""
    return tl.sum(tl.reshape(x, (WARPS, 2, HALF)), axis=1)


@triton.jit
def _pair_warps(x, HALF: tl.constexpr):
    """``x[w] + x[w + HALF]``."""
    return tl.reshape(tl.sum(tl.reshape(x, (2, HALF)), axis=0), (HALF,))


@triton.jit
def _sum_tree(
    v,
    REPS: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
    EXPLICIT: tl.constexpr,
    LANES: tl.constexpr,
    WARPS: tl.constexpr,
):
    """Sum of a row in the order of ``bi_core.rms_norm.SumTree``: every level
    is a sum of pairs, which no compiler can reassociate; the cross-thread
    levels are left to ``tl.sum`` unless ``EXPLICIT``."""
    x = tl.reshape(v, (REPS * THREADS, VEC))
    if VEC >= 2:
        x = tl.sum(tl.reshape(x, (REPS * THREADS, VEC // 2, 2)), axis=2)
    if VEC >= 4:
        x = tl.sum(tl.reshape(x, (REPS * THREADS, VEC // 4, 2)), axis=2)
    if VEC >= 8:
        x = tl.sum(tl.reshape(x, (REPS * THREADS, VEC // 8, 2)), axis=2)
    if VEC >= 16:
        x = tl.sum(tl.reshape(x, (REPS * THREADS, VEC // 16, 2)), axis=2)
    x = tl.reshape(x, (REPS, THREADS))
    if REPS >= 2:
        x = tl.sum(tl.reshape(x, (REPS // 2, 2, THREADS)), axis=1)
    if REPS >= 4:
        x = tl.sum(tl.reshape(x, (REPS // 4, 2, THREADS)), axis=1)
    if REPS >= 8:
        x = tl.sum(tl.reshape(x, (REPS // 8, 2, THREADS)), axis=1)
    if REPS >= 16:
        x = tl.sum(tl.reshape(x, (REPS // 16, 2, THREADS)), axis=1)
    if not EXPLICIT:
        return tl.sum(tl.reshape(x, (THREADS,)), axis=0, keep_dims=True)
    x = tl.reshape(x, (WARPS, LANES))
    if LANES >= 32:
        x = _pair_lanes(x, WARPS, LANES // 2)
    if LANES >= 16:
        x = _pair_lanes(x, WARPS, 8)
    if LANES >= 8:
        x = _pair_lanes(x, WARPS, 4)
    if LANES >= 4:
        x = _pair_lanes(x, WARPS, 2)
    if LANES >= 2:
        x = _pair_lanes(x, WARPS, 1)
    x = tl.reshape(x, (WARPS,))
    if WARPS >= 16:
        x = _pair_warps(x, 8)
    if WARPS >= 8:
        x = _pair_warps(x, 4)
    if WARPS >= 4:
        x = _pair_warps(x, 2)
    if WARPS >= 2:
        x = _pair_warps(x, 1)
    return x


def _tree_args(tree: SumTree) -> dict:
    """The constexpr arguments of ``_sum_tree`` that a kernel passes through."""
    return dict(REPS=tree.reps, THREADS=tree.threads, VEC=tree.vec, EXPLICIT=tree.explicit_threads,
                LANES=tree.lanes, WARPS=tree.warps)


@triton.jit
def _rstd(sumsq, RSTD_ASM: tl.constexpr, INV_N: tl.constexpr, EPS: tl.constexpr, PTX: tl.constexpr):
    if PTX:
        # IEEE-rounded mul and add, then the hardware rsqrt, written out so
        # that the bits do not depend on the compiler's choice of rsqrt
        # (bi_core.rms_norm.rstd_asm). The interpreter path below is the
        # correctly rounded 1 / sqrt: CPU runs have bits of their own.
        return tl.inline_asm_elementwise(
            RSTD_ASM, "=r,r", [sumsq], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / tl.sqrt(sumsq * INV_N + EPS)


@triton.jit
def _store_rstd(rstd_ptr, row, part, rstd):
    """The row's normalising factor (shape [1]), written by its first slice's program."""
    if part == 0:
        tl.store(rstd_ptr + row + tl.arange(0, 1), rstd)


@fast
@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    # A constant, as in the Pallas kernel: the compiler then knows the
    # alignment of every row (see bi_core.rms_norm.SumTree).
    n_cols: tl.constexpr,
    RSTD_ASM: tl.constexpr,
    INV_N: tl.constexpr,
    EPS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    REPS: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
    EXPLICIT: tl.constexpr,
    LANES: tl.constexpr,
    WARPS: tl.constexpr,
    PTX: tl.constexpr,
    SPLIT: tl.constexpr,
    ADJACENT: tl.constexpr,
    EARLY_WEIGHT: tl.constexpr,
    WRITE_RSTD: tl.constexpr = False,
):
    # Grid (SPLIT, rows) when a row's slices are launched together, else
    # (rows, SPLIT). 64-bit row offset: tensors past 2**31 elements.
    if ADJACENT:
        row = tl.program_id(1).to(tl.int64)
        part = tl.program_id(0)
    else:
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    # With SPLIT > 1 this program writes one column slice of each chunk, and
    # still reduces the whole row (bi_core.rms_norm.column_split).
    SLICE: tl.constexpr = BLOCK // SPLIT
    slice_cols = part * SLICE + tl.arange(0, SLICE)
    if NUM_CHUNKS == 1:
        # The whole row stays in registers: one read of x.
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if SPLIT > 1:
            # The slice is loaded again (an L1/L2 hit) rather than taken out of
            # the row's registers; both loads are issued before the reduction.
            mask = slice_cols < n_cols
            x_out = tl.load(x_row + slice_cols, mask=mask, other=0.0).to(tl.float32)
            out_cols = slice_cols
        else:
            x_out = x
            out_cols = cols
        if HAS_WEIGHT and EARLY_WEIGHT:
            # Issued before the reduction so that its latency overlaps it.
            w = tl.load(w_ptr + out_cols, mask=mask, other=0.0).to(tl.float32)
        sumsq = _sum_tree(_square(x, PTX), REPS, THREADS, VEC, EXPLICIT, LANES, WARPS)
        rstd = _rstd(sumsq, RSTD_ASM, INV_N, EPS, PTX)
        if WRITE_RSTD:
            _store_rstd(rstd_ptr, row, part, rstd)
        y = x_out * rstd
        if HAS_WEIGHT:
            if not EARLY_WEIGHT:
                w = tl.load(w_ptr + out_cols, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        tl.store(y_row + out_cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Long rows: fp32 partial sums per element over fixed-size chunks, then
        # the tree; the chunk count is a function of the row length.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            acc += _square(x, PTX)
        rstd = _rstd(_sum_tree(acc, REPS, THREADS, VEC, EXPLICIT, LANES, WARPS), RSTD_ASM, INV_N, EPS, PTX)
        if WRITE_RSTD:
            _store_rstd(rstd_ptr, row, part, rstd)
        for c in tl.static_range(NUM_CHUNKS):
            offs = c * BLOCK + slice_cols
            mask = offs < n_cols
            y = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Batch-invariant RMSNorm over the last dimension.

    Same semantics as ``torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)``
    except that all arithmetic is fp32 and the result is rounded once to
    ``x.dtype``: ``y = x * rsqrt(mean(x**2) + eps) * weight``.

    Args:
        x: CUDA tensor of dtype float32, bfloat16 or float16, any leading dims.
        weight: optional tensor of shape ``(x.shape[-1],)`` in one of those dtypes.
        eps: non-negative float added to the mean square.

    Each output row depends only on its own input row: not on how many rows are
    in ``x`` nor where the row sits.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.rms_norm(rms_norm, x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x, weight, eps, with_rstd=False):
    key = _plan_key(x, weight, eps, with_rstd)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(x, weight)
    if _grad.needed(x, weight):
        return _grad.rms_norm(x, weight, eps, with_rstd)
    op = "rms_norm_with_rstd" if with_rstd else "rms_norm"
    check_float_tensor("x", x, op)
    if x.ndim == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{op}: the normalised (last) dimension of x is empty: shape {tuple(x.shape)}")
    if weight is not None:
        check_float_tensor("weight", weight, op)
        if tuple(weight.shape) != (n,):
            raise ValueError(
                f"{op}: weight must have shape ({n},) to match x.shape[-1], got {tuple(weight.shape)}"
            )
        if weight.device != x.device:
            raise ValueError(f"{op}: x is on {x.device} but weight is on {weight.device}")
    eps = check_eps(eps)
    check_row_length(op, n)
    check_launchable(op, x)

    x2d = canonical(x.reshape(-1, n))
    w = canonical(weight) if weight is not None else None
    y = torch.empty_like(x2d)
    rstd = torch.empty(x2d.shape[0], dtype=torch.float32, device=x.device) if with_rstd else None
    with recording() as launches:
        if x2d.shape[0]:
            launch(x2d, w, y, eps, rstd=rstd)
    if key is not None and _plan.same_memory((x, x2d), (weight, w)):
        bound = _plan.single(launches, _rms_norm_kernel, 4)
        if bound is not None:
            _PLANS.add(key, _norm_plan(bound, x.shape, x.dtype, x.device, with_rstd))
    y = y.view(x.shape)
    return y if rstd is None else (y, rstd.view(*x.shape[:-1], 1))


_PLANS = _plan.Plans("rms_norm")


def planned(x, weight, eps, with_rstd=False):
    """``rms_norm`` (``with_rstd``: ``rms_norm_with_rstd``) by a plan made
    before (``bi_torch._plan``), or None where there is none."""
    key = _plan_key(x, weight, eps, with_rstd)
    plan = _PLANS.get(key) if key is not None else None
    return None if plan is None else plan(x, weight)


def _plan_key(x, weight, eps, with_rstd):
    if not _plan.ENABLED or type(eps) not in (float, int) or not _plan.plain(x, weight):
        return None
    return _plan.signature(x), _plan.signature(weight), eps, with_rstd, _plan.current_device()


def _norm_plan(bound, shape, dtype, device, with_rstd):
    """A planned norm: the output (and the rstd), then the one bound launch
    (``x``, the weight or a stand-in, ``y``, the rstd or a stand-in)."""
    empty = _plan.allocator(shape, dtype, device)
    empty_rstd = _plan.allocator((*shape[:-1], 1), torch.float32, device)

    def plan(x, weight):
        y = empty()
        if not with_rstd:
            bound(x, x if weight is None else weight, y, y)
            return y
        rstd = empty_rstd()
        bound(x, x if weight is None else weight, y, rstd)
        return y, rstd
    return plan


def rms_norm_with_rstd(x: torch.Tensor, weight: torch.Tensor | None = None,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm` and, from the same kernel, each row's fp32
    ``rsqrt(mean(x**2) + eps)``, shaped ``x.shape[:-1] + (1,)`` (the second
    output of ``aten::_fused_rms_norm``): the factor the row was normalised
    with, as batch-invariant as the row."""
    return _rms_norm(x, weight, eps, with_rstd=True)


def launch(x2d: torch.Tensor, w: torch.Tensor | None, y: torch.Tensor, eps: float,
           config: RmsNormLaunch | None = None, rstd: torch.Tensor | None = None) -> None:
    """The kernel over the rows of ``x2d`` (contiguous, aligned) into ``y``,
    with the launch ``config`` (default: ``bi_core.rms_norm.launch_config``).

    The launcher under :func:`rms_norm`, and the one entry point for probes
    and tests that need a given launch; any config gives the same bits.
    ``rstd``: fp32 ``(rows,)``, written with each row's normalising factor.
    """
    m, n = x2d.shape
    cfg = rms_norm_config(n)
    config = launch_config(m, n) if config is None else config
    tree = sum_tree(cfg.block, cfg.num_warps, x2d.element_size(), n)
    _rms_norm_kernel[(config.split, m) if config.adjacent else (m, config.split)](
        x2d,
        w if w is not None else x2d,
        y,
        rstd if rstd is not None else y,
        n,
        RSTD_ASM=rstd_asm(cfg.inv_n, eps),
        INV_N=cfg.inv_n,
        EPS=eps,
        HAS_WEIGHT=w is not None,
        BLOCK=cfg.block,
        NUM_CHUNKS=cfg.num_chunks,
        **_tree_args(tree),
        PTX=not interpreting(),
        SPLIT=config.split,
        ADJACENT=config.adjacent,
        EARLY_WEIGHT=config.early_weight,
        WRITE_RSTD=rstd is not None,
        num_warps=cfg.num_warps,
    )

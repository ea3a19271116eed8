"""Row reductions: sum, mean, softmax and log_softmax (Triton kernel and launchers).

One program reduces one row (the reduced dims, moved last and flattened). The
block, warps, chunking and the order of every sum come from ``bi_core.rows``
and depend on the row length only, never on the number of rows.
"""

from __future__ import annotations

import builtins
import math
import operator

import torch
import triton
import triton.language as tl

from bi_core.rows import DIV_ASM, EXP_ASM, FOLD_ASM, LOG_ASM, RCP_ASM, row_config, split_segments, sum_tree
from bi_torch import direct as _direct
from bi_torch._checks import (
    SUPPORTED_DTYPES,
    canonical,
    check_float_tensor,
    check_launchable,
    check_row_length,
    interpreting,
)
from bi_torch import _plan
from bi_torch._launch import capturing, fast, recording
from bi_torch.ops import grad as _grad
from bi_torch.ops.rms_norm import _sum_tree, _tree_args

__all__ = ["sum", "mean", "softmax", "log_softmax", "launch"]

# The PTX strings as compile-time constants of the kernels.
_EXP_ASM = tl.constexpr(EXP_ASM)
_LOG_ASM = tl.constexpr(LOG_ASM)
_DIV_ASM = tl.constexpr(DIV_ASM)
_RCP_ASM = tl.constexpr(RCP_ASM)
_FOLD_ASM = tl.constexpr(FOLD_ASM)


@triton.jit
def _exp(x, m, PTX: tl.constexpr):
    """exp(x - m) (see bi_core.rows)."""
    if PTX:
        return tl.inline_asm_elementwise(_EXP_ASM, "=r,r,r", [x, m], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x - m)


@triton.jit
def _log(s, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(_LOG_ASM, "=r,r", [s], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log(s)


@triton.jit
def _div(a, b, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(_DIV_ASM, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a / b


@triton.jit
def _rcp(s, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(_RCP_ASM, "=r,r", [s], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / s


@triton.jit
def _fold_term(run, scale, s, scale_s, PTX: tl.constexpr):
    """run * scale + s * scale_s (see bi_core.rows.FOLD_ASM)."""
    if PTX:
        return tl.inline_asm_elementwise(
            _FOLD_ASM, "=r,r,r,r,r", [run, scale, s, scale_s], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return run * scale + s * scale_s


@triton.jit
def _load_segment(x_row, c, n_cols, BLOCK: tl.constexpr):
    """Segment ``c`` of a row in fp32, -inf past the end (no access at all
    for a segment wholly past it)."""
    offs = c * BLOCK + tl.arange(0, BLOCK)
    return tl.load(x_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)


@triton.jit
def _segment_stats(
    x, BLOCK: tl.constexpr,
    REPS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr, EXPLICIT: tl.constexpr,
    LANES: tl.constexpr, WARPS: tl.constexpr, PTX: tl.constexpr,
):
    """A loaded segment's maximum and the tree's sum of exp(x - max), as
    1-element tensors (an all -inf segment: -inf and 0)."""
    m = tl.max(x, axis=0, keep_dims=True)
    base = tl.where(m == float("-inf"), 0.0, m)
    s = _sum_tree(_exp(x, tl.broadcast_to(base, [BLOCK]), PTX), REPS, THREADS, VEC, EXPLICIT, LANES, WARPS)
    return m, s


@triton.jit
def _fold(run_m, run_s, m, s, PTX: tl.constexpr):
    """The running maximum and sum of exponentials after one more segment."""
    new_m = tl.maximum(run_m, m)
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, _fold_term(run_s, _exp(run_m, base, PTX), s, _exp(m, base, PTX), PTX)


@triton.jit
def _write_segment(x_row, y_row, c, n_cols, M, S, MODE: tl.constexpr, BLOCK: tl.constexpr, PTX: tl.constexpr):
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    m = tl.broadcast_to(M, [BLOCK])
    if MODE == "softmax":
        y = _exp(x, m, PTX) * tl.broadcast_to(_rcp(S, PTX), [BLOCK])
    else:
        y = (x - m) - tl.broadcast_to(_log(S, PTX), [BLOCK])
    tl.store(y_row + offs, y.to(y_row.dtype.element_ty), mask=mask)


@fast
@triton.jit
def _segment_stats_kernel(
    x_ptr, m_ptr, s_ptr,
    n_cols: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    REPS: tl.constexpr, THREADS: tl.constexpr, VEC: tl.constexpr, EXPLICIT: tl.constexpr,
    LANES: tl.constexpr, WARPS: tl.constexpr, PTX: tl.constexpr,
):
    """One program per segment: its statistics, to ``m_ptr``/``s_ptr[row, c]``."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    x = _load_segment(x_ptr + row * n_cols, c, n_cols, BLOCK)
    m, s = _segment_stats(x, BLOCK, REPS, THREADS, VEC, EXPLICIT, LANES, WARPS, PTX)
    at = row * NUM_CHUNKS + c + tl.arange(0, 1)
    tl.store(m_ptr + at, m)
    tl.store(s_ptr + at, s)


@fast
@triton.jit
def _segment_write_kernel(
    x_ptr, m_ptr, s_ptr, y_ptr,
    n_cols: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, PTX: tl.constexpr,
):
    """One program per segment: the fold of its row's segments, then its outputs."""
    row = tl.program_id(0).to(tl.int64)
    run_m = tl.full([1], float("-inf"), tl.float32)
    run_s = tl.zeros([1], tl.float32)
    for c in range(NUM_CHUNKS):
        at = row * NUM_CHUNKS + c + tl.arange(0, 1)
        run_m, run_s = _fold(run_m, run_s, tl.load(m_ptr + at), tl.load(s_ptr + at), PTX)
    _write_segment(x_ptr + row * n_cols, y_ptr + row * n_cols, tl.program_id(1), n_cols, run_m, run_s, MODE, BLOCK, PTX)


@fast
@triton.jit
def _row_kernel(
    x_ptr,
    y_ptr,
    # A constant, as in the Pallas kernel: the compiler then knows the
    # alignment of every row (see bi_core.rms_norm.SumTree).
    n_cols: tl.constexpr,
    MODE: tl.constexpr,
    N_F32: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    REPS: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
    EXPLICIT: tl.constexpr,
    LANES: tl.constexpr,
    WARPS: tl.constexpr,
    PTX: tl.constexpr,
):
    # 64-bit row offset: tensors past 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    if MODE == "sum" or MODE == "mean":
        if NUM_CHUNKS == 1:
            acc = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        else:
            # Per-element partial sums over the chunks in order, then the tree.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                offs = c * BLOCK + cols
                acc += tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        total = _sum_tree(acc, REPS, THREADS, VEC, EXPLICIT, LANES, WARPS)
        if MODE == "mean":
            total = _div(total, tl.full([1], N_F32, tl.float32), PTX)
        tl.store(y_ptr + row + tl.arange(0, 1), total.to(y_ptr.dtype.element_ty))
    else:
        y_row = y_ptr + row * n_cols
        if NUM_CHUNKS == 1:
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m = tl.broadcast_to(tl.max(x, axis=0, keep_dims=True), [BLOCK])
            e = _exp(x, m, PTX)
            s = _sum_tree(e, REPS, THREADS, VEC, EXPLICIT, LANES, WARPS)
            if MODE == "softmax":
                y = e * tl.broadcast_to(_rcp(s, PTX), [BLOCK])
            else:
                y = (x - m) - tl.broadcast_to(_log(s, PTX), [BLOCK])
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            # Segments (bi_core.rows): their statistics folded in order, then
            # a second pass over the row for the outputs.
            # Segment c + 1 is loaded before segment c is reduced, so that
            # its loads are in flight during the reduction.
            run_m = tl.full([1], float("-inf"), tl.float32)
            run_s = tl.zeros([1], tl.float32)
            x = _load_segment(x_row, 0, n_cols, BLOCK)
            for c in range(NUM_CHUNKS):
                ahead = _load_segment(x_row, c + 1, n_cols, BLOCK)
                m, s = _segment_stats(x, BLOCK, REPS, THREADS, VEC, EXPLICIT, LANES, WARPS, PTX)
                run_m, run_s = _fold(run_m, run_s, m, s, PTX)
                x = ahead
            for c in range(NUM_CHUNKS):
                _write_segment(x_row, y_row, c, n_cols, run_m, run_s, MODE, BLOCK, PTX)


def launch(op: str, x2d: torch.Tensor, out: torch.Tensor, split: bool | None = None) -> None:
    """Run ``op`` (one of ``bi_core.rows.MODES``) over the rows of ``x2d``
    (contiguous, aligned) into ``out``. ``split`` forces one program per
    segment (True) or per row (False) for softmax/log_softmax over long rows;
    by default ``bi_core.rows.split_segments`` picks, for an eager launch
    unless a CUDA graph is being recorded. Both give the same bits.

    The launcher under the row ops, and the one entry point for probes and
    tests that need a given strategy."""
    m, n = x2d.shape
    check_row_length(op, n)
    if m == 0:
        return
    cfg = row_config(n)
    tree = _tree_args(sum_tree(cfg.block, cfg.num_warps, x2d.element_size(), n))
    ptx = not interpreting()
    if split is None:
        split = op in ("softmax", "log_softmax") and split_segments(m, n, eager=not capturing())
    if split:
        if op not in ("softmax", "log_softmax") or cfg.num_chunks == 1:
            raise ValueError(f"{op}: only softmax and log_softmax over rows of more than {cfg.block} elements run in segments")
        stats = torch.empty((2, m, cfg.num_chunks), dtype=torch.float32, device=x2d.device)
        grid = (m, cfg.num_chunks)
        _segment_stats_kernel[grid](
            x2d, stats[0], stats[1], n, BLOCK=cfg.block, NUM_CHUNKS=cfg.num_chunks, **tree, PTX=ptx,
            num_warps=cfg.num_warps,
        )
        _segment_write_kernel[grid](
            x2d, stats[0], stats[1], out, n, MODE=op, BLOCK=cfg.block, NUM_CHUNKS=cfg.num_chunks, PTX=ptx,
            num_warps=cfg.num_warps,
        )
        return
    _row_kernel[(m,)](
        x2d, out, n,
        MODE=op, N_F32=float(n), BLOCK=cfg.block, NUM_CHUNKS=cfg.num_chunks,
        **tree, PTX=ptx,
        num_warps=cfg.num_warps,
    )


def _check_input(op: str, x, dtype) -> torch.Tensor:
    check_float_tensor("x", x, op)
    if dtype is not None:
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")
        x = x.to(dtype)  # as torch: the input is cast before the op
    check_launchable(op, x)
    return x


def _dims(op: str, x: torch.Tensor, dim) -> tuple[int, ...]:
    """Normalised, sorted, distinct dims; None or () means every dim. A dim is
    anything ``operator.index`` takes (ints, numpy integers, 0-d integer
    tensors), as torch accepts."""
    if dim is None:
        dims = tuple(range(x.ndim))
    elif isinstance(dim, (tuple, list)):
        dims = tuple(dim) or tuple(range(x.ndim))
    else:
        dims = (dim,)
    rank = builtins.max(x.ndim, 1)
    out = []
    for d in dims:
        if isinstance(d, bool):
            raise TypeError(f"{op}: dim must be an int or a tuple of ints, got {dim!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"{op}: dim must be an int or a tuple of ints, got {dim!r}") from None
        if not -rank <= d < rank:
            raise IndexError(f"{op}: dim {d} is out of range for a tensor of {x.ndim} dimensions")
        out.append(d % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: dim {dim!r} repeats a dimension")
    return tuple(sorted(out)) if x.ndim else ()


def _reduce(op: str, x: torch.Tensor, dim, keepdim: bool, dtype) -> torch.Tensor:
    key = _plan_key(op, x, dim, dtype, keepdim)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(x)
    if _grad.needed(x):
        return _grad.reduce(op, x, dim, keepdim, dtype)
    given = x
    x = _check_input(op, x, dtype)
    dims = _dims(op, x, dim)
    kept = [d for d in range(x.ndim) if d not in dims]
    n = math.prod(x.shape[d] for d in dims)
    out_shape = [x.shape[d] for d in kept]
    moved = x.permute(*kept, *dims) if x.ndim else x
    x2d = canonical(moved.reshape(math.prod(out_shape), n))
    launches = []
    if n == 0:
        # As torch: the empty sum is 0 and the empty mean is nan.
        out = torch.full((x2d.shape[0],), 0.0 if op == "sum" else math.nan, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((x2d.shape[0],), dtype=x.dtype, device=x.device)
        with recording() as launches:
            launch(op, x2d, out)
    out = out.reshape([1 if d in dims else s for d, s in enumerate(x.shape)] if keepdim else out_shape)
    if key is not None and _plan.same_memory((given, x2d)):
        bound = _plan.single(launches, _row_kernel, 2)
        if bound is not None:
            _PLANS.add(key, _rows_plan((bound,), tuple(out.shape), x.dtype, x.device))
    return out


def _normalise(op: str, x: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    key = _plan_key(op, x, dim, dtype)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(x)
    if _grad.needed(x):
        return _grad.normalise(op, x, dim, dtype)
    given = x
    x = _check_input(op, x, dtype)
    if x.ndim == 0:
        x1 = x.reshape(1, 1)
        return _normalise(op, x1, -1, None).reshape(())
    if dim is None or isinstance(dim, (tuple, list)):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    (d,) = _dims(op, x, dim)
    if x.numel() == 0:
        return torch.empty_like(x)  # as torch.softmax: an empty result of the same shape
    moved = x.movedim(d, -1)
    n = moved.shape[-1]
    x2d = canonical(moved.reshape(-1, n))
    out = torch.empty_like(x2d)
    with recording() as launches:
        launch(op, x2d, out)
    out = out.reshape(moved.shape).movedim(-1, d)
    if key is not None and d == x.ndim - 1 and _plan.same_memory((given, x2d)):
        bound = _bind_rows(launches)
        if bound is not None:
            _PLANS.add(key, _rows_plan(bound, tuple(out.shape), x.dtype, x.device))
    return out


def _bind_rows(launches):
    """The bound launches of a normalisation: one row kernel, or the two
    segment kernels followed by the statistics' shape (None: neither)."""
    if len(launches) == 1:
        rows = _plan.single(launches, _row_kernel, 2)
        return None if rows is None else (rows,)
    if len(launches) == 2:
        stats = _plan.single(launches[:1], _segment_stats_kernel, 3)
        write = _plan.single(launches[1:], _segment_write_kernel, 4)
        if stats is not None and write is not None:
            return stats, write, tuple(launches[0].args[1].shape)
    return None


_PLANS = _plan.Plans("rows")


def _plan_key(op, x, dim, dtype, keepdim=None):
    """The signature of a row op's call (None: no plan). Plans run the op in
    ``x``'s dtype (a ``dtype`` that casts takes the full path)."""
    if not _plan.ENABLED or (dtype is not None and dtype != getattr(x, "dtype", None)) or not _plan.plain(x):
        return None
    if type(dim) is list or type(dim) is tuple:
        if not all(type(d) is int for d in dim):
            return None
        dim = tuple(dim)
    elif dim is not None and type(dim) is not int:
        return None  # numpy integers, 0-d tensors: the full path reads them
    # softmax's launches depend on whether a CUDA graph records them
    # (bi_core.rows.split_segments); the reductions' do not.
    graph = capturing() if keepdim is None else None
    return op, _plan.signature(x), dim, dtype, keepdim, _plan.current_device(), graph


def planned(op, x, dim, dtype=None, keepdim=None):
    """A row op's call by a plan made before (``bi_torch._plan``), or None
    where there is none: ``keepdim`` None for softmax and log_softmax, a bool
    for sum and mean."""
    key = _plan_key(op, x, dim, dtype, keepdim)
    plan = _PLANS.get(key) if key is not None else None
    return None if plan is None else plan(x)


def _rows_plan(bound, shape, dtype, device):
    """A planned row op: the output, then one bound launch (``x``, the
    output), or two over segments (``x`` and the statistics, then the
    outputs too; ``bound`` then ends with the statistics' shape)."""
    empty = _plan.allocator(shape, dtype, device)
    if len(bound) == 1:
        (rows,) = bound

        def plan(x):
            out = empty()
            rows(x, out)
            return out
        return plan
    stats_kernel, write_kernel, stats_shape = bound
    stats = _plan.allocator((2, *stats_shape), torch.float32, device)

    def plan(x):
        out = empty()
        m, s = stats().unbind(0)
        stats_kernel(x, m, s)
        write_kernel(x, m, s, out)
        return out
    return plan


def sum(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.sum(x, dim, keepdim, dtype=dtype)`` for float tensors.

    fp32 accumulation in a fixed order that depends on the reduced size only,
    one rounding to the output dtype (``dtype`` if given, else ``x.dtype``).
    Any dims; those that are not last are moved there by a copy.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.sum(sum, x, dim, keepdim, dtype)
    return _reduce("sum", x, dim, keepdim, dtype)


def mean(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.mean(x, dim, keepdim, dtype=dtype)``: the sum of
    ``sum`` divided (correctly rounded, in fp32) by the number of elements."""
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.mean(mean, x, dim, keepdim, dtype)
    return _reduce("mean", x, dim, keepdim, dtype)


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.softmax(x, dim, dtype=dtype)``.

    fp32 math: the row maximum, ``exp(x - max)``, their sum in a fixed order,
    each exponential times the correctly rounded ``1 / sum``, and one rounding
    to the output dtype.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.softmax(softmax, x, dim, dtype)
    return _normalise("softmax", x, dim, dtype)


def log_softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.log_softmax(x, dim, dtype=dtype)``:
    ``(x - max) - log(sum(exp(x - max)))`` in fp32, rounded once."""
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.log_softmax(log_softmax, x, dim, dtype)
    return _normalise("log_softmax", x, dim, dtype)

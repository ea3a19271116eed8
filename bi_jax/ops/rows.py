"""Row reductions: sum, mean, softmax and log_softmax (Pallas kernel and launchers).

Lowered through Pallas's Triton backend for the reason given in
``bi_jax/ops/rms_norm.py``: the kernel is the program that ``bi_torch`` runs
(block, warps, sum tree and PTX from ``bi_core.rows``), so that the two
frameworks give the same bits.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_core.rows import DIV_ASM, EXP_ASM, FOLD_ASM, LOG_ASM, RCP_ASM, row_config, split_segments, sum_tree
from bi_jax._checks import SUPPORTED_DTYPES, check_float_array, interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops._row_launch import launch_rows
from bi_jax.ops.grad import with_rows_backward
from bi_jax.ops.rms_norm import _sum_tree

__all__ = ["sum", "mean", "softmax", "log_softmax", "launch"]



def _asm(asm, *args):
    return pltriton.elementwise_inline_asm(
        asm,
        args=list(args),
        constraints="=r," + ",".join("r" for _ in args),
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)],
    )[0]


def _exp(x, m, ptx):
    return _asm(EXP_ASM, x, m) if ptx else jnp.exp(x - m)


def _log(s, ptx):
    return _asm(LOG_ASM, s) if ptx else jnp.log(s)


def _div(a, b, ptx):
    return _asm(DIV_ASM, a, b) if ptx else a / b


def _rcp(s, ptx):
    return _asm(RCP_ASM, s) if ptx else 1.0 / s


def _fold_term(run, scale, s, scale_s, ptx):
    """run * scale + s * scale_s (see bi_core.rows.FOLD_ASM)."""
    return _asm(FOLD_ASM, run, scale, s, scale_s) if ptx else run * scale + s * scale_s


_NEG_INF = float("-inf")


def _load_segment(x_ref, row, c, *, n, block):
    """Segment ``c`` of a row in fp32, -inf past the end."""
    offs = c * block + jnp.arange(block)
    return pltriton.load(x_ref.at[row, offs], mask=offs < n, other=_NEG_INF).astype(jnp.float32)


def _segment_stats(x, *, block, tree, ptx):
    """A loaded segment's maximum and the tree's sum of exp(x - max), as
    1-element arrays (an all -inf segment: -inf and 0); as bi_torch's."""
    m = jnp.max(x, axis=0, keepdims=True)
    base = jnp.where(m == _NEG_INF, 0.0, m)
    return m, _sum_tree(_exp(x, jnp.broadcast_to(base, (block,)), ptx), tree, ptx)


def _fold(run_m, run_s, m, s, ptx):
    """The running maximum and sum of exponentials after one more segment."""
    new_m = jnp.maximum(run_m, m)
    base = jnp.where(new_m == _NEG_INF, 0.0, new_m)
    return new_m, _fold_term(run_s, _exp(run_m, base, ptx), s, _exp(m, base, ptx), ptx)


def _write_segment(x_ref, y_ref, row, c, big_m, big_s, *, mode, n, block, ptx):
    offs = c * block + jnp.arange(block)
    mask = offs < n
    x = pltriton.load(x_ref.at[row, offs], mask=mask, other=_NEG_INF).astype(jnp.float32)
    m = jnp.broadcast_to(big_m, (block,))
    if mode == "softmax":
        y = _exp(x, m, ptx) * jnp.broadcast_to(_rcp(big_s, ptx), (block,))
    else:
        y = (x - m) - jnp.broadcast_to(_log(big_s, ptx), (block,))
    pltriton.store(y_ref.at[row, offs], y.astype(y_ref.dtype), mask=mask)


def _start():
    return jnp.full((1,), _NEG_INF, jnp.float32), jnp.zeros((1,), jnp.float32)


def _segment_stats_kernel(x_ref, m_ref, s_ref, *, n, block, tree, ptx):
    """One program per segment: its statistics, to ``m_ref``/``s_ref[row, c]``."""
    row, c = pl.program_id(0), pl.program_id(1)
    x = _load_segment(x_ref, row, c, n=n, block=block)
    m, s = _segment_stats(x, block=block, tree=tree, ptx=ptx)
    pltriton.store(m_ref.at[row, pl.ds(c, 1)], m)
    pltriton.store(s_ref.at[row, pl.ds(c, 1)], s)


def _segment_write_kernel(x_ref, m_ref, s_ref, y_ref, *, mode, n, block, num_chunks, ptx):
    """One program per segment: the fold of its row's segments, then its outputs."""
    row = pl.program_id(0)

    def step(c, carry):
        m = pltriton.load(m_ref.at[row, pl.ds(c, 1)])
        s = pltriton.load(s_ref.at[row, pl.ds(c, 1)])
        return _fold(*carry, m, s, ptx)

    big_m, big_s = lax.fori_loop(0, num_chunks, step, _start())
    _write_segment(x_ref, y_ref, row, pl.program_id(1), big_m, big_s, mode=mode, n=n, block=block, ptx=ptx)


def _kernel(x_ref, y_ref, *, mode, n, block, num_chunks, tree, ptx):
    row = pl.program_id(0)
    cols = jnp.arange(block)

    def load(offs, other):
        return pltriton.load(x_ref.at[row, offs], mask=offs < n, other=other).astype(jnp.float32)

    if mode in ("sum", "mean"):
        if num_chunks == 1:
            acc = load(cols, 0.0)
        else:
            acc = lax.fori_loop(0, num_chunks, lambda c, a: a + load(c * block + cols, 0.0),
                                jnp.zeros((block,), jnp.float32))
        total = _sum_tree(acc, tree, ptx)
        if mode == "mean":
            total = _div(total, jnp.full((1,), n, jnp.float32), ptx)
        pltriton.store(y_ref.at[pl.ds(row, 1)], total.astype(y_ref.dtype))
        return

    neg_inf = float("-inf")
    if num_chunks == 1:
        x = load(cols, neg_inf)
        m = jnp.broadcast_to(jnp.max(x, axis=0, keepdims=True), (block,))
        e = _exp(x, m, ptx)
        s = _sum_tree(e, tree, ptx)
        if mode == "softmax":
            y = e * jnp.broadcast_to(_rcp(s, ptx), (block,))
        else:
            y = (x - m) - jnp.broadcast_to(_log(s, ptx), (block,))
        pltriton.store(y_ref.at[row, cols], y.astype(y_ref.dtype), mask=cols < n)
        return

    # Segments (bi_core.rows): their statistics folded in order, then a
    # second pass over the row for the outputs. Segment c + 1 is loaded before
    # segment c is reduced, so that its loads are in flight during the reduction.
    def stats(c, carry):
        x, run_m, run_s = carry
        ahead = _load_segment(x_ref, row, c + 1, n=n, block=block)
        return (ahead, *_fold(run_m, run_s, *_segment_stats(x, block=block, tree=tree, ptx=ptx), ptx))

    first = _load_segment(x_ref, row, 0, n=n, block=block)
    _, big_m, big_s = lax.fori_loop(0, num_chunks, stats, (first, *_start()))

    def write(c, carry):
        _write_segment(x_ref, y_ref, row, c, big_m, big_s, mode=mode, n=n, block=block, ptx=ptx)
        return carry

    lax.fori_loop(0, num_chunks, write, 0)


def launch(mode: str, x2d, split: bool | None = None, interpret: bool | None = None):
    """``mode`` (one of ``bi_core.rows.MODES``) over the rows of ``x2d``.
    ``split`` forces one program per segment (True) or per row (False) for
    softmax/log_softmax over long rows; by default
    ``bi_core.rows.split_segments`` picks. Both give the same bits.

    The launcher under the row ops, and the one entry point for probes and
    tests that need a given strategy."""
    interpret = interpret_mode(mode) if interpret is None else interpret
    m, n = x2d.shape
    cfg = row_config(n)
    tree = sum_tree(cfg.block, cfg.num_warps, x2d.dtype.itemsize, n)
    params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
    ptx = not interpret
    if split is None:
        split = mode in ("softmax", "log_softmax") and split_segments(m, n)
    if split:
        if mode not in ("softmax", "log_softmax") or cfg.num_chunks == 1:
            raise ValueError(f"{mode}: only softmax and log_softmax over rows of more than {cfg.block} elements run in segments")
        grid = (m, cfg.num_chunks)
        stats = jax.ShapeDtypeStruct((m, cfg.num_chunks), jnp.float32)
        seg_m, seg_s = pallas_call(
            functools.partial(_segment_stats_kernel, n=n, block=cfg.block, tree=tree, ptx=ptx),
            grid=grid, out_shape=(stats, stats), compiler_params=params, interpret=interpret,
            name=f"bi_{mode}_segment_stats",
        )(x2d)
        return pallas_call(
            functools.partial(_segment_write_kernel, mode=mode, n=n, block=cfg.block, num_chunks=cfg.num_chunks, ptx=ptx),
            grid=grid, out_shape=jax.ShapeDtypeStruct((m, n), x2d.dtype), compiler_params=params,
            interpret=interpret, name=f"bi_{mode}_segment_write",
        )(x2d, seg_m, seg_s)
    kernel = functools.partial(
        _kernel, mode=mode, n=n, block=cfg.block, num_chunks=cfg.num_chunks, tree=tree, ptx=ptx,
    )
    out_shape = (m,) if mode in ("sum", "mean") else (m, n)
    return pallas_call(
        kernel,
        grid=(m,),
        out_shape=jax.ShapeDtypeStruct(out_shape, x2d.dtype),
        compiler_params=params,
        interpret=interpret,
        name=f"bi_{mode}",
    )(x2d)


def _rows(mode: str, x2d):
    interpret = interpret_mode(mode)
    run = with_rows_backward(mode, lambda x: launch_rows(mode, lambda part: launch(mode, part, interpret=interpret), x,
                                                         interpret), x2d.shape, x2d.dtype)
    return run(x2d)


def _check_input(op: str, x, dtype):
    check_float_array("x", x, op)
    if dtype is not None:
        if np.dtype(dtype) not in [np.dtype(d) for d in SUPPORTED_DTYPES]:
            raise TypeError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")
        x = x.astype(dtype)
    return x


def _axes(op: str, x, axis) -> tuple[int, ...]:
    """Normalised, sorted, distinct axes; None means every axis. An axis is
    anything ``operator.index`` takes (ints, numpy integers, as jax.vmap
    writes them)."""
    if axis is None:
        return tuple(range(x.ndim))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if isinstance(a, bool):
            raise TypeError(f"{op}: axis must be an int or a tuple of ints, got {axis!r}")
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(f"{op}: axis must be an int or a tuple of ints, got {axis!r}") from None
        if not -x.ndim <= a < x.ndim:
            raise ValueError(f"{op}: axis {a} is out of bounds for an array of {x.ndim} dimensions")
        out.append(a % x.ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def _reduce(op: str, x, axis, dtype, keepdims: bool):
    x = _check_input(op, x, dtype)
    axes = _axes(op, x, axis)
    kept = [d for d in range(x.ndim) if d not in axes]
    n = math.prod(x.shape[d] for d in axes)
    out_shape = tuple(x.shape[d] for d in kept)
    x2d = jnp.transpose(x, kept + list(axes)).reshape(math.prod(out_shape), n)
    if n == 0:
        out = jnp.full((x2d.shape[0],), 0.0 if op == "sum" else jnp.nan, x.dtype)
    elif x2d.shape[0] == 0:
        out = jnp.zeros((0,), x.dtype)
    else:
        out = _rows(op, x2d)
    if keepdims:
        return out.reshape(tuple(1 if d in axes else s for d, s in enumerate(x.shape)))
    return out.reshape(out_shape)


def _normalise(op: str, x, axis):
    x = _check_input(op, x, None)
    axes = _axes(op, x, axis)
    if not axes:
        raise ValueError(f"{op}: at least one axis is needed")
    if x.size == 0:
        return x  # as jax.nn.softmax: an empty result of the same shape
    kept = [d for d in range(x.ndim) if d not in axes]
    perm = kept + list(axes)
    moved = jnp.transpose(x, perm)
    n = math.prod(x.shape[d] for d in axes)
    x2d = moved.reshape(-1, n)
    out = _rows(op, x2d).reshape(moved.shape)
    return jnp.transpose(out, np.argsort(perm))


def sum(x: jax.Array, axis=None, dtype=None, keepdims: bool = False) -> jax.Array:
    """Batch-invariant ``jnp.sum(x, axis, dtype, keepdims=keepdims)`` for float arrays.

    fp32 accumulation in a fixed order that depends on the reduced size only,
    one rounding to the output dtype (``dtype`` if given, else ``x.dtype``).
    """
    return _reduce("sum", x, axis, dtype, keepdims)


def mean(x: jax.Array, axis=None, dtype=None, keepdims: bool = False) -> jax.Array:
    """Batch-invariant ``jnp.mean``: ``sum`` divided (correctly rounded, fp32)
    by the number of elements, rounded once."""
    return _reduce("mean", x, axis, dtype, keepdims)


def softmax(x: jax.Array, axis=-1) -> jax.Array:
    """Batch-invariant ``jax.nn.softmax(x, axis)``; ``axis`` an int or a tuple.

    fp32 math: the maximum, ``exp(x - max)``, their sum in a fixed order, each
    exponential times the correctly rounded ``1 / sum``, and one rounding to
    ``x.dtype``.
    """
    return _normalise("softmax", x, axis)


def log_softmax(x: jax.Array, axis=-1) -> jax.Array:
    """Batch-invariant ``jax.nn.log_softmax(x, axis)``:
    ``(x - max) - log(sum(exp(x - max)))`` in fp32, rounded once."""
    return _normalise("log_softmax", x, axis)

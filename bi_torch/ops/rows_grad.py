"""Fused backward kernels of the row ops (RMSNorm, softmax, log_softmax).

A program owns ``ROWS`` whole rows and walks each in column chunks of
``BLOCK``, both fixed by the row length alone (``_tile``), never by the
number of rows:

- pass 1: each row's dot product (RMSNorm: ``sum(g w x)``; softmax:
  ``sum(g y)``; log_softmax: ``sum(g)``) in fp32, chunk by chunk in order, then
  across the chunk's lanes: an order fixed by the row length, so a row's
  gradient does not depend on the other rows of the batch;
- pass 2: the input gradient, elementwise in fp32, rounded once.

RMSNorm's weight gradient ``sum over rows of g x rstd`` is summed per program
(its ``ROWS`` rows, in the tile's fixed tree) into an fp32 partial, and the
partials over the programs in order by ``_column_sum_kernel``: a given batch
always gives the same bits; another number of rows, other bits (a sum over
the batch must change with it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bi_torch._checks import canonical
from bi_torch._launch import fast

# The ops, as Triton constants (a kernel reads only constexpr globals).
RMS_NORM, SOFTMAX, LOG_SOFTMAX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def _tile(n: int) -> tuple[int, int, int]:
    """(rows per program, columns per chunk, warps) for rows of ``n``
    elements."""
    block = min(triton.next_power_of_2(max(n, 1)), 1024)
    rows = max(1, min(16, 8192 // block))
    return rows, block, 4 if block * rows <= 4096 else 8


@fast
@triton.jit(do_not_specialize=["m"])
def _row_grad_kernel(X, G, W, RSTD, DX, DW_PART, m, n, inv_n,
                     OP: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_DW: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``X``: the input (RMSNorm) or the output ``y`` (softmax, log_softmax)."""
    block = tl.program_id(0)
    rows = block * ROWS + tl.arange(0, ROWS)
    row_ok = (rows < m)[:, None]
    base = rows.to(tl.int64)[:, None] * n
    acc = tl.zeros((ROWS, BLOCK), tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok & (cols < n)[None, :]
        g = tl.load(G + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if OP == LOG_SOFTMAX:
            acc += g
        else:
            x = tl.load(X + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if OP == RMS_NORM and HAS_WEIGHT:
                g = g * tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
            acc += g * x
    dot = tl.sum(acc, axis=1)
    if OP == RMS_NORM:
        rstd = tl.load(RSTD + rows, mask=rows < m, other=0.0)
        mean = dot * inv_n
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = row_ok & (cols < n)[None, :]
        g = tl.load(G + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if OP == RMS_NORM:
            gw = g
            if HAS_WEIGHT:
                gw = g * tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
            if WRITE_DW:
                part = tl.sum(g * (x * rstd[:, None]), axis=0)
                tl.store(DW_PART + block.to(tl.int64) * n + cols, part, mask=cols < n)
            dx = rstd[:, None] * (gw - x * (rstd * rstd)[:, None] * mean[:, None])
        elif OP == SOFTMAX:
            dx = x * (g - dot[:, None])
        else:
            dx = g - tl.exp(x) * dot[:, None]
        tl.store(DX + base + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)


@fast
@triton.jit(do_not_specialize=["parts"])
def _column_sum_kernel(P, OUT, parts, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``OUT[j] = sum_i P[i, j]``: tiles of ``ROWS`` partials in order, then
    across the tile's rows."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((ROWS, BLOCK), tl.float32)
    for r0 in range(0, parts, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ok = (rows < parts)[:, None] & (cols < n)[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * n + cols[None, :], mask=ok, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < n)


def _launch(op: int, x2d, g2d, w, rstd, dx, dw_part) -> None:
    m, n = x2d.shape
    rows, block, warps = _tile(n)
    _row_grad_kernel[(triton.cdiv(m, rows),)](
        x2d, g2d, w if w is not None else x2d, rstd if rstd is not None else x2d, dx,
        dw_part if dw_part is not None else dx, m, n, 1.0 / n if n else 0.0,
        OP=op.value, HAS_WEIGHT=w is not None, WRITE_DW=dw_part is not None, ROWS=rows, BLOCK=block, num_warps=warps)


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, g: torch.Tensor,
                      need_x: bool = True, need_weight: bool = True):
    """(dx, dweight) of ``y = x * rstd * weight`` over the last axis, ``rstd``
    the forward's fp32 factors (``x.shape[:-1] + (1,)``); dx in ``x``'s dtype,
    dweight in ``weight``'s (None without a weight or ``need_weight``)."""
    n = x.shape[-1]
    x2d, g2d = canonical(x.reshape(-1, n)), canonical(g.reshape(-1, n).to(x.dtype))
    m = x2d.shape[0]
    dx = torch.empty_like(x2d)
    want_w = weight is not None and need_weight
    if m == 0 or n == 0:
        dw = torch.zeros_like(weight) if want_w else None
        return dx.reshape(x.shape), dw
    rows, _, _ = _tile(n)
    parts = triton.cdiv(m, rows)
    part = torch.empty((parts, n), dtype=torch.float32, device=x.device) if want_w else None
    w = canonical(weight) if weight is not None else None
    _launch(RMS_NORM, x2d, g2d, w, canonical(rstd.reshape(-1).float()), dx, part)
    dw = None
    if want_w:
        dw = torch.empty_like(weight)
        block = 128
        _column_sum_kernel[(triton.cdiv(n, block),)](part, dw, parts, n, ROWS=32, BLOCK=block)
    return dx.reshape(x.shape), dw


def normalise_backward(op: str, y: torch.Tensor, g: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The input gradient of ``y = softmax(x, dim)`` or ``log_softmax``, in
    ``dtype``."""
    if y.ndim == 0:  # one element: softmax is 1 (log_softmax 0) whatever x, so the gradient is 0
        return torch.zeros((), dtype=dtype, device=y.device)
    moved_y, moved_g = y.movedim(dim, -1), g.movedim(dim, -1)
    n = moved_y.shape[-1]
    y2d = canonical(moved_y.reshape(-1, n))
    g2d = canonical(moved_g.reshape(-1, n).to(y.dtype))
    dx = torch.empty(y2d.shape, dtype=dtype, device=y.device)
    if y2d.numel():
        _launch(SOFTMAX if op == "softmax" else LOG_SOFTMAX, y2d, g2d, None, None, dx, None)
    return dx.reshape(moved_y.shape).movedim(-1, dim)

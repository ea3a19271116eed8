"""RMSNorm over the last axis: Pallas kernel and launcher.

This op is lowered through Pallas's Triton backend, deliberately: the kernel is
the same Triton program that ``bi_torch.rms_norm`` launches (same block size,
warps, reduction tree and epilogue PTX, from ``bi_core.rms_norm``), so both
frameworks reduce a row in the same order and give the same bits. The Mosaic GPU backend lays rows
out in warpgroup tiles of 64 and reduces them with a different tree, which can
be invariant but cannot match the PyTorch kernel bit for bit. JAX marks the
Triton backend as deprecated; it lowers with a DeprecationWarning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_core.rms_norm import RmsNormLaunch, SumTree, launch_config, reduce_tree, rms_norm_config, rstd_asm, sum_tree
from bi_jax._checks import check_eps, check_float_array, interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops._row_launch import launch_rows
from bi_jax.ops.grad import with_rms_norm_backward

__all__ = ["rms_norm", "launch"]



def _square(x, ptx: bool):
    if ptx:
        # mul.rn cannot be contracted into the following adds (see bi_torch).
        return pltriton.elementwise_inline_asm(
            "mul.rn.f32 $0, $1, $1;",
            args=[x],
            constraints="=r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
        )[0]
    return x * x


def _sum_tree(v, tree: SumTree, ptx: bool):
    """Sum of a row in the order of ``bi_core.rms_norm.SumTree``: the same
    levels as bi_torch's ``_sum_tree``. Interpreted (``ptx`` False), every
    level is written out as elementwise adds, which XLA:CPU cannot reorder
    (see ``bi_core.rms_norm.reduce_tree``)."""
    if ptx:
        return reduce_tree(v, tree, jnp)
    return reduce_tree(v, tree, jnp, explicit_threads=True, elementwise=True)


def _rstd(sumsq, inv_n: float, eps: float, ptx: bool):
    if ptx:
        return pltriton.elementwise_inline_asm(
            rstd_asm(inv_n, eps),
            args=[sumsq],
            constraints="=r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(sumsq.shape, jnp.float32)],
        )[0]
    return 1.0 / jnp.sqrt(sumsq * inv_n + eps)


def _kernel(x_ref, *refs, n, block, num_chunks, split, adjacent, early, tree, inv_n, eps, has_weight, ptx):
    if has_weight:
        w_ref, y_ref = refs
    else:
        (y_ref,) = refs
    # Grid (split, rows) when a row's slices are launched together, else (rows, split).
    row = pl.program_id(1 if adjacent else 0)
    part = pl.program_id(0 if adjacent else 1)
    cols = jnp.arange(block)
    # With split > 1 this program writes one column slice of each chunk, and
    # still reduces the whole row (bi_core.rms_norm.column_split).
    width = block // split
    slice_cols = part * width + jnp.arange(width)

    def load(ref, offs, mask):
        if ref is x_ref:
            return pltriton.load(ref.at[row, offs], mask=mask, other=0.0).astype(jnp.float32)
        return pltriton.load(ref.at[offs], mask=mask, other=0.0).astype(jnp.float32)

    if num_chunks == 1:
        x = load(x_ref, cols, cols < n)
        if split > 1:
            # The slice is loaded again (an L1/L2 hit) rather than taken out of
            # the row's registers; both loads are issued before the reduction.
            out_cols = slice_cols
            x_out = load(x_ref, out_cols, out_cols < n)
        else:
            out_cols, x_out = cols, x
        mask = out_cols < n
        # Loaded before the reduction, the weight's latency overlaps it.
        w = load(w_ref, out_cols, mask) if has_weight and early else None
        sumsq = _sum_tree(_square(x, ptx), tree, ptx)
        y = x_out * _rstd(sumsq, inv_n, eps, ptx)
        if has_weight:
            y = y * (w if early else load(w_ref, out_cols, mask))
        pltriton.store(y_ref.at[row, out_cols], y.astype(y_ref.dtype), mask=mask)
        return

    acc = jnp.zeros((block,), jnp.float32)
    for c in range(num_chunks):
        offs = c * block + cols
        acc = acc + _square(load(x_ref, offs, offs < n), ptx)
    rstd = _rstd(_sum_tree(acc, tree, ptx), inv_n, eps, ptx)
    for c in range(num_chunks):
        offs = c * block + slice_cols
        mask = offs < n
        y = load(x_ref, offs, mask) * rstd
        if has_weight:
            y = y * load(w_ref, offs, mask)
        pltriton.store(y_ref.at[row, offs], y.astype(y_ref.dtype), mask=mask)


def launch(x2d, weight, eps: float, config: RmsNormLaunch | None = None, interpret: bool | None = None):
    """The kernel over the rows of ``x2d``, with the launch ``config``
    (default: ``bi_core.rms_norm.launch_config``); interpreted by default on
    the CPU backend (``bi_jax._checks.interpret_mode``).

    The launcher under :func:`rms_norm`, and the one entry point for probes
    and tests that need a given launch; any config gives the same bits.
    """
    m, n = x2d.shape
    cfg = rms_norm_config(n)
    config = launch_config(m, n) if config is None else config
    interpret = interpret_mode("rms_norm") if interpret is None else interpret
    kernel = functools.partial(
        _kernel,
        n=n,
        block=cfg.block,
        num_chunks=cfg.num_chunks,
        split=config.split,
        adjacent=config.adjacent,
        early=config.early_weight,
        tree=sum_tree(cfg.block, cfg.num_warps, x2d.dtype.itemsize, n),
        inv_n=cfg.inv_n,
        eps=eps,
        has_weight=weight is not None,
        ptx=not interpret,
    )
    args = (x2d,) if weight is None else (x2d, weight)
    return pallas_call(
        kernel,
        grid=(config.split, m) if config.adjacent else (m, config.split),
        out_shape=jax.ShapeDtypeStruct((m, n), x2d.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="bi_rms_norm",
    )(*args)


def rms_norm(x: jax.Array, weight: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """Batch-invariant RMSNorm over the last axis.

    ``y = x * rsqrt(mean(x**2, axis=-1) + eps) * weight`` computed in fp32 and
    rounded once to ``x.dtype``, like ``torch.nn.functional.rms_norm``.

    Args:
        x: array of dtype float32, bfloat16 or float16 with any leading axes.
        weight: optional array of shape ``(x.shape[-1],)`` in one of those dtypes.
        eps: non-negative Python float.

    Works under ``jax.jit`` and ``jax.vmap``. Each output row depends only on
    its own input row.
    """
    check_float_array("x", x, "rms_norm")
    if x.ndim == 0:
        raise ValueError("rms_norm: x must have at least one dimension, got a 0-d array")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"rms_norm: the normalised (last) axis of x is empty: shape {tuple(x.shape)}")
    if weight is not None:
        check_float_array("weight", weight, "rms_norm")
        if tuple(weight.shape) != (n,):
            raise ValueError(
                f"rms_norm: weight must have shape ({n},) to match x.shape[-1], got {tuple(weight.shape)}"
            )
    eps = check_eps(eps)
    interpret = interpret_mode("rms_norm")

    x2d = x.reshape(-1, n)
    m = x2d.shape[0]
    if m == 0:
        return x
    # Rows are independent: splitting the launch changes no row's bits.
    def run(x2d, weight):
        return launch_rows("rms_norm", lambda part: launch(part, weight, eps, interpret=interpret), x2d, interpret)

    y = with_rms_norm_backward(run, eps)(x2d, weight)
    return y.reshape(x.shape)

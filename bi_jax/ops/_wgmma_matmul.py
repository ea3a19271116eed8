"""bf16/fp16 matrix product on Hopper: a Pallas Mosaic GPU kernel (wgmma + TMA).

One persistent CTA per SM walks the output tiles in a grouped order. Per tile,
a TMA warpgroup streams ``block_k``-wide slices of K into a ring of shared
memory buffers and the compute warpgroups issue wgmma on them into an fp32
accumulator that starts at zero and takes K in increasing order (the contract
of ``bi_core.matmul``). The epilogue adds the bias in fp32, rounds once and
stores through shared memory with a TMA copy.

Edges are left to the TMA unit: loads past the end of an operand are filled
with zeros (exact: they add ``+0`` products to the accumulator) and stores past
the end of the output are dropped, so no tile size needs to divide M, N or K.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bi_core.matmul import WgmmaConfig
from bi_jax._pallas import first_order, varying

# The Mosaic GPU interpreter runs every CTA of the grid on numpy; a couple of
# persistent CTAs exercise the same tile walk as the real grid.
_INTERPRET_NUM_SMS = 2


def _swizzled(minor_elems: int, dtype, swizzle: int | None = None) -> tuple:
    if swizzle is None:
        swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


_SMEM_BYTES = 227 * 1024 - 2048  # Hopper's per-block shared memory, less barriers


def _epilogue_cols(block_n: int) -> int:
    return min(block_n, 64)


def fitted_stages(cfg: WgmmaConfig, dtype, out_dtype) -> int:
    """Pipeline depth that fits in shared memory next to the epilogue buffer
    (a speed choice: the K order does not depend on it)."""
    stage = (cfg.cta_m * cfg.block_k + cfg.block_k * cfg.cta_n) * jnp.dtype(dtype).itemsize
    epilogue = cfg.compute_wgs * cfg.block_m * _epilogue_cols(cfg.block_n) * jnp.dtype(out_dtype).itemsize
    stages = cfg.stages
    while stages > 2 and stages * stage + epilogue > _SMEM_BYTES:
        stages -= 1
    return stages


def _body(a_gmem, b_gmem, *refs, cfg: WgmmaConfig, has_bias: bool, b_kmajor: bool):
    """a_gmem: (batch, M, K); b_gmem: (batch, K, N), or (batch, N, K) when
    ``b_kmajor``; bias_gmem: (N padded to a multiple of cta_n,) fp32; out_gmem: (batch, M, N)."""
    if has_bias:
        bias_gmem, out_gmem = refs
    else:
        bias_gmem, (out_gmem,) = None, refs
    batch, m, k = a_gmem.shape
    n = out_gmem.shape[2]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_tiles, n_tiles, k_steps = pl.cdiv(m, cta_m), pl.cdiv(n, cta_n), pl.cdiv(k, bk)
    dtype, out_dtype = a_gmem.dtype, out_gmem.dtype

    # wgmma wants one swizzle for both operands: the widest that the minor
    # dimension of each (K, or a warpgroup's N columns) can take.
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(bits * (bk if b_kmajor else min(bk, bn)))
    stages = min(cfg.stages, k_steps)
    # One wgmma group stays in flight while the next is issued; its buffers
    # are released one step late. (Same accumulator, so they run in order.)
    delay = 1 if stages > 1 else 0
    a_spec = plgpu.BlockSpec(
        (cta_m, bk), lambda kk: (0, kk), transforms=_swizzled(bk, dtype, swizzle), delay_release=delay
    )
    if b_kmajor:
        b_spec = plgpu.BlockSpec(
            (cta_n, bk), lambda kk: (0, kk), transforms=_swizzled(bk, dtype, swizzle), delay_release=delay
        )
    else:
        b_spec = plgpu.BlockSpec(
            (bk, cta_n), lambda kk: (kk, 0), transforms=_swizzled(bn, dtype, swizzle), delay_release=delay
        )

    def pipeline(step, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[a_spec, b_spec],
            wg_axis="wg",
            num_compute_wgs=cfg.compute_wgs,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocation sizes only)

    epi_n = _epilogue_cols(bn)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem.at[0], b_gmem.at[0]),
        out_smem=plgpu.SMEM((cfg.compute_wgs, bm, epi_n), out_dtype),
        bias_smem=plgpu.SMEM((cfg.compute_wgs, bn), jnp.float32) if has_bias else None,
        bias_bar=plgpu.Barrier(num_barriers=cfg.compute_wgs) if has_bias else None,
        collective_axes="wg",
    )
    def _scope(allocs, out_smem, bias_smem, bias_bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((batch * m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            bi = lin // (m_tiles * n_tiles)
            mi, ni = plgpu.planar_snake(
                lin % (m_tiles * n_tiles), (m_tiles, n_tiles), 1, cfg.group
            )
            m_rows = pl.ds(mi * cta_m, cta_m)
            n_cols = pl.ds(ni * cta_n, cta_n)
            wg_cols = pl.ds(wg * bn, bn)

            def context(run):
                if has_bias:
                    # Fetched while the K loop runs.
                    plgpu.copy_gmem_to_smem(
                        bias_gmem.at[pl.ds(ni * cta_n + wg * bn, bn)], bias_smem.at[wg], bias_bar.at[wg]
                    )

                @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.float32))
                def _acc(acc):
                    run(acc)
                    out = acc[...]
                    if has_bias:
                        plgpu.barrier_wait(bias_bar.at[wg])
                        bias = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
                        out = out + lax.broadcast_in_dim(bias, (bm, bn), [1])
                    out = out.astype(out_dtype)  # the one rounding
                    # Stored in column slices through a small buffer: the
                    # shared memory goes to the K pipeline instead.
                    for j in range(bn // epi_n):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        out_smem[wg] = out[:, j * epi_n : (j + 1) * epi_n]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg],
                            out_gmem.at[bi, m_rows, pl.ds(ni * cta_n + wg * bn + j * epi_n, epi_n)],
                        )

            def step(_, a_smem, b_smem, acc):
                if b_kmajor:
                    rhs = b_smem.at[wg_cols, :].transpose((1, 0))
                else:
                    rhs = b_smem.at[:, wg_cols]
                plgpu.wgmma(acc, a_smem, rhs)
                plgpu.wgmma_wait(delay)
                return acc

            b_tile = b_gmem.at[bi, n_cols, :] if b_kmajor else b_gmem.at[bi, :, n_cols]
            pipeline(step, context)(a_gmem.at[bi, m_rows, :], b_tile, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def wgmma_matmul(
    a3: jax.Array,
    b3: jax.Array,
    bias: jax.Array | None,
    out_dtype,
    cfg: WgmmaConfig,
    *,
    b_kmajor: bool,
    interpret: bool,
    num_sms: int,
) -> jax.Array:
    """``a3 @ b3`` (+ bias) per batch; shapes as in ``_body``. Every dimension
    must be at least its tile and rows must be 16-byte aligned (the caller pads)."""
    batch, m, _ = a3.shape
    n = b3.shape[1] if b_kmajor else b3.shape[2]
    grid = _INTERPRET_NUM_SMS if interpret else num_sms
    cfg = dataclasses.replace(cfg, stages=fitted_stages(cfg, a3.dtype, out_dtype))
    if bias is not None:
        # The epilogue reads whole bias tiles; pad so that none goes past the end.
        bias = jnp.pad(bias, (0, -n % cfg.cta_n))
    args, out_type = varying((a3, b3) if bias is None else (a3, b3, bias),
                             jax.ShapeDtypeStruct((batch, m, n), out_dtype))
    kernel = plgpu.kernel(
        functools.partial(_body, cfg=cfg, has_bias=bias is not None, b_kmajor=b_kmajor),
        out_type=out_type,
        grid=(grid,),
        grid_names=("sm",),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        kernel_name="bi_matmul_wgmma",  # bi_jax._checks.KERNEL_NAMES
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return first_order(kernel, "bi_matmul_wgmma")(*args)

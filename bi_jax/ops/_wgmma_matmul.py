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

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bi_core.matmul import WgmmaConfig

# The Mosaic GPU interpreter runs every CTA of the grid on numpy; a couple of
# persistent CTAs exercise the same tile walk as the real grid.
_INTERPRET_NUM_SMS = 2


def _swizzled(minor_elems: int, dtype) -> tuple:
    bits = minor_elems * jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(bits)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


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

    a_spec = plgpu.BlockSpec((cta_m, bk), lambda kk: (0, kk), transforms=_swizzled(bk, dtype))
    if b_kmajor:
        b_spec = plgpu.BlockSpec((cta_n, bk), lambda kk: (0, kk), transforms=_swizzled(bk, dtype))
    else:
        b_spec = plgpu.BlockSpec((bk, cta_n), lambda kk: (kk, 0), transforms=_swizzled(bn, dtype))

    def pipeline(step, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[a_spec, b_spec],
            wg_axis="wg",
            num_compute_wgs=cfg.compute_wgs,
            max_concurrent_steps=min(cfg.stages, k_steps),
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None  # noqa: E731  (allocation sizes only)

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem.at[0], b_gmem.at[0]),
        out_smem=plgpu.SMEM(
            (cfg.compute_wgs, bm, bn), out_dtype, transforms=_swizzled(bn, out_dtype)
        ),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem):
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
                @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.float32))
                def _acc(acc):
                    run(acc)
                    out = acc[...]
                    if has_bias:
                        bias = plgpu.load(
                            bias_gmem.at[pl.ds(ni * cta_n + wg * bn, bn)],
                            layout=plgpu.Layout.WGMMA.reduce(0),
                        )
                        out = out + lax.broadcast_in_dim(bias, (bm, bn), [1])
                    # The previous tile's store must have read out_smem.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = out.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg], out_gmem.at[bi, m_rows, n_cols].at[:, wg_cols]
                    )

            def step(_, a_smem, b_smem, acc):
                if b_kmajor:
                    rhs = b_smem.at[wg_cols, :].transpose((1, 0))
                else:
                    rhs = b_smem.at[:, wg_cols]
                plgpu.wgmma(acc, a_smem, rhs)
                plgpu.wgmma_wait(0)
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
    kernel = plgpu.kernel(
        functools.partial(_body, cfg=cfg, has_bias=bias is not None, b_kmajor=b_kmajor),
        out_type=jax.ShapeDtypeStruct((batch, m, n), out_dtype),
        grid=(grid,),
        grid_names=("sm",),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup
        ),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    if bias is not None:
        # The epilogue reads whole bias tiles; pad so that none goes past the end.
        bias = jnp.pad(bias, (0, -n % cfg.cta_n))
    args = (a3, b3) if bias is None else (a3, b3, bias)
    return kernel(*args)

"""Matrix product for JAX: ``matmul``, ``linear`` and ``dot_general``.

Every output element is one fp32 accumulator that starts at zero and takes K
in increasing order (the contract in ``bi_core.matmul``, shared with
``bi_torch``), then the bias in fp32, then one rounding. Nothing about that
order depends on M, so a row's bits do not depend on the batch.

* bf16 / fp16: a Pallas Mosaic GPU kernel (wgmma + TMA, ``_wgmma_matmul``),
  except up to ``bi_core.matmul.JAX_TRITON_MAX_M`` rows and
  ``JAX_TRITON_MAX_N`` columns (below).
* fp32, and those small 16-bit products: a Pallas kernel
  lowered through Triton (``_triton_kernel`` below). This path is deliberate
  and kept to those cases. wgmma has no full-precision fp32 mode (only tf32)
  and needs both tf32 operands K-major, while the contract's full-precision
  product is one FMA per k on the CUDA cores, which Triton emits from
  ``jnp.dot(..., precision=HIGHEST)``. At small M a 16-bit product is a
  weight stream, and wgmma's 64-row tiles leave a 4096-wide weight only 64
  CTAs (the Mosaic kernel streamed it at 53-76 % of copy bandwidth on an
  H100), while bi_torch's 16-row Triton tiles reach 80-95 %. The kernel runs
  the same tiles (``bi_core.matmul`` tables) as the bi_torch kernel, so both
  frameworks give the same bits. JAX marks the Triton backend as deprecated;
  it lowers with a DeprecationWarning.
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

from bi_core.matmul import (
    INTERPRET_CONFIG,
    INTERPRET_WGMMA_CONFIG,
    JAX_TRITON_MAX_M,
    JAX_TRITON_MAX_N,
    TileConfig,
    WgmmaConfig,
    tile_config,
    wgmma_config,
)
from bi_jax._checks import check_float_array, interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops._wgmma_matmul import wgmma_matmul
from bi_jax.ops.grad import with_product_backward

__all__ = ["matmul", "linear", "dot_general", "einsum", "launch"]

# Triton-lowered Pallas computes offsets in int32.
_MAX_TRITON_ELEMENTS = 2**31 - 1

_IEEE_NAMES = {"highest", "float32", "f32"}
_TF32_NAMES = {"default", "fastest", "tensorfloat32", "tf32"}
_BF16_PASS_NAMES = {"high", "bfloat16", "bfloat16_3x"}  # known to lax, no invariant kernel here


# --- precision -------------------------------------------------------------


def _precision_name(p) -> str | None:
    if p is None:
        return None
    if isinstance(p, lax.Precision):
        return {lax.Precision.DEFAULT: "default", lax.Precision.HIGH: "high", lax.Precision.HIGHEST: "highest"}[p]
    if isinstance(p, str):
        name = p.lower()
        if name not in _IEEE_NAMES | _TF32_NAMES | _BF16_PASS_NAMES:
            known = ", ".join(sorted(_IEEE_NAMES | _TF32_NAMES | _BF16_PASS_NAMES))
            raise ValueError(f"precision {p!r} is not a precision that jax.lax knows; expected one of {known}")
        return name
    raise TypeError(f"precision must be None, a jax.lax.Precision or a string, got {p!r}")


# The dot algorithms the kernels compute exactly (``jax.nn.dot_product_attention``
# passes BF16_BF16_F32 for bf16 inputs): operands of this dtype, products
# accumulated in fp32.
_PRESETS = {"BF16_BF16_F32": "bfloat16", "F16_F16_F32": "float16", "F32_F32_F32": "float32",
            "TF32_TF32_F32": "float32"}


def _preset(dtype, preset) -> str:
    want = _PRESETS.get(preset.name)
    if want is None or np.dtype(dtype) != np.dtype(want):
        takes = ", ".join(f"{k} on {v}" for k, v in _PRESETS.items())
        raise NotImplementedError(
            f"matmul: the dot algorithm {preset.name} on {np.dtype(dtype)} inputs has no batch-invariant kernel; "
            f"the kernels take DEFAULT, {takes} inputs")
    return "tf32" if preset.name == "TF32_TF32_F32" else "ieee"


def resolve_precision(dtype, precision) -> str:
    """``"ieee"`` or ``"tf32"`` for fp32 inputs; ``"ieee"`` for bf16/fp16.

    fp32 runs in full precision unless the user asked for tf32: through
    ``precision`` (``lax.Precision.DEFAULT`` or ``"tensorfloat32"``) or, when
    ``precision`` is None, through ``jax_default_matmul_precision``.
    bfloat16-pass precisions (``HIGH``, ``"bfloat16"``, ...) have no invariant
    kernel here and are refused rather than served by another arithmetic.
    """
    if isinstance(precision, lax.DotAlgorithmPreset):
        if precision != lax.DotAlgorithmPreset.DEFAULT:
            return _preset(dtype, precision)
        precision = None
    elif isinstance(precision, lax.DotAlgorithm):
        raise NotImplementedError(f"matmul: a custom dot algorithm ({precision!r}) has no batch-invariant kernel; "
                                  f"pass a precision or one of {', '.join(_PRESETS)}")
    if isinstance(precision, (tuple, list)):
        names = {_precision_name(p) for p in precision}
        if len(names) != 1:
            raise ValueError(f"matmul: lhs and rhs precisions must be equal, got {precision!r}")
        (name,) = names
    else:
        name = _precision_name(precision)
    if name is None:
        name = _precision_name(jax.config.jax_default_matmul_precision)
    if np.dtype(dtype) != np.float32:
        return "ieee"
    if name is None or name in _IEEE_NAMES:
        return "ieee"
    if name in _TF32_NAMES:
        return "tf32"
    raise NotImplementedError(
        f"matmul: precision {name!r} (bfloat16 passes) has no batch-invariant kernel; "
        "use the default / 'highest' (full fp32) or 'tensorfloat32'"
    )


# --- Triton-lowered kernel (Pallas, Triton backend): fp32, small-M 16-bit ----


def _add_rn(x, y):
    """``x + y`` in fp32 as one IEEE add that no compiler pass can fold into a
    preceding product (see the bias in ``_triton_kernel``)."""
    return pltriton.elementwise_inline_asm(
        "add.rn.f32 $0, $1, $2;",
        args=[x, y],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )[0]


def _tile_dot(a, b, precision, interpreted: bool):
    """The product of two tiles in fp32. Interpreted, it is written out as
    the contract states it, ``k = 0, 1, 2, ...`` one product and one addition
    at a time: XLA:CPU's dot rounds a row by its position in the tile (as
    numpy's BLAS does, see ``bi_torch/_interpreter.py``), and a row's
    position follows the batch."""
    if not interpreted:
        return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    out = a32[:, 0:1] * b32[0:1, :]
    for k in range(1, a32.shape[1]):
        out = out + a32[:, k : k + 1] * b32[k : k + 1, :]
    return out


def _triton_kernel(a_ref, b_ref, *refs, cfg: TileConfig, precision: str, has_bias: bool, b_kmajor: bool,
                   ptx: bool):
    """One (batch, row tile, column tile) per program; K from 0 upwards into one
    fp32 accumulator, masked edges loading zeros (same loop as bi_torch)."""
    if has_bias:
        bias_ref, o_ref = refs
    else:
        bias_ref, (o_ref,) = None, refs
    _, m, k = a_ref.shape
    n = o_ref.shape[2]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    pid_m, pid_n, bi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pid_m * bm + jnp.arange(bm)
    cols = pid_n * bn + jnp.arange(bn)
    ks = jnp.arange(bk)
    row_ok, col_ok = rows < m, cols < n
    dot_precision = lax.Precision.HIGHEST if precision == "ieee" else lax.Precision.DEFAULT

    def step(kk, acc):
        kcols = kk * bk + ks
        k_ok = kcols < k
        a = pltriton.load(
            a_ref.at[bi, pl.ds(pid_m * bm, bm), pl.ds(kk * bk, bk)],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if b_kmajor:
            b = pltriton.load(
                b_ref.at[bi, pl.ds(pid_n * bn, bn), pl.ds(kk * bk, bk)],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).T
        else:
            b = pltriton.load(
                b_ref.at[bi, pl.ds(kk * bk, bk), pl.ds(pid_n * bn, bn)],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
        return acc + _tile_dot(a, b, dot_precision, interpreted=not ptx)

    acc = lax.fori_loop(0, pl.cdiv(k, bk), step, jnp.zeros((bm, bn), jnp.float32))
    if has_bias:
        bias = jnp.broadcast_to(pltriton.load(bias_ref.at[pl.ds(pid_n * bn, bn)], mask=col_ok, other=0.0)[None, :],
                                acc.shape)
        # When K fits one K tile the loop above has one step and disappears;
        # Triton then folds a plain ``dot + bias`` into a product that
        # accumulates onto the bias (bias first, then the k terms): other bits
        # than bi_torch's and than this kernel's with a smaller K tile. Seen on
        # an H100 as a 1-ULP batch dependence of fp16 ``linear`` at K = 165.
        acc = _add_rn(acc, bias) if ptx else acc + bias
    pltriton.store(
        o_ref.at[bi, pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)],
        acc.astype(o_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _triton_matmul(a3, b3, bias, out_dtype, cfg: TileConfig, *, precision, b_kmajor, interpret):
    batch, m, _ = a3.shape
    n = b3.shape[1] if b_kmajor else b3.shape[2]
    kernel = functools.partial(
        _triton_kernel, cfg=cfg, precision=precision, has_bias=bias is not None, b_kmajor=b_kmajor,
        ptx=not interpret,
    )
    args = (a3, b3) if bias is None else (a3, b3, bias)
    return pallas_call(
        kernel,
        grid=(pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n), batch),
        out_shape=jax.ShapeDtypeStruct((batch, m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="bi_matmul_triton",
    )(*args)


# --- dispatch over the two kernels -----------------------------------------


def _num_sms() -> int:
    return jax.devices()[0].core_count


_TMA_TILE = 64  # elements: the widest shared-memory tile along K and N (128-byte swizzle)


def _pad_to(x, shape):
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def kernel_for(dtype_name: str, m: int, n: int, fits_triton: bool, interpret: bool) -> str:
    """Which kernel computes an ``m`` x ``n`` product: ``"triton"`` or ``"mosaic"``.

    Interpreted on a CPU, every product takes the Triton-lowered kernel,
    whose interpreted tile product adds K in a fixed order (``_tile_dot``).
    The Mosaic GPU interpreter computes ``wgmma`` with XLA:CPU's dot, which
    rounds a row by its position in the 64-row tile (15 of 36 bf16 rows of a
    32 x 32 product changed when computed alone), so it would not be
    invariant there; on the GPU both kernels give bi_torch's bits.
    """
    if dtype_name == "float32" or interpret:
        return "triton"
    if not interpret and m <= JAX_TRITON_MAX_M and n <= JAX_TRITON_MAX_N and fits_triton:
        return "triton"
    return "mosaic"


def launch(a3, b3, bias, out_dtype, precision: str, b_kmajor: bool, config: TileConfig | WgmmaConfig | None = None):
    """``a3[i] @ b3[i] (+ bias)``: a3 (B, M, K); b3 (B, K, N), or (B, N, K) when
    ``b_kmajor``; bias (N,) or None; ``precision`` from :func:`resolve_precision`.

    ``config`` picks the kernel and its tiles: a ``TileConfig`` runs the
    Triton-lowered kernel, a ``WgmmaConfig`` the Mosaic GPU one; by default
    :func:`kernel_for` and the ``bi_core.matmul`` tables choose. The launcher
    under :func:`matmul`, and the one entry point for probes and tests that
    need a given config (operands are checked by the public functions only).
    """
    batch, m, k = a3.shape
    n = b3.shape[1] if b_kmajor else b3.shape[2]
    if batch == 0 or m == 0 or n == 0:
        return jnp.zeros((batch, m, n), out_dtype)
    if k == 0:
        fill = bias.astype(jnp.float32) if bias is not None else jnp.zeros((n,), jnp.float32)
        return jnp.broadcast_to(fill, (batch, m, n)).astype(out_dtype)
    bias32 = None if bias is None else bias.astype(jnp.float32)
    interpret = interpret_mode("matmul")
    dtype_name = np.dtype(a3.dtype).name

    # The Triton kernel computes offsets in int32: a 16-bit weight past 2**31
    # elements takes the Mosaic kernel instead (the same bits, see above).
    fits_triton = b3.size <= _MAX_TRITON_ELEMENTS and batch * k <= _MAX_TRITON_ELEMENTS
    if config is None:
        if kernel_for(dtype_name, m, n, fits_triton, interpret) == "triton":
            config = INTERPRET_CONFIG if interpret else tile_config(m, n, dtype_name, precision)
        else:
            config = INTERPRET_WGMMA_CONFIG if interpret else wgmma_config(m, n)
    if isinstance(config, TileConfig):
        # int32 offsets in Triton-lowered Pallas: rows are independent, so M
        # may be split; the operands themselves must fit.
        if not fits_triton:
            raise ValueError(
                f"matmul: {dtype_name} operands past 2**31 elements per launch are not supported "
                f"by the Triton kernel (b has {b3.size})"
            )
        rows = max(1, _MAX_TRITON_ELEMENTS // max(batch * max(k, n), 1))
        parts = [
            _triton_matmul(a3[:, s : s + rows], b3, bias32, out_dtype, config,
                           precision=precision, b_kmajor=b_kmajor, interpret=interpret)
            for s in range(0, m, rows)
        ]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return wgmma_product(a3, b3, bias32, out_dtype, config, b_kmajor=b_kmajor, interpret=interpret)


def wgmma_product(a3, b3, bias32, out_dtype, config: WgmmaConfig, *, b_kmajor: bool, interpret: bool,
                  num_sms: int | None = None):
    """The bf16/fp16 Mosaic GPU product for any shape (``launch``'s operands;
    bias already fp32)."""
    batch, m, k = a3.shape
    n = b3.shape[1] if b_kmajor else b3.shape[2]
    # Mosaic GPU's TMA copies need 16-byte aligned rows, and each dimension
    # that a shared-memory tile splits must be a multiple of that tile. Pad
    # where a shape is not: K and N to multiples of 64 (zeros along K add
    # exact zeros; padded columns are sliced off), M to a multiple of 8 above
    # 8 rows. K also gets at least two pipeline steps. On the H100, launches
    # with K or N under one 64-wide tile, a single K step, or a warpgroup
    # whose columns were all past N returned wrong, nondeterministic tiles at
    # tiny sizes (bench/NOTES.md, "JAX matmul"), so such shapes are not run.
    # Llama-style weights and M a multiple of 8 need no padding.
    mp = m if m <= 8 else -(-m // 8) * 8
    kp = max(-(-k // _TMA_TILE) * _TMA_TILE, 2 * config.block_k)
    # N to whole CTA tiles as well, so that no warpgroup owns only padding.
    np_ = -(-n // max(_TMA_TILE, config.cta_n)) * max(_TMA_TILE, config.cta_n)
    a3 = _pad_to(a3, (batch, mp, kp))
    b3 = _pad_to(b3, (batch, np_, kp) if b_kmajor else (batch, kp, np_))
    if bias32 is not None:
        bias32 = _pad_to(bias32, (np_,))
    out = wgmma_matmul(
        a3, b3, bias32, out_dtype, config, b_kmajor=b_kmajor, interpret=interpret,
        num_sms=num_sms or (0 if interpret else _num_sms()),
    )
    return out if (mp, np_) == (m, n) else out[:, :m, :n]


def _batched_product(out_dtype: str, precision: str, b_kmajor: bool):
    """``launch`` with a vmap rule that folds the mapped axis into the
    kernel's own batch (or into M when only the activations are mapped), so
    that a vmapped call runs the same kernel on the same rows."""

    @jax.custom_batching.custom_vmap
    def f(a3, b3, bias):
        return launch(a3, b3, bias, jnp.dtype(out_dtype), precision, b_kmajor)

    @f.def_vmap
    def _rule(axis_size, in_batched, a3, b3, bias):
        a_b, b_b, bias_b = in_batched
        if bias_b:
            raise NotImplementedError("matmul: vmap over the bias is not supported; map the operands only")
        if a_b and not b_b and a3.shape[1] == 1:
            # (V, 1, M, K) -> (1, V*M, K): every mapped row meets the same weight.
            v, _, m, k = a3.shape
            out = f(a3.reshape(1, v * m, k), b3, bias)
            return out.reshape(v, 1, m, -1), True
        if not a_b:
            a3 = jnp.broadcast_to(a3, (axis_size, *a3.shape))
        if not b_b:
            b3 = jnp.broadcast_to(b3, (axis_size, *b3.shape))
        v, nb = a3.shape[:2]
        out = f(a3.reshape(v * nb, *a3.shape[2:]), b3.reshape(v * nb, *b3.shape[2:]), bias)
        return out.reshape(v, nb, *out.shape[1:]), True

    return f


@functools.lru_cache(maxsize=None)
def _batched(out_dtype: str, precision: str, b_kmajor: bool, op: str):
    def run(a3, b3, kmajor):  # the backward's products: the same kernels and precision
        return _run(a3, b3, None, a3.dtype, precision, kmajor, op)

    return with_product_backward(_batched_product(out_dtype, precision, b_kmajor), b_kmajor, run)


def _run(a3, b3, bias, out_dtype, precision, b_kmajor, op="matmul"):
    return _batched(jnp.dtype(out_dtype).name, precision, b_kmajor, op)(a3, b3, bias)


# --- public API --------------------------------------------------------------


def _check_pair(op: str, a, b, bias, out_dtype):
    check_float_array("a" if op != "linear" else "x", a, op)
    check_float_array("b" if op != "linear" else "weight", b, op)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: operands must have the same dtype, got {a.dtype} and {b.dtype}")
    if out_dtype is None:
        out_dtype = a.dtype
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(a.dtype), jnp.dtype(jnp.float32)):
        raise TypeError(
            f"{op}: preferred_element_type must be the input dtype ({a.dtype}) or float32, got {out_dtype}"
        )
    if bias is not None:
        check_float_array("bias", bias, op)
    return out_dtype


def _check_bias(op: str, bias, n: int):
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},) (the output's last dimension), got {tuple(bias.shape)}")


def matmul(a: jax.Array, b: jax.Array, bias: jax.Array | None = None, preferred_element_type=None,
           precision=None) -> jax.Array:
    """Batch-invariant ``jnp.matmul(a, b) (+ bias)``.

    Shapes follow ``jnp.matmul``: 1-D operands are promoted and the added axis
    removed, leading axes of ``a`` fold into M when ``b`` is 2-D, and N-D
    operands are batched with broadcasting (per-batch weights).

    Arithmetic: fp32 accumulation over K in a fixed order, the optional
    ``bias`` (shape ``(N,)``) added in fp32, one rounding to
    ``preferred_element_type`` (default ``a.dtype``; float32 is also allowed).
    fp32 inputs run in full fp32 unless tf32 was asked for through
    ``precision`` or ``jax_default_matmul_precision`` (see
    :func:`resolve_precision`). Works under ``jax.jit`` and ``jax.vmap``.
    """
    out_dtype = _check_pair("matmul", a, b, bias, preferred_element_type)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must be at least 1-D, got shapes {a.shape} and {b.shape}")
    prec = resolve_precision(a.dtype, precision)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    k = a2.shape[-1]
    if b2.shape[-2] != k:
        raise ValueError(
            f"matmul: shapes {a.shape} and {b.shape} cannot be multiplied (a has {k} columns, b has {b2.shape[-2]} rows)"
        )
    n = b2.shape[-1]
    _check_bias("matmul", bias, n)
    if b2.ndim == 2:
        lead = a2.shape[:-1]
        out = _run(a2.reshape(1, math.prod(lead), k), b2[None], bias, out_dtype, prec, False)
        out = out.reshape(*lead, n)
    else:
        try:
            batch = jnp.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} do not broadcast") from None
        m = a2.shape[-2]
        a3 = jnp.broadcast_to(a2, (*batch, m, k)).reshape(-1, m, k)
        b3 = jnp.broadcast_to(b2, (*batch, k, n)).reshape(-1, k, n)
        out = _run(a3, b3, bias, out_dtype, prec, False).reshape(*batch, m, n)
    if a.ndim == 1:
        out = out[..., 0, :]
    if b.ndim == 1:
        out = out[..., 0]
    return out


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, precision=None) -> jax.Array:
    """Batch-invariant ``x @ weight.T + bias`` (``torch.nn.functional.linear``).

    ``weight`` has shape ``(out_features, in_features)`` and is read in place
    (K-major); ``x`` may have any leading axes.
    """
    out_dtype = _check_pair("linear", x, weight, bias, None)
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x's last dimension must equal in_features={weight.shape[1]}, got x of shape {x.shape}")
    _check_bias("linear", bias, weight.shape[0])
    prec = resolve_precision(x.dtype, precision)
    lead, k = x.shape[:-1], x.shape[-1]
    out = _run(x.reshape(1, math.prod(lead), k), weight[None], bias, out_dtype, prec, True, "linear")
    return out.reshape(*lead, weight.shape[0])


def _dimension_numbers(dimension_numbers, lhs, rhs):
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` as tuples of
    ints, checked as ``lax.dot_general`` checks them: every dimension
    non-negative and below its operand's rank (TypeError otherwise), distinct,
    paired with one of the same size."""
    def dims(ds) -> tuple[int, ...]:  # a sequence of dimensions, or one (lax takes both)
        return (operator.index(ds),) if not isinstance(ds, (tuple, list)) else tuple(operator.index(d) for d in ds)

    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (dims(ds) for ds in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise TypeError(
            f"dot_general: dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)) "
            f"of integer dimensions, got {dimension_numbers!r}"
        ) from None
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise TypeError(f"dot_general: dimension_numbers {dimension_numbers!r} pair unequal numbers of dimensions")
    for name, x, contract, batch in (("lhs", lhs, lc, lb), ("rhs", rhs, rc, rb)):
        dims = contract + batch
        if any(d < 0 or d >= x.ndim for d in dims):
            raise TypeError(
                f"dot_general: {name} dimension numbers must be non-negative and less than its rank {x.ndim} "
                f"(shape {tuple(x.shape)}), got contracting {contract} and batch {batch}"
            )
        if len(set(dims)) != len(dims):
            raise TypeError(f"dot_general: {name} dimension numbers repeat a dimension: contracting {contract}, batch {batch}")
    for i, j in zip(lc + lb, rc + rb):
        if lhs.shape[i] != rhs.shape[j]:
            raise TypeError(
                f"dot_general: lhs dim {i} (size {lhs.shape[i]}) does not match rhs dim {j} (size {rhs.shape[j]})"
            )
    return lc, rc, lb, rb


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, out_sharding=None) -> jax.Array:
    """Batch-invariant ``jax.lax.dot_general``, with its signature, so that it
    plugs into Flax: ``nnx.Linear(..., dot_general=bi_jax.dot_general)``.

    Any contracting and batch dimensions are accepted. The operands are
    brought to (batch, M, K) and (batch, K, N) or (batch, N, K) (a transpose
    only where the dimensions are not already in that order) and multiplied
    with the kernels of :func:`matmul`. The result has lax's layout: batch
    dims, then lhs free dims, then rhs free dims. ``preferred_element_type``
    is the input dtype (default) or float32.
    """
    if out_sharding is not None:
        raise NotImplementedError("dot_general: out_sharding is not supported")
    out_dtype = _check_pair("dot_general", lhs, rhs, None, preferred_element_type)
    lc, rc, lb, rb = _dimension_numbers(dimension_numbers, lhs, rhs)
    prec = resolve_precision(lhs.dtype, precision)
    lf = [d for d in range(lhs.ndim) if d not in lc + lb]
    rf = [d for d in range(rhs.ndim) if d not in rc + rb]
    bshape = [lhs.shape[d] for d in lb]
    mshape = [lhs.shape[d] for d in lf]
    nshape = [rhs.shape[d] for d in rf]
    bsz, m, k, n = math.prod(bshape), math.prod(mshape), math.prod(lhs.shape[d] for d in lc), math.prod(nshape)
    a3 = jnp.transpose(lhs, (*lb, *lf, *lc)).reshape(bsz, m, k)
    # Keep the rhs as stored when its contracting dims are last (a (N, K)
    # weight): the kernel reads it K-major.
    b_kmajor = list(rc) == list(range(rhs.ndim - len(rc), rhs.ndim)) and len(rc) > 0
    if b_kmajor:
        b3 = jnp.transpose(rhs, (*rb, *rf, *rc)).reshape(bsz, n, k)
    else:
        b3 = jnp.transpose(rhs, (*rb, *rc, *rf)).reshape(bsz, k, n)
    out = _run(a3, b3, None, out_dtype, prec, b_kmajor, "dot_general")
    return out.reshape(*bshape, *mshape, *nshape)


def einsum(subscripts: str, *operands, optimize="auto", precision=None, preferred_element_type=None,
           out_sharding=None) -> jax.Array:
    """``jnp.einsum`` whose contractions run :func:`dot_general`, for Flax's
    ``nnx.Einsum(..., einsum_op=bi_jax.einsum)``.

    jnp.einsum reduces each pairwise contraction with its ``_dot_general``
    argument (a private hook of ``jnp.einsum``); this passes the batch-invariant
    one. An index summed within a single operand is reduced by ``jnp.sum``
    before that, in XLA's order: wrap the caller in ``bi_jax.batch_invariant``
    to route those sums as well. ``out_sharding`` must be None.
    """
    if out_sharding is not None:
        raise NotImplementedError("einsum: out_sharding is not supported")
    return jnp.einsum(subscripts, *operands, optimize=optimize, precision=precision,
                      preferred_element_type=preferred_element_type, _dot_general=dot_general)

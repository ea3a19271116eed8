"""bi_jax matmul API: jnp.matmul / lax.dot_general semantics, bias, precision,
jit and vmap, errors, Mosaic GPU lowering of every config; and, on the GPU,
the proof that every config gives bi_torch's bits."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bi_core import matmul as contract

import bi_jax
from bi_jax.ops import matmul as jm


def _rand(*shape, dtype=jnp.float32, seed=0, scale=1.0):
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return jnp.asarray(x).astype(dtype)


def _f64(x) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32), dtype=np.float64)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.int16, 4: np.int32}[x.dtype.itemsize])


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((7, 33), (33, 20)), ((33,), (33, 20)), ((7, 33), (33,)), ((33,), (33,)), ((2, 3, 33), (33, 20)),
     ((4, 5, 33), (4, 33, 20)), ((2, 1, 5, 33), (3, 33, 20)), ((5, 33), (2, 33, 20))],
    ids=str,
)
def test_shapes_follow_jnp_matmul(a_shape, b_shape):
    a, b = _rand(*a_shape, seed=1), _rand(*b_shape, seed=2)
    got = bi_jax.matmul(a, b)
    want = np.matmul(_f64(a), _f64(b))
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_bias_and_preferred_element_type(dtype):
    a, b, bias = _rand(9, 40, dtype=dtype, seed=3), _rand(40, 24, dtype=dtype, seed=4), _rand(24, dtype=dtype, seed=5)
    ref = _f64(a) @ _f64(b) + _f64(bias)
    wide = bi_jax.matmul(a, b, bias, preferred_element_type=jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wide, np.float64), ref, rtol=1e-5, atol=1e-4)
    narrow = bi_jax.matmul(a, b, bias)
    assert narrow.dtype == dtype
    # One rounding: the narrow output is the fp32 result rounded once.
    np.testing.assert_array_equal(_bits(narrow), _bits(wide.astype(dtype)))


@pytest.mark.parametrize(
    "lhs_shape,rhs_shape,dims",
    [
        ((6, 40), (40, 24), (((1,), (0,)), ((), ()))),  # x @ W (Flax Dense / nnx.Linear)
        ((2, 3, 40), (24, 40), (((2,), (1,)), ((), ()))),  # x @ W.T, read K-major
        ((40, 6), (40, 24), (((0,), (0,)), ((), ()))),  # transposed lhs
        ((4, 6, 40), (4, 40, 24), (((2,), (1,)), ((0,), (0,)))),  # batched
        ((6, 4, 40), (4, 24, 40), (((2,), (2,)), ((1,), (0,)))),  # batch dim not leading
        ((6, 5, 8), (5, 8, 24), (((1, 2), (0, 1)), ((), ()))),  # two contracting dims
    ],
    ids=["dense", "kmajor", "lhs-t", "batched", "batch-inner", "two-k"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_dot_general_follows_lax(lhs_shape, rhs_shape, dims, dtype):
    lhs, rhs = _rand(*lhs_shape, dtype=dtype, seed=6), _rand(*rhs_shape, dtype=dtype, seed=7)
    got = bi_jax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
    want = lax.dot_general(lhs.astype(jnp.float32), rhs.astype(jnp.float32), dims, precision=lax.Precision.HIGHEST)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_linear_and_jit():
    x, w, bias = _rand(3, 5, 40, dtype=jnp.bfloat16, seed=8), _rand(24, 40, dtype=jnp.bfloat16, seed=9), _rand(24, seed=10)
    got = jax.jit(bi_jax.linear)(x, w, bias.astype(jnp.bfloat16))
    assert got.shape == (3, 5, 24) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(got), _bits(bi_jax.linear(x, w, bias.astype(jnp.bfloat16))))
    ref = _f64(x) @ _f64(w).T + _f64(bias.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=8e-3, atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_vmap_gives_the_bits_of_the_unmapped_call(dtype):
    a, b = _rand(4, 6, 40, dtype=dtype, seed=11), _rand(4, 40, 24, dtype=dtype, seed=12)
    w = _rand(40, 24, dtype=dtype, seed=13)
    # Mapped activations, shared weight: folded into M.
    mapped = jax.vmap(lambda x: bi_jax.matmul(x, w))(a)
    np.testing.assert_array_equal(_bits(mapped), _bits(bi_jax.matmul(a, w)))
    # Both mapped: per-batch weights.
    mapped = jax.jit(jax.vmap(bi_jax.matmul))(a, b)
    np.testing.assert_array_equal(_bits(mapped), _bits(bi_jax.matmul(a, b)))
    # Only the weight mapped.
    mapped = jax.vmap(lambda y: bi_jax.matmul(a[0], y))(b)
    np.testing.assert_array_equal(_bits(mapped), _bits(bi_jax.matmul(jnp.broadcast_to(a[0], (4, 6, 40)), b)))


def test_precision_follows_jax():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert jm.resolve_precision(f32, None) == "ieee"
    assert jm.resolve_precision(f32, lax.Precision.HIGHEST) == "ieee"
    assert jm.resolve_precision(f32, lax.Precision.DEFAULT) == "tf32"
    assert jm.resolve_precision(f32, (lax.Precision.DEFAULT, lax.Precision.DEFAULT)) == "tf32"
    assert jm.resolve_precision(bf16, lax.Precision.DEFAULT) == "ieee"
    with jax.default_matmul_precision("tensorfloat32"):
        assert jm.resolve_precision(f32, None) == "tf32"
    with jax.default_matmul_precision("float32"):
        assert jm.resolve_precision(f32, None) == "ieee"
    with pytest.raises(NotImplementedError, match="bfloat16"):
        jm.resolve_precision(f32, lax.Precision.HIGH)
    with pytest.raises(ValueError, match="equal"):
        jm.resolve_precision(f32, (lax.Precision.DEFAULT, lax.Precision.HIGHEST))


def test_errors_name_the_problem():
    a, b = _rand(4, 8), _rand(8, 3)
    with pytest.raises(TypeError, match="same dtype"):
        bi_jax.matmul(a, b.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="^matmul: a has dtype int32"):
        bi_jax.matmul(a.astype(jnp.int32), b.astype(jnp.int32))
    # Every op's dtype error names the op called.
    with pytest.raises(TypeError, match="^linear: x has dtype int32"):
        bi_jax.linear(a.astype(jnp.int32), b.T)
    with pytest.raises(TypeError, match="^sum: x has dtype int32"):
        bi_jax.sum(a.astype(jnp.int32), axis=-1)
    with pytest.raises(TypeError, match="^softmax: x has dtype int32"):
        bi_jax.softmax(a.astype(jnp.int32))
    with pytest.raises(TypeError, match="^rms_norm: weight has dtype int32"):
        bi_jax.rms_norm(a, jnp.ones(8, jnp.int32))
    with pytest.raises(ValueError, match="cannot be multiplied"):
        bi_jax.matmul(a, _rand(7, 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        bi_jax.matmul(a, b, _rand(4))
    with pytest.raises(TypeError, match="preferred_element_type"):
        bi_jax.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float16)
    with pytest.raises(ValueError, match="do not broadcast"):
        bi_jax.matmul(_rand(2, 4, 8), _rand(3, 8, 3))
    with pytest.raises(ValueError, match="in_features"):
        bi_jax.linear(a, _rand(3, 7))
    # dimension_numbers are checked as lax.dot_general checks them (TypeError).
    with pytest.raises(TypeError, match="does not match"):
        bi_jax.dot_general(a, _rand(7, 3), (((1,), (0,)), ((), ())))
    with pytest.raises(TypeError, match="dimension_numbers must be"):
        bi_jax.dot_general(a, b, ((1,), (0,)))
    for bad in ((((5,), (0,)), ((), ())), (((-1,), (0,)), ((), ())), (((1,), (-2,)), ((), ()))):
        with pytest.raises(TypeError, match="non-negative and less than its rank"):
            bi_jax.dot_general(a, b, bad)
        with pytest.raises(TypeError):  # what lax does with them
            jax.lax.dot_general(a, b, bad)
    with pytest.raises(TypeError, match="repeat"):
        bi_jax.dot_general(_rand(4, 4), _rand(4, 4), (((1, 1), (0, 1)), ((), ())))
    for dims in ((((np.int64(1),), (np.int64(0),)), ((), ())), ((1, 0), ((), ()))):  # numpy ints, bare ints
        np.testing.assert_array_equal(np.asarray(bi_jax.dot_general(a, b, dims)), np.asarray(bi_jax.matmul(a, b)))
    with pytest.raises(ValueError, match="not a precision"):
        bi_jax.matmul(a, b, precision="bogus")
    with pytest.raises(NotImplementedError, match="out_sharding"):
        bi_jax.dot_general(a, b, (((1,), (0,)), ((), ())), out_sharding=object())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("k,n", [(32, 32), (33, 20)])
def test_invariance_rows_alone_and_in_a_batch(k, n, dtype):
    """Every row of a 36-row product computed alone has the batch's bits, in
    fp32 out. Regression for the CPU, where the interpreted Mosaic kernel's
    wgmma is XLA:CPU's dot, which rounds a row by its position in the tile
    (15 of 36 bf16 rows differed at K = N = 32; see ``kernel_for``)."""
    a, b = _rand(36, k, dtype=dtype, seed=k), _rand(k, n, dtype=dtype, seed=n)
    full = _bits(bi_jax.matmul(a, b, preferred_element_type=jnp.float32))
    for r in range(0, 36, 3):
        np.testing.assert_array_equal(_bits(bi_jax.matmul(a[r : r + 1], b, preferred_element_type=jnp.float32)),
                                      full[r : r + 1], err_msg=f"row {r}")


def test_zero_sizes():
    assert bi_jax.matmul(_rand(0, 8), _rand(8, 3)).shape == (0, 3)
    out = bi_jax.matmul(_rand(4, 0), _rand(0, 3), _rand(3, seed=1))
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to(np.asarray(_rand(3, seed=1)), (4, 3)))


# --- Mosaic GPU lowering of every config (no GPU needed) ---------------------

_LOWER_SHAPES = ((1, 4096, 4096), (1001, 77, 333), (3000, 1000, 3000), (9, 24, 40))


@pytest.mark.parametrize("cfg", contract.wgmma_configs(), ids=str)
def test_every_wgmma_config_lowers_for_hopper(cfg):
    """Lowers the kernel to Mosaic GPU for CUDA (layout inference, shared-memory
    budget, TMA tiling) for awkward shapes, both weight layouts, narrow and
    fp32 outputs, with and without bias. Compiling and running it needs a GPU;
    the bits are proven by the GPU tests below."""
    failures = []
    for (m, k, n), kmajor, out_dtype, bias in itertools.product(
        _LOWER_SHAPES, (False, True), (jnp.float32, jnp.bfloat16), (False, True)
    ):
        a = jax.ShapeDtypeStruct((1, m, k), jnp.bfloat16)
        b = jax.ShapeDtypeStruct((1, n, k) if kmajor else (1, k, n), jnp.bfloat16)
        bb = jax.ShapeDtypeStruct((n,), jnp.float32) if bias else None

        def f(a, b, bb, kmajor=kmajor, out_dtype=out_dtype):
            return jm.wgmma_product(a, b, bb, out_dtype, cfg, b_kmajor=kmajor, interpret=False, num_sms=132)

        try:
            jax.jit(f).trace(a, b, bb).lower(lowering_platforms=("cuda",))
        except Exception as e:  # noqa: BLE001  (collect every failing case)
            failures.append(f"M={m} K={k} N={n} kmajor={kmajor} out={jnp.dtype(out_dtype).name} bias={bias}: {e}")
    assert not failures, "\n".join(failures[:5])


@pytest.mark.parametrize("kmajor", [False, True])
def test_mosaic_kernel_runs_in_its_interpreter(kmajor):
    """The Mosaic GPU kernel, interpreted on the CPU (``launch`` with its
    interpreter config): the values of the product, with a bias and padded
    shapes. Its bits are proven on the GPU only: interpreted, ``wgmma`` is
    XLA:CPU's dot, which the CPU dispatch avoids (``kernel_for``)."""
    a, w, bias = _rand(9, 70, dtype=jnp.bfloat16, seed=14), _rand(70, 40, dtype=jnp.bfloat16, seed=15), _rand(40, seed=16)
    b3 = jnp.asarray(w.T)[None] if kmajor else w[None]
    got = jm.launch(a[None], b3, bias, jnp.dtype(jnp.float32), "ieee", kmajor, contract.INTERPRET_WGMMA_CONFIG)[0]
    np.testing.assert_allclose(np.asarray(got), _f64(a) @ _f64(w) + _f64(bias), rtol=1e-5, atol=1e-4)


def test_wgmma_tables_are_well_formed():
    bounds = [b for b, _ in contract.WGMMA_TABLE]
    assert bounds == sorted(bounds) and bounds[-1] >= 1 << 40
    assert all(len(row) == len(contract.COLUMNS) for _, row in contract.WGMMA_TABLE)
    for cfg in contract.wgmma_configs():
        assert cfg.block_m in (64, 128) and cfg.block_n % 32 == 0 and cfg.block_k % 32 == 0
        assert cfg.compute_wgs in (1, 2) and cfg.stages >= 2


def test_dispatch_by_m():
    """On the GPU, bf16/fp16 products of up to JAX_TRITON_MAX_M rows and
    JAX_TRITON_MAX_N columns run the Triton-lowered kernel, others the Mosaic
    GPU one; fp32 always the Triton one. Interpreted, 16-bit products take the
    Mosaic kernel at every M."""
    small, big = contract.JAX_TRITON_MAX_M, contract.JAX_TRITON_MAX_M + 1
    n, wide = contract.JAX_TRITON_MAX_N, contract.JAX_TRITON_MAX_N + 1
    for dtype in ("bfloat16", "float16"):
        assert [jm.kernel_for(dtype, m, n, True, False) for m in (1, small, big)] == ["triton", "triton", "mosaic"]
        assert jm.kernel_for(dtype, 1, wide, True, False) == "mosaic"
        assert jm.kernel_for(dtype, 1, n, False, False) == "mosaic"  # past int32 offsets
        # Interpreted, every product takes the Triton kernel (see kernel_for).
        assert {jm.kernel_for(dtype, m, n, True, True) for m in (1, small, big)} == {"triton"}
    assert {jm.kernel_for("float32", m, c, f, i) for m in (1, big) for c in (n, wide) for f in (True, False)
            for i in (True, False)} == {"triton"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_launch_runs_the_dispatched_kernel(dtype):
    """``launch`` runs the kernel that ``kernel_for`` names: the Triton-lowered
    Pallas call is named ``bi_matmul_triton`` in the traced program, and no
    other kernel is."""
    w = _rand(64, 48, dtype=jnp.dtype(dtype), seed=1)
    interpret = jm.interpret_mode("matmul")
    for m in (1, contract.JAX_TRITON_MAX_M, contract.JAX_TRITON_MAX_M + 1):
        a = _rand(m, 64, dtype=jnp.dtype(dtype), seed=m)
        program = str(jax.make_jaxpr(lambda a, b: jm.launch(a[None], b[None], None, jnp.float32, "ieee", False))(a, w))
        ran = "triton" if "bi_matmul_triton" in program else "mosaic"
        assert ran == jm.kernel_for(dtype, m, 48, True, interpret), (m, ran)


# --- GPU: every config gives bi_torch's bits -------------------------------------

# (K, N, weight stored K-major, output in the input dtype rather than fp32,
# bias): aligned; K and N off-tile (padded for TMA); odd; both layouts; fp32
# output (no rounding hides an order change) and the narrow one; a bias with a
# K that fits one K tile of some configs and not of others (a Triton pass
# once folded the bias into the product there, for some tiles only).
_PROOF_CASES = (
    (4096, 4096, False, False, False), (4096, 4096, True, False, False), (4096, 4096, False, True, False),
    (1000, 3000, False, False, False), (1001, 77, False, False, False), (1001, 77, True, True, False),
    (165, 128, True, True, True), (200, 300, False, False, True),
)


def _proof_cases():
    # tf32 agrees since bi_torch rounds its operands to nearest like jaxlib's
    # Triton does (bench/NOTES.md, "tf32 across frameworks": truncation before).
    return [pytest.param(d, p, id=f"{d}-{p}") for d, p in
            [("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "ieee"), ("float32", "tf32")]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", _proof_cases())
def test_every_jax_config_gives_bi_torch_bits(dtype, precision):
    """For every config the JAX dispatch can pick (Mosaic GPU for bf16/fp16,
    bi_torch's small-M Triton tiles for them up to 32 rows, the fp32 Triton
    tables), rows of M = 1, 33, 300 and 2000 at moving offsets equal the same
    rows of one 2000-row bi_torch launch."""
    import torch

    import bi_torch

    if dtype == "float32":
        configs = contract.configs(dtype, precision)
    else:
        configs = contract.wgmma_configs() + contract.jax_triton_configs()
    jdt, tdt = jnp.dtype(dtype), getattr(torch, dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    bad = []
    try:
        for k, n, kmajor, narrow, with_bias in _PROOF_CASES:
            a = _rand(2000, k, dtype=jdt, seed=k)
            w = _rand(k, n, dtype=jdt, seed=n, scale=k**-0.5)
            bias = _rand(n, dtype=jdt, seed=n + 1) if with_bias else None
            at = torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", tdt)
            wt = torch.from_numpy(np.asarray(w.astype(jnp.float32))).to("cuda", tdt)
            bt = None if bias is None else torch.from_numpy(np.asarray(bias.astype(jnp.float32))).to("cuda", tdt)
            b3 = jnp.asarray(w.T)[None] if kmajor else w[None]
            bias32 = None if bias is None else bias.astype(jnp.float32)
            out_dtype = jdt if narrow else jnp.dtype(jnp.float32)
            ref = bi_torch.matmul(at, wt, bt, out_dtype=getattr(torch, out_dtype.name))
            ref = ref.view({2: torch.int16, 4: torch.int32}[ref.element_size()]).cpu().numpy()
            for cfg in configs:
                for m in (1, 33, 300, 2000):
                    start = (m * 37) % (2000 - m + 1)
                    got = jm.launch(a[start:start + m][None], b3, bias32, out_dtype, precision, kmajor, cfg)[0]
                    if not np.array_equal(_bits(got), ref[start:start + m]):
                        bad.append(f"{cfg} K={k} N={n} M={m} kmajor={kmajor} out={out_dtype.name} bias={with_bias}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert not bad, f"{len(bad)} launches differ from bi_torch: " + "; ".join(bad[:10])

"""bi_jax.batch_invariant: which primitives it routes, strictness, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bi_jax
from tests_profile import PROFILE


def _bits(a):
    a = np.asarray(a)
    return a.view(np.int32 if a.dtype.itemsize == 4 else np.int16)


def _block(x, w1, w2):
    h = jax.nn.softmax(x @ w1, axis=-1)
    y = jnp.einsum("bh,hd->bd", h, w2)
    return jax.nn.log_softmax(y, axis=-1), jnp.mean(y, axis=-1)


def _manual(x, w1, w2):
    """The same block written with the bi_ kernels by hand."""
    s = bi_jax.dot_general(x, w1, (((1,), (0,)), ((), ())))
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    h = e / bi_jax.sum(e, axis=(1,))[:, None]
    y = bi_jax.dot_general(h, w2, (((1,), (0,)), ((), ())))
    shifted = y - jnp.max(y, axis=-1, keepdims=True)
    logp = shifted - jnp.log(bi_jax.sum(jnp.exp(shifted), axis=(1,)))[:, None]
    return logp, bi_jax.sum(y, axis=(1,)) / y.shape[-1]


def _data(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((6, 16)), dtype), jnp.asarray(rng.standard_normal((16, 24)), dtype),
            jnp.asarray(rng.standard_normal((24, 8)), dtype))


def test_products_and_sums_run_the_bi_kernels():
    x, w1, w2 = _data()
    f = bi_jax.batch_invariant(_block)
    got = f(x, w1, w2)
    want = _manual(x, w1, w2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    # Against XLA at full fp32 precision: on a GPU its default for fp32 is tf32,
    # while the bi_ products follow the precision setting (full by default).
    with jax.default_matmul_precision("highest"):
        default = _block(x, w1, w2)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(default[0]), rtol=1e-4, atol=1e-5)
    # Two products and three sums (softmax, log_softmax, mean) ran the kernels.
    assert f.handled == {"dot_general": 2, "reduce_sum": 3} and not f.unhandled


def test_rows_do_not_depend_on_the_batch():
    x, w1, w2 = _data()
    f = bi_jax.batch_invariant(_block)
    full = f(x, w1, w2)
    part = f(x[2:5], w1, w2)
    for a, b in zip(full, part):
        np.testing.assert_array_equal(_bits(a[2:5]), _bits(b))


def test_composes_with_jit():
    x, w1, w2 = _data()
    f = bi_jax.batch_invariant(_block)
    for a, b in zip(jax.jit(f)(x, w1, w2), f(x, w1, w2)):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_strict_refuses_reductions_it_cannot_route():
    def cumulative(x):
        return jnp.cumsum(x, axis=-1)

    x = jnp.ones((2, 5), jnp.float32)
    with pytest.raises(bi_jax.BatchVarianceRisk, match="cumsum"):
        bi_jax.batch_invariant(cumulative, strict=True)(x)
    lenient = bi_jax.batch_invariant(cumulative)
    np.testing.assert_array_equal(np.asarray(lenient(x)), np.cumsum(np.ones((2, 5)), axis=-1))
    assert lenient.unhandled["cumsum"] == 1

    def in_scan(x):
        return jax.lax.scan(lambda c, r: (c + jnp.sum(r), None), 0.0, x)[0]

    with pytest.raises(bi_jax.BatchVarianceRisk, match="scan"):
        bi_jax.batch_invariant(in_scan, strict=True)(x)


def test_integer_and_exact_ops_run_as_they_are():
    @bi_jax.batch_invariant(strict=True)
    def f(x, i):
        return jnp.max(x, axis=-1), jnp.sum(i), jnp.argmax(x, axis=-1)

    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7)), jnp.float32)
    m, s, a = f(x, jnp.arange(10))
    np.testing.assert_array_equal(np.asarray(m), np.asarray(x).max(-1))
    assert int(s) == 45 and np.array_equal(np.asarray(a), np.asarray(x).argmax(-1))


def test_composes_with_vmap():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 6, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
    g = bi_jax.batch_invariant(lambda x, w: jax.nn.log_softmax(x @ w, axis=-1))
    mapped = jax.vmap(g, in_axes=(0, None))(x, w)
    np.testing.assert_array_equal(_bits(mapped), _bits(jnp.stack([g(x[i], w) for i in range(3)])))


def test_vmap_inside_the_transform():
    """jax.vmap writes the axes of the reductions it batches as numpy
    integers; the transform routes them like ints."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5, 6)), jnp.float32)
    f = bi_jax.batch_invariant(jax.vmap(lambda r: jnp.sum(r, axis=0)), strict=True)
    np.testing.assert_array_equal(_bits(f(x)), _bits(bi_jax.sum(x, axis=1)))
    assert f.handled["reduce_sum"] == 1


@pytest.mark.parametrize("n", [65, 97, 130])
def test_log_softmax_rows_alone_and_in_a_batch(n):
    """``jax.nn.log_softmax`` under the transform: a row alone has the bits it
    has in a batch of 3. Regression for the CPU, where XLA:CPU's vector and
    scalar ``log`` round differently and the transform computes it one
    element at a time there."""
    f = jax.jit(bi_jax.batch_invariant(lambda v: jax.nn.log_softmax(v, axis=-1), strict=True))
    for seed in range(4):
        x = jnp.asarray(3 * np.random.default_rng(seed).standard_normal((3, n)), jnp.float32)
        full = f(x)
        for r in range(3):
            np.testing.assert_array_equal(_bits(f(x[r : r + 1])), _bits(full[r : r + 1]), err_msg=f"seed {seed} row {r}")


_HIGHEST = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize(
    "op,call,reference",
    [
        ("sum", lambda x: bi_jax.sum(x, axis=-1).sum(), lambda x: jnp.sum(x, axis=-1).sum()),
        ("mean", lambda x: bi_jax.mean(x, axis=-1).sum(), lambda x: jnp.mean(x, axis=-1).sum()),
        ("softmax", lambda x: bi_jax.softmax(x)[0, 0], lambda x: jax.nn.softmax(x)[0, 0]),
        ("log_softmax", lambda x: bi_jax.log_softmax(x)[0, 0], lambda x: jax.nn.log_softmax(x)[0, 0]),
        ("rms_norm", lambda x: bi_jax.rms_norm(x).sum(),
         lambda x: (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)).sum()),
        ("matmul", lambda x: bi_jax.matmul(x, x.T).sum(), lambda x: jnp.matmul(x, x.T, precision=_HIGHEST).sum()),
        ("linear", lambda x: bi_jax.linear(x, x).sum(), lambda x: jnp.matmul(x, x.T, precision=_HIGHEST).sum()),
        ("dot_general", lambda x: bi_jax.dot_general(x, x, (((1,), (1,)), ((), ()))).sum(),
         lambda x: jnp.matmul(x, x.T, precision=_HIGHEST).sum()),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_gradients_run_through_the_backward_rules(op, call, reference):
    """``jax.grad`` through each op runs its backward rule (bi_ kernels) and
    agrees with the gradient of the plain JAX expression."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 4)), jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.grad(call)(x)), np.asarray(jax.grad(reference)(x)), rtol=1e-5,
                               atol=1e-5, err_msg=op)


def test_attention_gradients_without_a_rule_are_refused_by_name():
    """Dense attention trains; a window (or a mask, lengths, varlen, pages)
    has no backward yet: jax.grad names the op and what it lacks instead of
    failing inside Pallas with an empty AssertionError."""
    q = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 2, 64)), jnp.float32)
    assert jax.grad(lambda q: bi_jax.attention(q, q, q, causal=True).sum())(q).shape == q.shape
    with pytest.raises(NotImplementedError, match=r"bi_jax.attention has no derivative rule for this call \(a window\)"):
        jax.grad(lambda q: bi_jax.attention(q, q, q, window=2).sum())(q)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_jax_nn_dot_product_attention_runs_through_the_kernels(dtype):
    """jax.nn.dot_product_attention (its xla implementation) under the strict
    transform: its products (bf16 ones with the BF16_BF16_F32 dot algorithm)
    and sums run the bi_ kernels, close to the default, and a sequence gets
    the same bits alone and in a batch."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 24, h, 64)), dtype) for h in (4, 2, 2))
    attend = jax.jit(bi_jax.batch_invariant(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                                            strict=True))
    got = attend(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    alone = attend(q[1:2], k[1:2], v[1:2])
    assert (_bits(alone[0]) == _bits(got[1])).all()
    # The fused bi_ attention kernel, not products and sums over the scores.
    assert attend.__wrapped__.handled["bi_attention"] == 2 and not attend.__wrapped__.handled["dot_general"]
    assert (_bits(got) == _bits(bi_jax.dot_product_attention(q, k, v, is_causal=True))).all()


@pytest.mark.parametrize("implementation", [None, "xla", "cudnn"])
def test_jax_nn_dot_product_attention_is_routed_whatever_the_implementation(implementation):
    """Under the transform, every implementation of jax.nn.dot_product_attention
    (cudnn too, a foreign call otherwise, and on the CPU) runs the bi_ kernel
    with the same arguments; outside it, jax.nn's function is JAX's."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, h, 64)), jnp.float32) for h in (4, 2, 2))
    mask = jnp.asarray(rng.random((2, 1, 16, 16)) < 0.8)

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.2, local_window_size=(5, 0),
                                            implementation=implementation)

    routed = bi_jax.batch_invariant(attend, strict=True)
    got = routed(q, k, v)
    assert routed.handled["bi_attention"] == 1, dict(routed.handled)
    want = bi_jax.dot_product_attention(q, k, v, mask=mask, scale=0.2, local_window_size=(5, 0))
    assert (_bits(got) == _bits(want)).all()
    if implementation != "cudnn":  # JAX's own, outside the transform
        outside = attend(q, k, v)
        # (loose: XLA's fp32 products on a GPU may use tf32)
        np.testing.assert_allclose(np.asarray(outside), np.asarray(got), rtol=2e-2, atol=2e-2)
        jaxpr = jax.make_jaxpr(attend)(q, k, v)
        assert "pallas_call" not in str(jaxpr)
    with pytest.raises(ValueError, match="implementation='flash'"):
        bi_jax.batch_invariant(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="flash"))(
            q, k, v)


def test_bi_jax_ops_inside_the_strict_transform_run_as_they_are():
    """A function that already calls bi_jax ops: their kernels pass strict
    mode (counted by kernel name); a Pallas kernel of another name is refused."""
    from jax.experimental import pallas as pl

    x, w, _ = _data()
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 8, h, 64)), jnp.float32) for h in (4, 2, 2))

    def block(x, w, q, k, v):
        y = bi_jax.rms_norm(bi_jax.matmul(x, w), None)
        return bi_jax.log_softmax(y, -1), bi_jax.sum(y, axis=-1), bi_jax.attention(q, k, v, causal=True)

    run = bi_jax.batch_invariant(block, strict=True)
    got = run(x, w, q, k, v)
    for a, b in zip(got, block(x, w, q, k, v)):
        assert (_bits(a) == _bits(b)).all()
    assert {"bi_matmul_triton", "bi_rms_norm", "bi_log_softmax", "bi_sum", "bi_attention"} <= set(run.handled)

    # Under vmap, the bi_ ops keep their own batching rules (custom_vmap).
    xs = jnp.stack([x, x[::-1]])
    mapped = jax.vmap(bi_jax.batch_invariant(lambda x: bi_jax.matmul(x, w), strict=True))(xs)
    assert (_bits(mapped) == _bits(jax.vmap(lambda x: bi_jax.matmul(x, w))(xs))).all()

    def row_sums(x_ref, o_ref):
        o_ref[...] = jnp.sum(x_ref[...], axis=-1)

    def foreign(x):
        return pl.pallas_call(row_sums, out_shape=jax.ShapeDtypeStruct((x.shape[0],), x.dtype), interpret=True,
                              name="row_sums")(x)

    with pytest.raises(bi_jax.BatchVarianceRisk, match="pallas_call"):
        bi_jax.batch_invariant(foreign, strict=True)(x)


def test_dot_algorithms_the_kernels_do_not_compute_are_refused():
    a = jnp.ones((4, 8), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    ok = bi_jax.dot_general(a.astype(jnp.bfloat16), a.T.astype(jnp.bfloat16), dims,
                            precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32)
    assert ok.shape == (4, 4)
    for preset in (jax.lax.DotAlgorithmPreset.BF16_BF16_F32, jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3):
        with pytest.raises(NotImplementedError, match=f"dot algorithm {preset.name} on float32 inputs"):
            bi_jax.dot_general(a, a.T, dims, precision=preset)


def _reducing_fns():
    idx = jnp.array([0, 2, 0])
    return {
        "generic_reduce": lambda x: jax.lax.reduce(x, 0.0, lambda a, b: a + 2 * b, (1,)),
        "reduce_window": lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 4), (1, 4), "VALID"),
        # (scatter-adds of whole rows are routed: test_row_scatter_add_runs_the_ordered_kernel)
        "scatter_add": lambda x: x.at[idx, 1].add(x[:3, 0]),
        "segment_sum": lambda x: jax.ops.segment_sum(x[:, 0], jnp.array([0, 0, 1, 1, 2, 2]), 3),
        "fft": lambda x: jnp.fft.rfft(x).real,
        "linalg": lambda x: jnp.linalg.cholesky(x[:, :6] @ x[:, :6].T + 8 * jnp.eye(6)),
        "cumsum": lambda x: jnp.cumsum(x, axis=-1),
        "callback": lambda x: jax.pure_callback(lambda a: np.asarray(a).sum(-1), jax.ShapeDtypeStruct((6,), x.dtype), x),
        "cond_with_a_product": lambda x: jax.lax.cond(True, lambda y: jnp.prod(y, -1), lambda y: y[:, 0], x),
    }


@pytest.mark.parametrize("name", list(_reducing_fns()))
def test_strict_refuses_every_float_primitive_that_may_reduce(name):
    """Strictness follows what a primitive does: each of these may combine
    several elements into one, and none is routed."""
    x = _data()[0]
    fn = _reducing_fns()[name]
    with pytest.raises(bi_jax.BatchVarianceRisk, match="may combine several floating-point elements"):
        bi_jax.batch_invariant(fn, strict=True)(x)
    lenient = bi_jax.batch_invariant(fn)
    lenient(x)
    assert lenient.unhandled, name


def test_strict_lets_primitives_that_move_or_compare_elements_run():
    x = _data()[0]
    idx = jnp.array([0, 2, 0])

    def fn(x):
        return (x.at[idx].set(1.0), jnp.sort(x, -1), jnp.max(x, 0), jnp.take(x, idx, 0), jnp.concatenate([x, x]),
                jnp.where(x > 0, x, 0.0), x[::2], jnp.argmax(x, -1), jax.lax.top_k(x, 3), jax.lax.cummax(x, 1),
                jnp.exp(x).astype(jnp.bfloat16), jnp.pad(x, 1), jnp.flip(x, 0))

    wrapped = bi_jax.batch_invariant(fn, strict=True)
    wrapped(x)
    assert not wrapped.unhandled and not wrapped.handled


def test_checkpointed_and_shard_mapped_functions():
    """A sum inside jax.checkpoint runs the kernel (jax names its primitive
    remat2), and so does one inside a shard_map, over the same mesh and
    specs (a psum inside stays a reduction the kernels do not cover)."""
    from jax.sharding import Mesh, PartitionSpec

    x = _data()[0]
    checkpointed = bi_jax.batch_invariant(jax.checkpoint(lambda x: jnp.sum(x, -1)), strict=True)
    assert (_bits(checkpointed(x)) == _bits(bi_jax.sum(x, axis=-1))).all()
    assert checkpointed.handled["reduce_sum"] == 1
    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    spec = PartitionSpec("rows")
    mapped = bi_jax.batch_invariant(jax.shard_map(lambda x: jnp.sum(x, -1), mesh=mesh, in_specs=spec,
                                                  out_specs=spec, check_vma=False), strict=True)
    assert (_bits(jax.jit(mapped)(x)) == _bits(bi_jax.sum(x, axis=-1))).all()
    assert mapped.handled["reduce_sum"] == 1 and not mapped.unhandled
    psummed = jax.shard_map(lambda x: jax.lax.psum(jnp.sum(x, -1), "rows"), mesh=mesh, in_specs=spec,
                            out_specs=PartitionSpec(), check_vma=False)
    lenient = bi_jax.batch_invariant(psummed)
    np.testing.assert_allclose(np.asarray(lenient(x)), np.asarray(x).sum(-1), rtol=1e-5)
    assert lenient.handled["reduce_sum"] == 1 and lenient.unhandled["psum"] == 1
    with pytest.raises(bi_jax.BatchVarianceRisk, match="psum"):
        bi_jax.batch_invariant(psummed, strict=True)(x)


@pytest.mark.skipif(PROFILE.native, reason="the CPU backend's limit")
def test_a_checked_shard_map_on_the_cpu_runs_as_it_is():
    """On the CPU backend the kernels cannot run inside
    shard_map(check_vma=True) (the Pallas interpreter fails JAX's
    varying-axes check): its body runs as it is, counted, and strict mode
    says so."""
    from jax.sharding import Mesh, PartitionSpec

    x = _data()[0]
    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    checked = jax.shard_map(lambda x: jnp.sum(x, -1), mesh=mesh, in_specs=PartitionSpec("rows"),
                            out_specs=PartitionSpec("rows"))
    lenient = bi_jax.batch_invariant(checked)
    np.testing.assert_allclose(np.asarray(lenient(x)), np.asarray(x).sum(-1), rtol=1e-5)
    assert lenient.unhandled["shard_map"] == 1
    with pytest.raises(bi_jax.BatchVarianceRisk, match="check_vma=False"):
        bi_jax.batch_invariant(checked, strict=True)(x)


@pytest.mark.gpu
def test_kernels_inside_a_checked_shard_map():
    """On the GPU the bi_jax kernels run inside shard_map(check_vma=True)
    (their outputs vary over the axes their inputs vary over,
    ``bi_jax._pallas``), directly and through the transform."""
    from jax.sharding import Mesh, PartitionSpec

    x = _data()[0]
    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    spec = PartitionSpec("rows")
    direct = jax.shard_map(lambda x: bi_jax.sum(x, axis=-1), mesh=mesh, in_specs=spec, out_specs=spec)
    assert (_bits(direct(x)) == _bits(bi_jax.sum(x, axis=-1))).all()
    rewritten = bi_jax.batch_invariant(jax.shard_map(lambda x: jnp.sum(x, -1), mesh=mesh, in_specs=spec,
                                                     out_specs=spec), strict=True)
    assert (_bits(rewritten(x)) == _bits(bi_jax.sum(x, axis=-1))).all()

def test_row_scatter_add_runs_the_ordered_kernel():
    """A scatter-add of whole rows (the gradient of a row gather,
    ``segment_sum`` and ``.at[ids].add`` of rows) runs the embedding
    gradient's kernel under the transform, strict: the gradient of
    ``jnp.take`` is ``bi_jax.embedding``'s, bit for bit (bfloat16, where a
    scatter adding in the dtype rounds otherwise), and ids past the segments
    are dropped."""
    from bi_jax.ops.embedding import embedding_backward

    rng = np.random.default_rng(6)
    table = jnp.asarray(rng.standard_normal((7, 16)), jnp.bfloat16)
    ids = jnp.array([[1, 3, 6, 1], [3, 1, 1, 0]])

    def loss(embed):
        return lambda t: (embed(t).astype(jnp.float32) ** 2).sum()

    wrapped = bi_jax.batch_invariant(jax.grad(loss(lambda t: jnp.take(t, ids, axis=0))), strict=True)
    got = wrapped(table)
    assert wrapped.handled["scatter-add"] == 1
    want = jax.grad(loss(lambda t: bi_jax.embedding(ids, t)))(table)
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    x = jnp.asarray(rng.standard_normal((6, 16)), jnp.bfloat16)
    segments = jnp.array([0, 0, 0, 0, 2, 9])
    seg = bi_jax.batch_invariant(lambda x: jax.ops.segment_sum(x, segments, 3), strict=True)
    expect = embedding_backward(jnp.array([0, 0, 0, 0, 2, 3]), x, 3, jnp.bfloat16)  # 3: past the table
    assert np.array_equal(np.asarray(seg(x), np.float32), np.asarray(expect, np.float32))
    # Rows no id reaches keep the operand's bits (-0.0 too), as the scatter leaves them.
    m0 = jnp.zeros((3, 16), jnp.float32).at[1, 0].set(-0.0)
    add = bi_jax.batch_invariant(lambda m: m.at[jnp.array([0])].add(jnp.ones((1, 16))), strict=True)
    assert np.signbit(np.asarray(add(m0))[1, 0])

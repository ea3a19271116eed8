"""bi_jax.batch_invariant: which primitives it routes, strictness, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bi_jax


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

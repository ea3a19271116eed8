"""Row reductions (sum, mean, softmax, log_softmax): framework semantics,
dims and axes, dtypes and input validation in both frameworks."""

from __future__ import annotations

import numpy as np
import pytest

from harness.bits import np_dtype
from harness.frameworks import adapter
from tests_profile import PROFILE

FRAMEWORKS = ["torch", "jax"]


def _call(framework, op, x, axis, **kw):
    """The bi_ op with the framework's own keyword for the reduced dims."""
    ad = adapter(framework)
    key = "dim" if framework == "torch" else "axis"
    if framework == "torch" and "keepdims" in kw:
        kw["keepdim"] = kw.pop("keepdims")
    return ad.to_numpy(ad.kernel(op)(ad.to_native(x), **{key: axis}, **kw))


def _np_log_softmax(x, axis):
    x = x.astype(np.float64)
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    "shape,axis",
    [((5, 37), -1), ((2, 3, 40), 2), ((4, 6, 9), (1, 2)), ((4, 6, 9), 0), ((4, 6, 9), (0, 2)), ((3, 5), None),
     ((7,), 0), ((2, 20000), -1)],
    ids=str,
)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_sum_and_mean_follow_numpy(framework, shape, axis, op):
    x = (1.0 + np.random.default_rng(2).standard_normal(shape)).astype(np.float32)
    want = getattr(np, op)(x.astype(np.float64), axis=axis)
    got = _call(framework, op, x, axis)
    assert got.shape == np.shape(want) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
    kept = _call(framework, op, x, axis, keepdims=True)
    assert kept.shape == getattr(np, op)(x, axis=axis, keepdims=True).shape
    np.testing.assert_array_equal(kept.reshape(got.shape), got)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("shape,axis", [((5, 37), -1), ((3, 40, 2), 1), ((2, 20000), -1), ((6,), 0)], ids=str)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_and_log_softmax_follow_the_definition(framework, shape, axis, op):
    x = (4.0 * np.random.default_rng(3).standard_normal(shape)).astype(np.float32)
    want = _np_log_softmax(x, axis)
    want = np.exp(want) if op == "softmax" else want
    got = _call(framework, op, x, axis)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 if op == "log_softmax" else 1e-8)


def test_jax_softmax_over_several_axes():
    # jax.nn.softmax takes a tuple of axes; torch.softmax a single dim.
    x = np.random.default_rng(4).standard_normal((3, 4, 5)).astype(np.float32)
    got = _call("jax", "softmax", x, (1, 2))
    np.testing.assert_allclose(got, np.exp(_np_log_softmax(x, (1, 2))), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", ["sum", "mean", "softmax", "log_softmax"])
def test_low_precision_output_keeps_the_input_dtype(framework, dtype, op):
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np_dtype(dtype))
    got = _call(framework, op, x, -1)
    assert got.dtype == np_dtype(dtype)
    ref = {"sum": lambda v: v.sum(-1), "mean": lambda v: v.mean(-1),
           "softmax": lambda v: np.exp(_np_log_softmax(v, -1)), "log_softmax": lambda v: _np_log_softmax(v, -1)}[op]
    np.testing.assert_allclose(got.astype(np.float64), ref(x.astype(np.float64)), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_dtype_argument_casts_first(framework):
    ad = adapter(framework)
    x = np.random.default_rng(6).standard_normal((2, 50)).astype(np.float32)
    if framework == "torch":
        import torch

        out = ad.kernel("sum")(ad.to_native(x), -1, dtype=torch.bfloat16)
        soft = ad.kernel("softmax")(ad.to_native(x), -1, dtype=torch.float16)
    else:
        import jax.numpy as jnp

        out = ad.kernel("sum")(ad.to_native(x), -1, dtype=jnp.bfloat16)
        soft = None
    assert ad.to_numpy(out).dtype == np_dtype("bfloat16")
    want = x.astype(np_dtype("bfloat16")).astype(np.float64).sum(-1)
    np.testing.assert_allclose(ad.to_numpy(out).astype(np.float64), want, rtol=2e-2)
    if soft is not None:
        assert ad.to_numpy(soft).dtype == np.float16


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_empty_reductions(framework):
    x = np.zeros((3, 0), dtype=np.float32)
    np.testing.assert_array_equal(_call(framework, "sum", x, -1), np.zeros(3, np.float32))
    assert np.isnan(_call(framework, "mean", x, -1)).all()
    for op in ("softmax", "log_softmax"):
        # An empty batch, and an empty reduced dim: an empty result, as the frameworks give.
        assert _call(framework, op, np.zeros((0, 5), np.float32), -1).shape == (0, 5)
        assert _call(framework, op, np.zeros((5, 0), np.float32), -1).shape == (5, 0)
        assert _call(framework, op, np.zeros((5, 0), np.float32), 0).shape == (5, 0)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_integer_like_axes(framework):
    """numpy integers (which jax.vmap writes) and, in torch, 0-d integer
    tensors name a dim, as they do for torch.sum and jnp.sum."""
    x = np.random.default_rng(7).standard_normal((3, 5)).astype(np.float32)
    want = _call(framework, "sum", x, 1)
    for axis in (np.int64(1), np.int32(-1), (np.int64(1),)):
        np.testing.assert_array_equal(_call(framework, "sum", x, axis), want)
    np.testing.assert_array_equal(_call(framework, "softmax", x, np.int64(1)), _call(framework, "softmax", x, 1))
    if framework == "torch":
        import torch

        np.testing.assert_array_equal(_call(framework, "sum", x, torch.tensor(1)), want)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_non_integer_axes_name_the_problem(framework):
    key = "dim" if framework == "torch" else "axis"
    x = adapter(framework).to_native(np.ones((2, 3), np.float32))
    for bad in (1.0, "1", True):
        with pytest.raises(TypeError, match=f"{key} must be an int"):
            adapter(framework).kernel("sum")(x, **{key: bad})
    with pytest.raises(TypeError, match=f"{key} must be an int"):
        adapter(framework).kernel("softmax")(x, **{key: 1.5})


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_errors_name_the_problem(framework):
    ad = adapter(framework)
    key = "dim" if framework == "torch" else "axis"
    x = ad.to_native(np.ones((2, 3), np.float32))
    with pytest.raises((IndexError, ValueError), match="out of"):
        ad.kernel("sum")(x, **{key: 5})
    with pytest.raises(ValueError, match="repeats"):
        ad.kernel("mean")(x, **{key: (1, -1)})
    with pytest.raises(TypeError, match="dtype"):
        ad.kernel("softmax")(ad.to_native(np.ones((2, 3), np.int32)))


def test_rows_too_long_for_int32_offsets_are_refused_torch():
    """Rows past int32 offsets (2**31 - 1 - 8192 elements) are refused before
    any launch. ``torch.empty`` on the host takes no memory until written."""
    import torch

    import bi_torch

    device = adapter("torch").device
    x = torch.empty((1, 2**31), dtype=torch.float16, device=device)
    for op in ("sum", "softmax", "rms_norm"):
        with pytest.raises(ValueError, match="too long"):
            getattr(bi_torch, op)(x)
    del x


def test_rows_too_long_for_int32_offsets_are_refused_jax():
    """The same for JAX, checked while tracing: no array is allocated."""
    import jax
    import jax.numpy as jnp

    import bi_jax

    x = jax.ShapeDtypeStruct((1, 2**31), jnp.float16)
    for op in ("sum", "softmax", "rms_norm"):
        with pytest.raises(ValueError, match="too long"):
            jax.eval_shape(getattr(bi_jax, op), x)


# fp32 row lengths: 16-byte multiples (100, 5128, 4096) and not (1869, 4098).
# For the latter the compilers' load layout depends on alignment facts outside
# the row (see bi_core.rms_norm.SumTree).
# 65 and 66: one row's JAX sum, interpreted, once had other bits alone than in
# a batch of 4 (XLA:CPU merged the tree's levels; bi_core.rms_norm.reduce_tree).
ALIGNED, UNALIGNED = [100, 5128, 4096], [65, 66, 1869, 4098]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("n", UNALIGNED + ALIGNED)
@pytest.mark.parametrize("op", ["rms_norm", "sum", "mean", "softmax", "log_softmax"])
def test_invariance_one_row_batch(framework, n, op):
    """A row alone gives the bits it gets among others. Regression: Pallas
    folds the row index of a one-program grid to 0, and on an H100 a one-row
    fp32 softmax of 1869 columns came out 2 ULP from the same row in a batch."""
    ad = adapter(framework)

    def run(x):
        if op == "rms_norm":
            return ad.to_numpy(ad.kernel(op)(ad.to_native(x)))
        return _call(framework, op, x, -1)

    for seed in range(4):
        x = (1.0 + 3.0 * np.random.default_rng(n + seed).standard_normal((4, n))).astype(np.float32)
        alone, batch = run(x[:1]), run(x)
        np.testing.assert_array_equal(alone.view(np.int32), batch[:1].view(np.int32), err_msg=f"seed {seed}")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("n", UNALIGNED + ALIGNED + [20000])
def test_sums_follow_the_documented_tree(framework, n):
    """The fp32 ``sum`` of a row equals ``bi_core.rms_norm.SumTree``'s order
    replayed in numpy, bit for bit. Rows with written-out levels are checked
    everywhere; on a GPU also the rows whose last levels the compilers emit
    (lane butterfly, then warps). The JAX interpreter runs the kernel through
    XLA:CPU, with every level written out as elementwise adds, so it is the
    tree for every row there too; torch's interpreter leaves the cross-thread
    levels of aligned rows to numpy's sum."""
    from bi_core.rms_norm import reduce_tree, sum_tree
    from bi_core.rows import row_config

    cfg = row_config(n)
    tree = sum_tree(cfg.block, cfg.num_warps, 4, n)
    assert tree.explicit_threads == (n in UNALIGNED)
    if not PROFILE.native and framework == "torch" and not tree.explicit_threads:
        pytest.skip("the compilers' cross-thread order exists on a GPU only")
    x = np.random.default_rng(n).standard_normal((2, n)).astype(np.float32)
    got = _call(framework, "sum", x, -1)
    for row in range(2):
        chunks = np.zeros((cfg.num_chunks, cfg.block), np.float32)
        chunks.reshape(-1)[:n] = x[row]
        acc = chunks[0]
        for c in range(1, cfg.num_chunks):  # per-element partials in chunk order
            acc = acc + chunks[c]
        want = reduce_tree(acc, tree, np, explicit_threads=True)
        np.testing.assert_array_equal(want.view(np.int32), got[row : row + 1].view(np.int32))


def _launch_rows(framework, op, x, split):
    """softmax/log_softmax of a (rows, n) array with the segment strategy forced."""
    ad = adapter(framework)
    if framework == "torch":
        import torch

        from bi_torch.ops import rows

        xt = ad.to_native(x)
        out = torch.empty_like(xt)
        rows.launch(op, xt, out, split=split)
        return ad.to_numpy(out)
    from bi_jax.ops import rows

    return ad.to_numpy(rows.launch(op, ad.to_native(x), split=split))


# Rows read in segments: 16411 elements (not a 16-byte multiple in any dtype),
# 20000, and on a GPU a Llama-3 vocabulary and the longest rows that split.
SEGMENTED = [16411, 20000] + ([128256, 64 * 8192] if PROFILE.native else [])


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", SEGMENTED)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_invariance_segments_split_or_not(framework, op, n, dtype):
    """Long rows run one program per segment at small batches and one per row
    at large ones (bi_core.rows.split_segments). Both give the same bits, with
    an all -inf segment (masked logits) in one row."""
    from bi_core.rows import split_segments

    assert split_segments(1, n) and not split_segments(4096, n)
    x = 4.0 * np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    x[1, : n // 2] = -np.inf
    x = x.astype(np_dtype(dtype))
    per_row, per_segment = (_launch_rows(framework, op, x, split) for split in (False, True))
    bits = np.int32 if dtype == "float32" else np.int16
    np.testing.assert_array_equal(per_row.view(bits), per_segment.view(bits))
    want = _np_log_softmax(x, -1)
    want = np.exp(want) if op == "softmax" else want
    tol = 1e-5 if dtype == "float32" else 1.6e-2
    np.testing.assert_allclose(per_row.astype(np.float64), want, rtol=tol, atol=tol if op == "log_softmax" else 1e-8)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_torch_eager_rows_of_a_few_segments_are_one_launch(op, monkeypatch):
    """torch: each eager launch costs host time, so rows of at most
    ``ONE_LAUNCH_SEGMENTS`` segments run one program per row at any batch,
    longer rows split at small batches; while a CUDA graph records (on the
    GPU) the same rows split. The same bits every way."""
    import torch

    import bi_torch
    from bi_core.rows import ONE_LAUNCH_SEGMENTS, row_config, split_segments
    from bi_torch.ops import rows

    n = 20000
    assert 1 < row_config(n).num_chunks <= ONE_LAUNCH_SEGMENTS
    assert split_segments(3, n) and not split_segments(3, n, eager=True)
    longer = (ONE_LAUNCH_SEGMENTS + 1) * row_config(n).block
    assert split_segments(3, longer, eager=True)
    splits = []  # each call's decision
    monkeypatch.setattr(rows, "split_segments", lambda *a, **k: splits.append(split_segments(*a, **k)) or splits[-1])
    x = adapter("torch").to_native(np.random.default_rng(3).standard_normal((3, n)).astype(np.float32))
    fn = getattr(bi_torch, op)
    eager = fn(x, -1)
    assert splits == [False]
    if PROFILE.native:
        rows.launch(op, x, torch.empty_like(x), split=True)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(x, -1)
        graph.replay()
        assert splits == [False, True], "a recorded call over segments splits"
        assert torch.equal(captured.view(torch.int32), eager.view(torch.int32))
        hits = rows._row_kernel.hits
        fn(x, -1)
        assert rows._row_kernel.hits == hits + 1, "an eager call after the capture is one launch again"


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("n", [37, 20000])
def test_softmax_of_masked_logits(framework, n):
    """-inf logits get probability 0 (log-probability -inf); a row of -inf
    only is nan, as in torch and JAX."""
    x = np.random.default_rng(6).standard_normal((3, n)).astype(np.float32)
    x[0, ::3] = -np.inf
    x[2] = -np.inf
    sm, ls = _call(framework, "softmax", x, -1), _call(framework, "log_softmax", x, -1)
    want = _np_log_softmax(x[:2], -1)
    np.testing.assert_allclose(sm[:2], np.exp(want), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ls[:2], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(sm[2]).all() and np.isnan(ls[2]).all()

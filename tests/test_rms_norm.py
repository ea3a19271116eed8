"""RMSNorm API: semantics, shapes and input validation in both frameworks."""

from __future__ import annotations

import numpy as np
import pytest

from harness import registry
from harness.bits import np_dtype
from harness.frameworks import adapter
from tests_profile import PROFILE

FRAMEWORKS = ["torch", "jax"]


def _np_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w.astype(np.float64)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("shape", [(7,), (2, 3, 33), (1, 1, 1, 100), (5, 1)], ids=str)
@pytest.mark.parametrize("with_weight", [True, False])
def test_leading_dims_and_optional_weight(framework, shape, with_weight):
    ad = adapter(framework)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32) if with_weight else None
    out = ad.kernel("rms_norm")(ad.to_native(x), None if w is None else ad.to_native(w), eps=1e-5)
    got = ad.to_numpy(out)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, _np_rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_output_dtype_is_input_dtype(framework, dtype):
    ad = adapter(framework)
    x = np.ones((2, 8), dtype=np.float32).astype(np_dtype(dtype))
    w = np.ones(8, dtype=np.float32)  # fp32 weight with a low-precision input
    out = ad.to_numpy(ad.kernel("rms_norm")(ad.to_native(x), ad.to_native(w)))
    assert out.dtype == np_dtype(dtype)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_long_rows_use_the_chunked_path(framework):
    """Rows longer than the register-resident limit (bi_core.rms_norm.MAX_FUSED)."""
    from bi_core.rms_norm import MAX_FUSED, rms_norm_config

    n = MAX_FUSED + 4099
    assert rms_norm_config(n).num_chunks > 1
    spec, ad = registry.get("rms_norm"), adapter(framework)
    inputs = spec.make_inputs(np.random.default_rng(2), 2, n, "float32")
    got = ad.call(ad.kernel("rms_norm"), spec, ad.natives(inputs))
    np.testing.assert_allclose(got, spec.reference(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_empty_batch(framework):
    ad = adapter(framework)
    out = ad.kernel("rms_norm")(ad.to_native(np.zeros((0, 16), np.float32)))
    assert tuple(out.shape) == (0, 16)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_inputs_raise_clear_errors(framework):
    ad = adapter(framework)
    f = ad.kernel("rms_norm")
    x = ad.to_native(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        f(x, ad.to_native(np.ones(7, np.float32)))
    with pytest.raises(TypeError, match="dtype"):
        f(ad.to_native(np.ones((2, 8), np.int32)))
    with pytest.raises(ValueError, match="empty"):
        f(ad.to_native(np.ones((2, 0), np.float32)))
    with pytest.raises(ValueError, match="at least one dimension"):
        f(ad.to_native(np.array(1.0, np.float32)))
    with pytest.raises(ValueError, match="eps"):
        f(x, eps=-1.0)
    with pytest.raises(TypeError, match="must be a"):
        f([[1.0, 2.0]])


def test_torch_autograd_and_wrong_device():
    import torch

    import bi_torch

    ad = adapter("torch")
    x = ad.to_native(np.ones((2, 8), np.float32)).requires_grad_(True)
    y = bi_torch.rms_norm(x)
    assert y.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(bi_torch.rms_norm(x), y.detach())
    if ad.device.type == "cuda":
        with pytest.raises(ValueError, match="cuda:0 but weight is on cpu"):
            bi_torch.rms_norm(x.detach(), torch.ones(8))
        with pytest.raises(ValueError, match="need a CUDA tensor"):
            bi_torch.rms_norm(torch.ones(2, 8))


def test_torch_views_and_offsets_match_contiguous_copies():
    """A non-contiguous or misaligned view gives the same bits as a fresh copy."""
    import bi_torch

    ad = adapter("torch")
    base = ad.to_native(np.random.default_rng(3).standard_normal((9, 40)).astype(np.float32))
    view = base[1:, 3:36]  # offset pointer, row stride 40
    assert not view.is_contiguous()
    a = ad.to_numpy(bi_torch.rms_norm(view))
    b = ad.to_numpy(bi_torch.rms_norm(view.contiguous()))
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n", [100, 4096, 20000] if PROFILE.native else [100, 257])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_invariance_rstd_output(n, dtype):
    """``rms_norm_with_rstd`` (``aten::_fused_rms_norm``'s two outputs): the
    normalised rows of ``rms_norm`` and each row's fp32 1/rms, close to the
    float64 value and the same bits for a row alone as in a batch."""
    import torch

    from bi_torch.ops.rms_norm import rms_norm, rms_norm_with_rstd

    ad = adapter("torch")
    rng = np.random.default_rng(n)
    x = (3.0 * rng.standard_normal((2, 5, n))).astype(np.float32).astype(np_dtype(dtype))
    w = rng.standard_normal(n).astype(np.float32).astype(np_dtype(dtype))
    xt, wt = ad.to_native(x), ad.to_native(w)
    y, rstd = rms_norm_with_rstd(xt, wt, 1e-6)
    assert rstd.dtype == torch.float32 and tuple(rstd.shape) == (2, 5, 1)
    assert torch.equal(y, rms_norm(xt, wt, 1e-6))
    x64 = x.astype(np.float64)
    want = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ad.to_numpy(rstd), want, rtol=2e-6)
    y1, rstd1 = rms_norm_with_rstd(xt[1, 3:4], wt, 1e-6)
    assert torch.equal(y1, y[1, 3:4]) and torch.equal(rstd1, rstd[1, 3:4])


def test_jax_jit_and_vmap_give_the_same_bits():
    import jax

    import bi_jax

    ad = adapter("jax")
    rng = np.random.default_rng(4)
    x = ad.to_native(rng.standard_normal((4, 3, 48)).astype(np.float32))
    w = ad.to_native(rng.standard_normal(48).astype(np.float32))
    plain = ad.to_numpy(bi_jax.rms_norm(x, w))
    jitted = ad.to_numpy(jax.jit(bi_jax.rms_norm)(x, w))
    mapped = ad.to_numpy(jax.vmap(lambda r: bi_jax.rms_norm(r, w), in_axes=1, out_axes=1)(x))
    assert plain.tobytes() == jitted.tobytes() == mapped.tobytes()


def _launch_split(framework, x, w, config):
    """rms_norm of a (rows, n) array with the launch ``config`` (programs per
    row, their order, when the weight is loaded)."""
    ad = adapter(framework)
    wn = None if w is None else ad.to_native(w)
    if framework == "torch":
        import torch

        from bi_torch.ops import rms_norm

        xt = ad.to_native(x)
        out = torch.empty_like(xt)
        rms_norm.launch(xt, wn, out, 1e-6, config)
        return ad.to_numpy(out)
    from bi_jax.ops import rms_norm

    return ad.to_numpy(rms_norm.launch(ad.to_native(x), wn, 1e-6, config))


# Rows held in registers (aligned and not: 100 and 1869 elements are not
# 16-byte multiples in bf16) and, on a GPU, rows read in chunks.
SPLIT_LENGTHS = [100, 257] + ([1869, 4096, 8192, 16384, 20000, 32000] if PROFILE.native else [])


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", SPLIT_LENGTHS)
def test_invariance_column_split_or_not(framework, n, dtype):
    """A few rows are written by several programs per row, one column slice
    each (bi_core.rms_norm.column_split); every split gives the bits of one
    program per row, in either launch order (bi_core.rms_norm.slices_adjacent)
    and with the weight loaded before or after the reduction."""
    from bi_core.rms_norm import RmsNormLaunch, column_split, launch_config, rms_norm_config

    most = max(1, rms_norm_config(n).block // 128)  # slices of at least 128 elements
    assert column_split(1, n) == min(most, 4) and column_split(4096, n) == 1
    assert launch_config(1, n) == RmsNormLaunch(min(most, 4), min(most, 4) > 1, True)
    rng = np.random.default_rng(n)
    x = (3.0 * rng.standard_normal((3, n))).astype(np.float32).astype(np_dtype(dtype))
    w = rng.standard_normal(n).astype(np.float32).astype(np_dtype(dtype))
    bits = np.int32 if dtype == "float32" else np.int16
    for weight in (w, None):
        one = _launch_split(framework, x, weight, RmsNormLaunch())
        for split in sorted({2, most}):
            if split > most:
                continue
            for adjacent in (True, False):  # a row's slices launched together or not
                for early in (True, False):
                    config = RmsNormLaunch(split, adjacent, early)
                    got = _launch_split(framework, x, weight, config)
                    np.testing.assert_array_equal(one.view(bits), got.view(bits), err_msg=str(config))
        tol = 1e-5 if dtype == "float32" else 1.6e-2
        want = _np_rms_norm(x.astype(np.float32), None if weight is None else weight.astype(np.float32), 1e-6)
        np.testing.assert_allclose(one.astype(np.float64), want, rtol=tol, atol=tol)

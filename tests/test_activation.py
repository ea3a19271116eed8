"""``silu_and_mul``: what belongs to this op alone (the harness's properties
cover invariance, determinism, accuracy, gradients and the forward's
cross-framework bits)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import grads, properties, registry
from harness.frameworks import FRAMEWORKS, adapter
from tests_profile import PROFILE


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_silu_and_mul_gradients_agree_across_frameworks(dtype):
    """The backward kernels run ``bi_core.activation``'s PTX too: bi_torch's
    and bi_jax's gradients are the same bits (Llama-3-8B's intermediate
    width, and a masked tail)."""
    spec = registry.get("silu_and_mul")
    gspec = grads.grad_spec(spec, "x")
    adapters = {fw: adapter(fw) for fw in FRAMEWORKS}
    fns = {fw: grads.grad_function(adapters[fw], spec, "x") for fw in FRAMEWORKS}
    for features, rows in ((14336, 1024), (1000, 37)):
        inputs = spec.make_inputs(np.random.default_rng(features), rows, features, dtype)
        properties.check_cross_framework(gspec, adapters, fns, inputs,
                                         label=f"silu_and_mul.grad[x][torch vs jax, {dtype}, {features}]")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_silu_and_mul_is_silu_of_the_first_half_times_the_second(framework):
    """The layout: ``[gate | up]`` on the last axis, any leading axes; fp32
    inputs against ``silu(g) * u`` (the framework's own, a few ULPs)."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 3, 2 * 40))).astype(np.float32)
    g, u = x[..., :40].astype(np.float64), x[..., 40:].astype(np.float64)
    want = g / (1 + np.exp(-g)) * u
    if framework == "torch":
        import torch

        import bi_torch

        got = bi_torch.silu_and_mul(torch.from_numpy(x).to("cuda" if PROFILE.native else "cpu")).cpu().numpy()
    else:
        import bi_jax

        got = np.asarray(bi_jax.silu_and_mul(x))
    assert got.shape == (2, 3, 40)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_silu_and_mul_refuses_bad_input(framework):
    if framework == "torch":
        import torch

        import bi_torch as bi

        make = lambda shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype,  # noqa: E731
                                                             device="cuda" if PROFILE.native else "cpu")
        int_dtype = torch.int32
    else:
        import jax.numpy as jnp

        import bi_jax as bi

        make = lambda shape, dtype=jnp.float32: jnp.zeros(shape, dtype)  # noqa: E731
        int_dtype = jnp.int32
    with pytest.raises(ValueError, match=r"must be even, got shape \(3, 5\)"):
        bi.silu_and_mul(make((3, 5)))
    with pytest.raises(ValueError, match="at least one dimension"):
        bi.silu_and_mul(make(()))
    with pytest.raises(TypeError, match="int32"):
        bi.silu_and_mul(make((2, 4), int_dtype))
    with pytest.raises(TypeError):
        bi.silu_and_mul([[1.0, 2.0]])
    from bi_core.activation import MAX_WIDTH, check_gated_width

    with pytest.raises(ValueError, match="too wide"):  # the shape check alone: no such tensor is allocated
        check_gated_width("silu_and_mul", (1, 2 * MAX_WIDTH + 2))
    # Empty sizes give empty outputs, gradients included.
    for shape, out in (((3, 0), (3, 0)), ((0,), (0,)), ((0, 4), (0, 2)), ((2, 0, 6), (2, 0, 3))):
        assert tuple(bi.silu_and_mul(make(shape)).shape) == out, shape
    if framework == "torch":
        x = make((3, 0)).requires_grad_()
        bi.silu_and_mul(x).sum().backward()
        assert x.grad.shape == (3, 0)
    else:
        import jax

        assert jax.grad(lambda a: bi.silu_and_mul(a).sum())(make((3, 0))).shape == (3, 0)

"""GPU sweeps over every batch size at realistic hidden sizes."""

from __future__ import annotations

import numpy as np
import pytest

from cases import kernel_cases
from harness.opspec import feature_label
from harness import properties, registry
from harness.frameworks import adapter
from tests_profile import PROFILE


def _sweep_cases():
    """Every (op, framework, dtype) with a kernel, at the feature sizes its
    spec sweeps for that dtype (``OpSpec.sweeps``)."""
    out = []
    for case in kernel_cases():
        op, framework, dtype = case.values
        for features in registry.get(op).sweeps.get(dtype, ()):
            label = feature_label(features)
            out.append(pytest.param(op, framework, dtype, features, id=f"{op}-{framework}-{dtype}-{label}"))
    return out


def _sizes(framework: str, largest: int) -> list[int]:
    if framework == "torch":
        # Triton kernels do not recompile per batch size: every size is cheap.
        return list(range(1, largest + 1))
    # XLA compiles per shape: powers of two, their neighbours, and a spread.
    sizes = {1, 2, 3, largest}
    p = 4
    while p <= largest:
        sizes.update({p - 1, p, p + 1})
        p *= 2
    rng = np.random.default_rng(0)
    sizes.update(int(v) for v in rng.integers(1, largest + 1, size=20))
    return sorted(s for s in sizes if s <= largest)


@pytest.mark.gpu
@pytest.mark.parametrize("op,framework,dtype,features", _sweep_cases())
def test_invariance_every_batch_size(op, framework, dtype, features):
    spec, ad = registry.get(op), adapter(framework)
    largest = min(PROFILE.max_batch, spec.sweep_batch)
    rng = np.random.default_rng(0)
    inputs = spec.make_inputs(rng, largest + 61, features, dtype)
    properties.check_every_batch_size(
        spec, ad, ad.kernel(op), inputs, _sizes(framework, largest), label=f"{op}[{framework}, {dtype}, {features}]"
    )

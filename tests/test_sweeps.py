"""GPU sweeps over every batch size at realistic hidden sizes."""

from __future__ import annotations

import numpy as np
import pytest

from cases import kernel_cases
from harness import properties, registry
from harness.frameworks import adapter
from tests_profile import PROFILE

SWEEP_FEATURES = (4096, 8192, 24576)  # 24576: the chunked path for long rows


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
@pytest.mark.parametrize("features", SWEEP_FEATURES)
@pytest.mark.parametrize("op,framework,dtype", [c for c in kernel_cases() if c.values[2] in ("bfloat16", "float32")])
def test_invariance_every_batch_size(op, framework, dtype, features):
    if op != "rms_norm":
        pytest.skip("sweep defined for row ops")
    spec, ad = registry.get(op), adapter(framework)
    largest = PROFILE.max_batch
    rng = np.random.default_rng(features)
    inputs = spec.make_inputs(rng, largest + 61, features, dtype)
    properties.check_every_batch_size(
        spec, ad, ad.kernel(op), inputs, _sizes(framework, largest), label=f"{op}[{framework}, {dtype}, N={features}]"
    )

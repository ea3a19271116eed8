"""GPU sweeps over every batch size at realistic hidden sizes."""

from __future__ import annotations

import numpy as np
import pytest

from cases import kernel_cases
from harness import properties, registry
from harness.frameworks import adapter
from tests_profile import PROFILE

# Per op: (feature sizes, dtypes, largest batch). RMSNorm's 24576 takes the
# chunked path for long rows; the matmul's are (K, N) weight shapes, bf16 on
# both, fp32 (full precision, FMA units) on the smaller one.
SWEEPS = {
    "rms_norm": {"bfloat16": (4096, 8192, 24576), "float32": (4096, 8192, 24576)},
    "matmul": {"bfloat16": ((4096, 4096), (8192, 28672)), "float32": ((4096, 4096),)},
    # Row reductions: a hidden size, and vocabularies (the chunked path) for softmax.
    "sum": {"float32": (4096, 24576)},
    "mean": {"bfloat16": (4096,)},
    "softmax": {"bfloat16": (32000, 128256), "float32": (32000,)},
    "log_softmax": {"float32": (32000, 128256)},
}
LARGEST = {"rms_norm": 16384, "matmul": 8192, "sum": 16384, "mean": 16384, "softmax": 4096, "log_softmax": 4096}


def _sweep_cases():
    out = []
    for case in kernel_cases():
        op, framework, dtype = case.values
        for features in SWEEPS.get(op, {}).get(dtype, ()):
            name = "x".join(map(str, features)) if isinstance(features, tuple) else str(features)
            out.append(pytest.param(op, framework, dtype, features, id=f"{op}-{framework}-{dtype}-{name}"))
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
    largest = min(PROFILE.max_batch, LARGEST[op])
    rng = np.random.default_rng(0)
    inputs = spec.make_inputs(rng, largest + 61, features, dtype)
    properties.check_every_batch_size(
        spec, ad, ad.kernel(op), inputs, _sizes(framework, largest), label=f"{op}[{framework}, {dtype}, {features}]"
    )

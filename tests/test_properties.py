"""The harness properties for every op x framework x dtype.

``pytest -k invariance`` selects the batch-invariance properties (and the
negative controls in test_controls.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from cases import cross_framework_cases, kernel_cases
from harness import properties, registry
from harness.frameworks import FRAMEWORKS, adapter
from harness.strategies import problems
from tests_profile import PROFILE


def _label(op, fw, dtype):
    return f"{op}[{fw}, {dtype}, {PROFILE.name}]"


def _run(op, framework, dtype, check):
    """Run ``check(spec, adapter, kernel, problem, inputs, rng)`` over drawn problems."""
    spec, ad = registry.get(op), adapter(framework)
    fn = ad.kernel(op)

    @given(problems(PROFILE, spec=spec))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        try:
            check(spec, ad, fn, problem, rng)
        finally:
            if PROFILE.native and framework == "torch":
                # Large weights per example: return them to the device for the
                # other test processes (JAX among them) right away.
                import torch

                torch.cuda.empty_cache()

    prop()


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_invariance(op, framework, dtype):
    def check(spec, ad, fn, problem, rng):
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_batch_invariance(
            spec, ad, fn, inputs, problem.plan, dtype, rng, label=_label(op, framework, dtype)
        )

    _run(op, framework, dtype, check)


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_determinism(op, framework, dtype):
    def check(spec, ad, fn, problem, rng):
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_determinism(spec, ad, fn, inputs, label=_label(op, framework, dtype))

    _run(op, framework, dtype, check)


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_accuracy(op, framework, dtype):
    def check(spec, ad, fn, problem, rng):
        # At most 96 rows: the float64 reference runs on the host (a 16384 x 16384
        # weight costs ~0.5 GFLOP per row there).
        inputs = spec.make_inputs(rng, min(problem.plan.full, 96), problem.features, dtype)
        properties.check_accuracy(spec, ad, fn, inputs, dtype, label=_label(op, framework, dtype))

    _run(op, framework, dtype, check)


def _cross_cases():
    return [pytest.param(*p.values, features, id=f"{p.id}-{features}")
            for p in cross_framework_cases()
            for features in registry.get(p.values[0]).cross_features]


@pytest.mark.gpu
@pytest.mark.parametrize("op,dtype,features", _cross_cases())
def test_cross_framework_equality(op, dtype, features):
    spec = registry.get(op)
    adapters = {fw: adapter(fw) for fw in FRAMEWORKS}
    fns = {fw: adapters[fw].kernel(op) for fw in FRAMEWORKS}
    if spec.max_features is not None:
        features = min(features, spec.max_features)
    # Up to 4096 rows, fewer where a row carries its own operands (bmm,
    # attention): at most 2**27 elements in any batched input (the spec's
    # budget per row, or the largest batched array of one row if larger: an
    # attention row is a whole sequence).
    one = spec.make_inputs(np.random.default_rng(0), 1, features, dtype)
    per_row = max(spec.row_elements(features) if spec.row_elements else features,
                  *(one[name].size for name in (spec.batch_arg, *spec.batched)))
    rows = int(min(4096, max(8, 2**27 // per_row)))
    inputs = spec.make_inputs(np.random.default_rng(features), rows, features, dtype)
    properties.check_cross_framework(spec, adapters, fns, inputs, label=_label(op, "torch vs jax", dtype))

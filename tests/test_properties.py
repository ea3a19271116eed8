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


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_invariance(op, framework, dtype):
    spec, ad = registry.get(op), adapter(framework)
    fn = ad.kernel(op)

    @given(problems(PROFILE))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_batch_invariance(
            spec, ad, fn, inputs, problem.plan, dtype, rng, label=_label(op, framework, dtype)
        )

    prop()


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_determinism(op, framework, dtype):
    spec, ad = registry.get(op), adapter(framework)
    fn = ad.kernel(op)

    @given(problems(PROFILE))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_determinism(spec, ad, fn, inputs, label=_label(op, framework, dtype))

    prop()


@pytest.mark.parametrize("op,framework,dtype", kernel_cases())
def test_accuracy(op, framework, dtype):
    spec, ad = registry.get(op), adapter(framework)
    fn = ad.kernel(op)

    @given(problems(PROFILE))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        # A smaller batch: the float64 reference runs on the host.
        rows = min(problem.plan.full, 256)
        inputs = spec.make_inputs(rng, rows, problem.features, dtype)
        properties.check_accuracy(spec, ad, fn, inputs, dtype, label=_label(op, framework, dtype))

    prop()


@pytest.mark.gpu
@pytest.mark.parametrize("op,dtype", cross_framework_cases())
def test_cross_framework_equality(op, dtype):
    spec = registry.get(op)
    adapters = {fw: adapter(fw) for fw in FRAMEWORKS}
    fns = {fw: adapters[fw].kernel(op) for fw in FRAMEWORKS}

    @given(problems(PROFILE))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_cross_framework(spec, adapters, fns, inputs, label=_label(op, "torch vs jax", dtype))

    prop()

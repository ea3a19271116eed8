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


# rms_norm: measured on H100 and H200 (torch 2.11/triton 3.6, jax 0.11.2),
# bi_torch and bi_jax agree bitwise on most rows but not all (about 6% of fp32
# rows and 0.1-1% of bf16 rows differ by a few ULPs;
# bench/probe_cross_framework.py counts them): the Triton inside jaxlib
# associates the row reduction differently from triton 3.6 on the same
# program. Fixed inputs, so the outcome is deterministic; strict, so the day
# they agree this fails and must be enabled. The matrix products agree.
_KNOWN_CROSS_FRAMEWORK_GAPS = {"rms_norm": "reduction trees of the two Triton compilers differ; see bench/NOTES.md"}


def _cross_cases():
    out = []
    for p in cross_framework_cases():
        op = p.values[0]
        marks = []
        if op in _KNOWN_CROSS_FRAMEWORK_GAPS:
            marks = [pytest.mark.xfail(strict=True, raises=properties.CrossFrameworkError,
                                       reason=_KNOWN_CROSS_FRAMEWORK_GAPS[op])]
        out.append(pytest.param(*p.values, id=p.id, marks=marks))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("features", [4096, 8192])
@pytest.mark.parametrize("op,dtype", _cross_cases())
def test_cross_framework_equality(op, dtype, features):
    spec = registry.get(op)
    adapters = {fw: adapter(fw) for fw in FRAMEWORKS}
    fns = {fw: adapters[fw].kernel(op) for fw in FRAMEWORKS}
    if spec.max_features is not None:
        features = min(features, spec.max_features)
    # Up to 4096 rows, fewer where a row carries its own operands (bmm).
    per_row = spec.row_elements(features) if spec.row_elements else features
    rows = int(min(4096, max(8, 2**27 // per_row)))
    inputs = spec.make_inputs(np.random.default_rng(features), rows, features, dtype)
    properties.check_cross_framework(spec, adapters, fns, inputs, label=_label(op, "torch vs jax", dtype))

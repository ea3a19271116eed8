"""Unit tests of the harness's own machinery."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import registry
from harness.bits import differing_rows, ulp_distance
from harness.strategies import batch_plans, batch_sizes


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_ulp_distance_counts_representable_steps(dtype):
    a = np.array([1.0, -1.0, 0.0, 2.0], dtype=dtype)
    bits = a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    b = (bits + np.array([1, 1, 0, 3], dtype=bits.dtype)).view(a.dtype)
    assert ulp_distance(a, b).tolist() == [1, 1, 0, 3]
    # Across zero: the smallest positive and negative subnormals are 2 steps apart.
    tiny = np.array([1], dtype=bits.dtype).view(a.dtype)
    assert ulp_distance(tiny, -tiny).tolist() == [2]


def test_differing_rows_sees_one_flipped_bit():
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    b = a.copy()
    b.view(np.int32)[3, 4] ^= 1
    assert differing_rows(a, b).tolist() == [3]
    assert differing_rows(a, a.copy()).tolist() == []


@given(batch_plans(max_batch=50))
def test_batch_plans_are_well_formed(plan):
    assert 1 <= plan.full <= 50
    idx = np.asarray(plan.index)
    assert plan.size >= 1 and len(plan.shared()) >= 1
    assert (idx < plan.full + plan.extra).all() and (idx >= 0).all()
    if plan.mode == "slice":
        assert plan.index == tuple(range(plan.start, plan.start + plan.size))


@given(st.data())
def test_batch_sizes_stay_in_range(data):
    top = data.draw(st.integers(1, 20000))
    assert 1 <= data.draw(batch_sizes(top)) <= top


@pytest.mark.parametrize("spec", registry.all_specs(), ids=lambda s: s.name)
def test_specs_make_inputs_with_a_batch_axis(spec):
    rng = np.random.default_rng(0)
    for dtype in spec.dtypes:
        inputs = spec.make_inputs(rng, 3, 16, dtype)
        assert inputs[spec.batch_arg].shape[0] == 3
        ref = spec.reference(inputs)
        assert ref.dtype == np.float64 and ref.shape[0] == 3 and np.isfinite(ref).all()

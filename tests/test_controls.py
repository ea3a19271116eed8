"""Negative controls: the invariance property must catch implementations that
are known to vary with the batch. A harness that cannot fail proves nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from cases import control_cases
from harness import properties, registry
from harness.frameworks import adapter
from harness.strategies import problems
from tests_profile import PROFILE


# A control's split count is ``1 + batch % 4``: batches of up to 5 rows reach
# every count, so each drawn problem leaves room for 5 rows.
_CONTROL_ROWS = 5


def _control_problems(spec):
    # Synthetic split-by-batch reductions: rows long enough for a split to
    # matter, within the op's own feature cap (a 32000 x 32000 fp32 weight
    # ran a GPU test worker out of memory), and short enough that the batch
    # can change the split count (at a size that fits one row only, every
    # draw compared one row with itself and a control could pass 30 draws).
    per_row = spec.row_elements or (lambda n: n)
    cap = min(spec.max_features or PROFILE.max_features, PROFILE.max_features)
    fits = [n for n in range(16, cap + 1) if per_row(n) * _CONTROL_ROWS <= PROFILE.max_elements]
    assert fits, f"{spec.name}: no feature size >= 16 leaves room for {_CONTROL_ROWS} rows in this profile"
    sizes = st.one_of(st.sampled_from([n for n in PROFILE.feature_sizes if n in fits] or fits),
                      st.integers(fits[0], fits[-1]))
    return problems(PROFILE, features=sizes, spec=spec, min_full=_CONTROL_ROWS)


@pytest.mark.parametrize("op,framework,name", control_cases())
def test_invariance_catches_control(op, framework, name):
    spec, ad = registry.get(op), adapter(framework)
    fn = ad.control(op, name)
    # Synthetic controls are compared in fp32, where a changed summation order
    # shows; rounding to bf16 hides most such changes.
    dtype = "float32"
    if name == "default":
        # The spec says where the default varies (a sweep of every batch size,
        # which random draws of a few batch sizes can miss).
        where = spec.default_varies
        inputs = spec.make_inputs(np.random.default_rng(0), where.batch, where.features, where.dtype)
        sizes = list(range(1, where.sizes + 1))
        with pytest.raises(properties.BatchVarianceError, match="batch sizes differ"):
            properties.check_every_batch_size(spec, ad, fn, inputs, sizes, label=f"{op}[{framework} default]")
        return

    @settings(max_examples=max(PROFILE.max_examples, 30), phases=[Phase.generate], database=None)
    @given(_control_problems(spec))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, dtype)
        properties.check_batch_invariance(spec, ad, fn, inputs, problem.plan, dtype, rng, label=f"{op}[{framework} control {name}]")

    with pytest.raises(properties.BatchVarianceError, match="batch invariance violated"):
        prop()


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_invariance_report_names_rows_sizes_and_ulps(framework):
    """The failure message of a control names rows, batch sizes and ULPs."""
    spec, ad = registry.get("rms_norm"), adapter(framework)
    fn = ad.control("rms_norm", "split_by_batch")
    rng = np.random.default_rng(0)
    inputs = spec.make_inputs(rng, 8, 64, "float32")
    from harness.strategies import BatchPlan

    plan = BatchPlan(full=8, index=(5, 2, 7), extra=0, mode="subset")  # 8 % 4 != 3 % 4
    with pytest.raises(properties.BatchVarianceError) as err:
        properties.check_batch_invariance(spec, ad, fn, inputs, plan, "float32", rng, label="control")
    text = str(err.value)
    assert "reference batch M=8" in text and "second batch K=3" in text
    assert "max ULP distance" in text and "first: row" in text

"""Hypothesis strategies for batch sizes, feature sizes and batch compositions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from harness.devices import Profile
from harness.plans import BatchPlan

MODES = ("slice", "subset", "mixed", "single")


def batch_sizes(max_batch: int, min_batch: int = 1) -> st.SearchStrategy[int]:
    """1..max_batch, with the edges drawn often: 1, 2, 3, powers of two and their neighbours."""
    edges = {1, 2, 3, max_batch}
    p = 4
    while p <= max_batch:
        edges.update({p - 1, p, p + 1})
        p *= 2
    edges = sorted(e for e in edges if min_batch <= e <= max_batch)
    return st.one_of(st.sampled_from(edges), st.integers(min_batch, max_batch))


def feature_sizes(profile: Profile) -> st.SearchStrategy[int]:
    """The profile's realistic sizes, and any size (non powers of two included)."""
    return st.one_of(
        st.sampled_from(profile.feature_sizes),
        st.integers(1, profile.max_features),
    )


@st.composite
def batch_plans(draw, max_batch: int, max_second: int | None = None, min_full: int = 1) -> BatchPlan:
    """Compositions: contiguous slices at any offset, permuted subsets (with
    repeats), subsets mixed with fresh rows, and single rows."""
    full = draw(batch_sizes(max_batch, min_batch=min(min_full, max_batch)))
    max_second = max_second or max_batch
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "single":
        row = draw(st.integers(0, full - 1))
        return BatchPlan(full=full, index=(row,), extra=0, mode=mode)
    if mode == "slice":
        k = draw(batch_sizes(min(full, max_second)))
        start = draw(st.integers(0, full - k))
        return BatchPlan(full=full, index=tuple(range(start, start + k)), extra=0, mode=mode, start=start)
    k = draw(batch_sizes(max_second))
    if mode == "subset":
        replace = k > full
        index = rng.choice(full, size=k, replace=replace)
        return BatchPlan(full=full, index=tuple(int(i) for i in index), extra=0, mode=mode)
    # mixed: each position is a reference row or a fresh one; at least one shared.
    from_ref = rng.random(k) < 0.5
    from_ref[rng.integers(k)] = True
    extra = int((~from_ref).sum())
    index = np.empty(k, dtype=np.int64)
    index[from_ref] = rng.integers(0, full, size=int(from_ref.sum()))
    index[~from_ref] = full + np.arange(extra)
    return BatchPlan(full=full, index=tuple(int(i) for i in index), extra=extra, mode=mode)


@dataclass(frozen=True)
class Problem:
    """One drawn example: feature size, batch plan and the seed of its data."""

    features: int
    plan: BatchPlan
    seed: int


@st.composite
def problems(
    draw,
    profile: Profile,
    min_features: int = 1,
    features: st.SearchStrategy[int] | None = None,
    max_second: int | None = None,
    min_full: int = 1,
    spec=None,
) -> Problem:
    """A feature size, then a batch plan that fits the profile's element cap
    (and the op's own feature cap and elements per row, when ``spec`` has them)."""
    cap = spec.max_features if spec is not None and spec.max_features else None
    if features is None:
        features = feature_sizes(profile)
        if cap:
            features = st.one_of(features.filter(lambda v: v <= cap), st.integers(1, min(cap, profile.max_features)))
    n = draw(features.filter(lambda v: v >= min_features))
    per_row = spec.row_elements(n) if spec is not None and spec.row_elements else n
    max_batch = max(1, min(profile.max_batch, profile.max_elements // per_row))
    plan = draw(batch_plans(max_batch, max_second=max_second, min_full=min_full))
    return Problem(features=n, plan=plan, seed=draw(st.integers(0, 2**32 - 1)))

"""The properties, written once for every op and framework.

Each ``check_*`` function raises a subclass of ``AssertionError`` whose
message names the op, framework, dtype, the rows that differ, the batch sizes
involved and the largest ULP distance.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_dtypes
import numpy as np

from harness.bits import differing_rows, np_dtype, ulp_distance
from harness.frameworks.base import Adapter
from harness.opspec import Inputs, OpSpec
from harness.plans import BatchPlan

Fn = Callable[..., Any]


class BatchVarianceError(AssertionError):
    """A row's bits changed with the batch it was computed in."""


class NondeterminismError(AssertionError):
    """Two runs on the same input gave different bits."""


class AccuracyError(AssertionError):
    """The output is further from the float64 reference than the dtype allows."""


class CrossFrameworkError(AssertionError):
    """bi_torch and bi_jax gave different bits on the same input."""


def _diff_report(a: np.ndarray, b: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> tuple[str, int]:
    """Describe where ``a`` and ``b`` (aligned along axis 0) differ."""
    bad = differing_rows(a, b)
    ulps = ulp_distance(a[bad], b[bad])
    first = int(bad[0])
    first_elems = int((ulps[0] != 0).sum())
    shown = ", ".join(str(int(r)) for r in rows_a[bad[:8]]) + (" ..." if len(bad) > 8 else "")
    text = (
        f"{len(bad)} of {len(a)} compared rows differ (rows {shown}); first: row {int(rows_a[first])} "
        f"(position {int(rows_b[first])} in the other call) has {first_elems} differing elements; "
        f"max ULP distance {int(ulps.max())} in {a.dtype}"
    )
    return text, len(bad)


def make_batch(spec: OpSpec, inputs: Inputs, plan: BatchPlan, rng: np.random.Generator, dtype: str) -> Inputs:
    """Inputs of the second call: rows of the reference batch and fresh rows."""
    features = spec.features(inputs)
    fresh = spec.make_inputs(rng, plan.extra, features, dtype) if plan.extra else None
    batch = dict(inputs)
    for name in spec.batch_args:
        x = inputs[name]
        pool = np.concatenate([x, fresh[name].reshape((plan.extra,) + x.shape[1:])], axis=0) if fresh else x
        batch[name] = pool[np.asarray(plan.index)]
    return batch


def check_batch_invariance(
    spec: OpSpec,
    adapter: Adapter,
    fn: Fn,
    inputs: Inputs,
    plan: BatchPlan,
    dtype: str,
    rng: np.random.Generator,
    label: str = "",
) -> None:
    """``f(batch)[j] == f(x)[index[j]]`` bitwise for every shared row j."""
    native = adapter.natives(inputs)
    full = adapter.call(fn, spec, native)
    if plan.mode == "slice":
        # A view of the reference input: also checks that layout and pointer
        # offsets do not change the bits.
        second_inputs = adapter.take_batch_rows(spec, native, plan.start, plan.start + plan.size)
    else:
        second_inputs = adapter.natives(make_batch(spec, inputs, plan, rng, dtype))
    second = adapter.call(fn, spec, second_inputs)
    if second.shape[0] != plan.size or full.shape[0] != plan.full:
        raise BatchVarianceError(
            f"{label}: output batch sizes {full.shape[0]} and {second.shape[0]} do not match inputs "
            f"{plan.full} and {plan.size}"
        )
    pos = plan.shared()
    rows = np.asarray(plan.index)[pos]
    a, b = full[rows], second[pos]
    if differing_rows(a, b).size:
        report, _ = _diff_report(a, b, rows, pos)
        raise BatchVarianceError(f"{label}: batch invariance violated ({plan.describe()}): {report}")


def check_determinism(spec: OpSpec, adapter: Adapter, fn: Fn, inputs: Inputs, label: str = "") -> None:
    """Two calls on the same input give the same bits."""
    native = adapter.natives(inputs)
    first = adapter.call(fn, spec, native)
    second = adapter.call(fn, spec, adapter.natives(inputs))
    if differing_rows(first, second).size:
        rows = np.arange(first.shape[0])
        report, _ = _diff_report(first, second, rows, rows)
        raise NondeterminismError(f"{label}: run-to-run bits differ (batch {first.shape[0]}): {report}")


def check_accuracy(spec: OpSpec, adapter: Adapter, fn: Fn, inputs: Inputs, dtype: str, label: str = "",
                   atol_by_scale: bool = False) -> None:
    """Within the dtype's tolerance of the float64 reference, elementwise; no NaN.

    ``atol_by_scale``: the bound also allows ``rtol`` times the reference's
    largest magnitude, for results whose elements cancel terms of the size of
    the largest (a weight's gradient summed over the tokens; softmax's
    ``y * (g - sum(g * y))`` from a rounded ``y``): their error is relative
    to those terms, not to the small difference."""
    out = adapter.call(fn, spec, adapter.natives(inputs))
    if out.dtype != np_dtype(dtype):
        raise AccuracyError(f"{label}: output dtype {out.dtype}, expected {dtype}")
    ref = spec.reference(inputs)
    got = out.astype(np.float64)
    if got.shape != ref.shape:
        raise AccuracyError(f"{label}: output shape {got.shape}, reference shape {ref.shape}")
    tol = spec.tolerance(dtype)
    err = np.abs(got - ref)
    atol = tol.atol + (tol.rtol * float(np.max(np.abs(ref))) if atol_by_scale and ref.size else 0.0)
    bound = atol + tol.rtol * np.abs(ref)
    bad = ~(err <= bound)  # NaN counts as bad
    # A reference past the dtype's largest finite value rounds to an infinity
    # of its sign (a float16 gradient of 74727, for one).
    beyond = np.abs(ref) > float(ml_dtypes.finfo(np_dtype(dtype)).max)
    bad &= ~(beyond & np.isinf(got) & (np.sign(got) == np.sign(ref)))
    if bad.any():
        worst = np.unravel_index(int(np.nanargmax(np.where(bad, err - bound, -np.inf))), err.shape)
        rel = np.linalg.norm(np.nan_to_num(got - ref, nan=np.inf)) / max(np.linalg.norm(ref), 1e-300)
        raise AccuracyError(
            f"{label}: {int(bad.sum())} of {bad.size} elements outside rtol={tol.rtol}, atol={atol:.3g} "
            f"(batch {got.shape[0]}); worst at {tuple(int(i) for i in worst)}: got {got[worst]!r}, "
            f"reference {ref[worst]!r}; relative norm error {rel:.3g}"
        )


def check_cross_framework(spec: OpSpec, adapters: dict[str, Adapter], fns: dict[str, Fn], inputs: Inputs, label: str = "") -> None:
    """Every framework's kernel gives the same bits on the same input."""
    names = sorted(adapters)
    outs = {n: adapters[n].call(fns[n], spec, adapters[n].natives(inputs)) for n in names}
    base = names[0]
    for other in names[1:]:
        a, b = outs[base], outs[other]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise CrossFrameworkError(f"{label}: {base} gave {a.dtype}{a.shape}, {other} gave {b.dtype}{b.shape}")
        if differing_rows(a, b).size:
            rows = np.arange(a.shape[0])
            report, _ = _diff_report(a, b, rows, rows)
            raise CrossFrameworkError(f"{label}: {base} and {other} differ (batch {a.shape[0]}): {report}")


def check_every_batch_size(
    spec: OpSpec,
    adapter: Adapter,
    fn: Fn,
    inputs: Inputs,
    sizes: list[int],
    label: str = "",
) -> None:
    """For each size M, rows ``s:s+M`` computed alone equal the same rows of the
    largest batch, bitwise, with the offset ``s`` moving from size to size.

    Compared on the device, so it scales to every batch size up to the largest.
    """
    native = adapter.natives(inputs)
    total = native[spec.batch_arg].shape[0]
    kwargs = spec.call_kwargs(adapter.name)
    full = fn(**native, **kwargs)
    bad = []
    for i, m in enumerate(sizes):
        if m > total:
            raise ValueError(f"size {m} exceeds the {total} rows of the input")
        start = (i * 7919) % (total - m + 1)
        out = fn(**adapter.take_batch_rows(spec, native, start, start + m), **kwargs)
        if not adapter.bitwise_equal(out, adapter.take_rows(full, start, start + m)):
            bad.append((m, start))
    adapter.synchronize(full)
    if bad:
        shown = ", ".join(f"M={m}@{s}" for m, s in bad[:10])
        raise BatchVarianceError(
            f"{label}: {len(bad)} of {len(sizes)} batch sizes differ from the batch of {total}: {shown}"
        )

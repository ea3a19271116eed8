"""The backward passes' properties, from the ops' specs.

An op's spec lists the inputs it differentiates (``OpSpec.grads``: each one's
float64 gradient). The loss is ``sum(f(inputs)**2) / 2``, so the cotangent is
the output itself: a row's cotangent is a function of that row alone, and a
batch-invariant backward gives each row an input gradient that does not
depend on the batch. :func:`grad_spec` makes, for one input, a spec whose
"op" is that gradient; the forward properties (``harness.properties``) then
check it as they check any op:

- accuracy against the float64 gradient (the reference's cotangent is the
  float64 output rounded to the dtype, as the kernel's is), elementwise with
  an absolute part relative to the gradient's largest element (a weight's
  gradient sums the tokens; softmax's cancels terms of a rounded output);
- run-to-run determinism of every gradient;
- batch invariance of the gradients of the batch arguments, row by row.
  Gradients of inputs shared by the batch (weights, biases) sum over its rows:
  they are deterministic for a given batch and change with it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from harness.bits import differing_rows, np_dtype
from harness.frameworks.base import Adapter
from harness.opspec import Fn, OpSpec, Tolerance

# Tolerances of a gradient: the forward's, times this (the cotangent's
# rounding and a second rounded product).
TOLERANCE_FACTOR = 4


_FLOATS = tuple(np_dtype(d) for d in ("float16", "bfloat16", "float32", "float64"))
_SPECS: dict[tuple[str, str], OpSpec] = {}


def _f64(inputs):
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype in _FLOATS else v
            for k, v in inputs.items()}


def grad_spec(spec: OpSpec, wrt: str) -> OpSpec:
    """The spec of ``spec``'s gradient with respect to the input ``wrt``."""
    key = (spec.name, wrt)
    if key not in _SPECS:
        _SPECS[key] = _grad_spec(spec, wrt)
    return _SPECS[key]


def _grad_spec(spec: OpSpec, wrt: str) -> OpSpec:
    if wrt not in spec.grads:
        raise KeyError(f"{spec.name} has no gradient for {wrt!r}; it has {sorted(spec.grads)}")
    gradient = spec.grads[wrt]

    def reference(inputs):
        # The output's dtype: the batch argument's, or (integer ids) the first float input's.
        arrays = [np.asarray(inputs[spec.batch_arg]), *(np.asarray(v) for v in inputs.values())]
        dtype = next(a.dtype for a in arrays if a.dtype in _FLOATS)
        cotangent = spec.reference(inputs).astype(dtype).astype(np.float64)
        return gradient(_f64(inputs), cotangent)

    tolerances = {d: Tolerance(rtol=t.rtol * TOLERANCE_FACTOR, atol=t.atol * TOLERANCE_FACTOR)
                  for d, t in spec.tolerances.items()}
    return dataclasses.replace(spec, name=f"{spec.name}.grad[{wrt}]", reference=reference, tolerances=tolerances,
                               controls=dict(spec.grad_controls) if wrt == spec.batch_arg else {}, grads={},
                               grad_controls={}, default_varies=None, bench=None, host_features=None,
                               row_elements=spec.grad_row_elements or spec.row_elements)


def row_invariant(spec: OpSpec, wrt: str) -> bool:
    """Whether the gradient of ``wrt`` has the batch on its axis 0 (and so
    must be batch-invariant per row)."""
    return wrt in spec.batch_args


def grad_function(adapter: Adapter, spec: OpSpec, wrt: str) -> Fn | None:
    """The bi_ kernel's gradient with respect to ``wrt`` in this framework
    (None where the framework's kernel has no backward)."""
    impl = spec.impl(adapter.name)
    if impl is None or not impl.grad:
        return None
    return adapter.grad(adapter.kernel(spec), wrt)


def cases():
    """Every (op, input, framework) with a backward."""
    from harness import registry
    from harness.frameworks import FRAMEWORKS

    return [(spec.name, wrt, fw) for spec in registry.all_specs() for wrt in spec.grads
            for fw in FRAMEWORKS if spec.impl(fw) is not None and spec.impl(fw).grad]


class ForwardParityError(AssertionError):
    """The forward of a training step gave other bits than inference's."""


def check_forward_parity(spec: OpSpec, adapter: Adapter, inputs, wrt: str, label: str = "") -> None:
    """The kernel's output while its input ``wrt`` is traced for a gradient
    has the bits of its inference output (a trainer's logprobs are the
    sampler's)."""
    fn = adapter.kernel(spec)
    trained = adapter.call(adapter.primal(fn, wrt), spec, adapter.natives(inputs))
    served = adapter.call(fn, spec, adapter.natives(inputs))
    if trained.shape != served.shape or trained.dtype != served.dtype or differing_rows(trained, served).size:
        raise ForwardParityError(f"{label}: the forward under autograd differs from the inference forward in "
                                 f"{differing_rows(trained, served).size if trained.shape == served.shape else 'shape'} rows")

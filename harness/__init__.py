"""Framework-agnostic property harness for batch-invariant ops.

* ``opspec``: what an op spec holds (``OpSpec``, ``Impl``, ``Bench``, ...);
  ``specs``: one module per op family, and ``SPECS``, the explicit list of ops;
  ``registry``: the specs by name. A spec is the one place that knows an op:
  inputs with a batch axis, float64 reference, tolerances, each framework's
  kernel, default and keyword arguments, negative controls, GPU sweep and
  cross-framework sizes, benchmark shapes and bound.
* ``frameworks``: adapters that turn numpy arrays into torch or jax inputs and
  back, compare bits, and resolve a spec's kernel, default and controls in
  their framework; ``controls``: the pieces the specs' controls are built of.
* ``plans``: batch plans (which rows a second call computes), read by the
  properties; ``strategies``: the Hypothesis strategies that draw them, and
  batch and feature sizes (only the tests need Hypothesis).
* ``properties``: batch invariance (bitwise), run-to-run determinism,
  accuracy, and cross-framework equality, with failure reports that name rows,
  batch sizes and ULP distances.
* ``devices``: whether the suite runs natively on a GPU or in the interpreters,
  and the sizes that go with each.
"""

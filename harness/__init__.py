"""Framework-agnostic property harness for batch-invariant ops.

* ``registry``: one ``OpSpec`` per op (inputs with a batch axis, float64
  reference, tolerance per dtype, benchmark shapes).
* ``frameworks``: adapters that turn numpy arrays into torch or jax inputs, find
  each framework's bi_ kernel, default implementation and negative controls,
  and turn outputs back into numpy bits.
* ``strategies``: Hypothesis strategies for batch sizes, feature sizes and
  batch compositions.
* ``properties``: batch invariance (bitwise), run-to-run determinism,
  accuracy, and cross-framework equality, with failure reports that name rows,
  batch sizes and ULP distances.
* ``devices``: whether the suite runs natively on a GPU or in the interpreters,
  and the sizes that go with each.
"""

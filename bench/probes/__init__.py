"""Tuning probes, each runnable as ``python -m bench.probes.NAME`` on a GPU.

* ``tune_matmul``: every candidate tile config of ``bi_torch.matmul`` against
  cuBLAS, with the bits of each against a reference launch.
* ``jax_matmul_configs``: the JAX matmul per config (Mosaic GPU or Triton
  tiles): bits against bi_torch and a large-M launch, time against
  ``jnp.dot`` and cuBLAS.
* ``jax_matmul_edges``: the Mosaic GPU matmul on small and ragged shapes,
  run twice: wrong or nondeterministic launches.

They reach the kernels only through each op's ``launch`` function, which
takes an explicit config. Probes whose findings are recorded in
``bench/NOTES.md`` were deleted; ``git show 336c91a:bench/<name>.py`` has
them.
"""

"""The contract of a batch-invariant all-reduce (tensor parallelism).

A sharded layer sums the ranks' partial results. Collective libraries pick
their algorithm (ring, tree), protocol and chunking from the message size,
which follows the batch size, so with three ranks or more an element's
partials are added in another order when the batch changes (with two, a + b
is one rounding in either order). Here every rank gathers all the partials
(a copy: no arithmetic) and adds them elementwise **in rank order, in fp32**,
``((p0 + p1) + p2) + ...``, rounding once to the inputs' dtype: an element's
bits depend on its partials alone, and every rank gets the same bits.

The tensor-parallel degree itself changes the bits: a row-parallel product
splits its K sum into one partial per rank, so TP = 2 and TP = 4 (or one
GPU) add the K terms in different orders. Invariance holds for a fixed
degree and a fixed sharding.
"""

from __future__ import annotations

ACCUMULATE = "float32"  # the partials' sum: fp32, in rank order, rounded once

"""Batch plans: which rows of a reference batch a second call computes.

No Hypothesis here: the strategies that draw plans live in
``harness.strategies``; the properties only read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """A reference batch and a second batch built from some of its rows.

    The reference call computes ``f(x)`` on ``full`` rows. The second call
    computes ``f(b)`` on ``len(index)`` rows where ``b[j] = x[index[j]]`` if
    ``index[j] < full``, else a fresh row (``extra`` of them). Every row drawn
    from ``x`` must come out with the same bits in both calls.
    """

    full: int
    index: tuple[int, ...]
    extra: int
    mode: str
    start: int = 0  # for mode "slice": the second batch is the view x[start:start+len]

    @property
    def size(self) -> int:
        return len(self.index)

    def shared(self) -> np.ndarray:
        """Positions in the second batch whose row comes from the reference batch."""
        idx = np.asarray(self.index)
        return np.nonzero(idx < self.full)[0]

    def describe(self) -> str:
        return f"mode={self.mode}, reference batch M={self.full}, second batch K={self.size}"

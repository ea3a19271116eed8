"""Framework-neutral argument checks."""

from __future__ import annotations

import math


def check_eps(eps: object) -> float:
    """``eps`` as a float; a clear error if it is not a finite non-negative number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative float, got {eps}")
    return eps

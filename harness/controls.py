"""Building blocks of the negative controls: reductions whose order changes
with the batch size, as a split-K or split-row heuristic tuned per shape would.

Written once with a framework's ``ArrayOps`` (``xp``), so that the same
control runs in every framework.
"""

from __future__ import annotations


def splits(batch: int) -> int:
    """The number of partial sums a control splits a reduction into: it
    changes with the batch size, which is the point."""
    return 1 + batch % 4


def split_row_sums(xp, rows):
    """fp32 sums over the last axis of ``rows`` (2-D), the row split into
    ``splits(batch)`` chunks whose sums are added in turn."""
    parts = xp.split(rows, splits(rows.shape[0]), -1)
    total = xp.sum(parts[0], -1)
    for part in parts[1:]:
        total = total + xp.sum(part, -1)
    return total


def split_product(xp, a, b):
    """``a @ b`` in fp32 with K split into ``splits(len(a))`` partial products."""
    n = splits(a.shape[0])
    a_parts, b_parts = xp.split(xp.f32(a), n, -1), xp.split(xp.f32(b), n, 0)
    acc = xp.matmul_f32(a_parts[0], b_parts[0])
    for a_part, b_part in zip(a_parts[1:], b_parts[1:]):
        acc = acc + xp.matmul_f32(a_part, b_part)
    return acc

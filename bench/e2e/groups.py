"""The default engines' attention over a packed step: PyTorch and JAX have no
paged, variable-length attention, so each sequence's keys are gathered from
its pages and a padded, masked dense attention runs over them. Padding every
sequence of a mixed step to the longest prefill chunk would multiply the
default's work by the step's sequence count, so the sequences run in two
groups: short queries (decodes, speculative verifications) and prefill
chunks, each padded to its own longest query and keys only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHORT = 8  # queries per sequence that still count as a decode (verification: k + 1)


@dataclass(frozen=True)
class Group:
    seqs: np.ndarray  # (G,) int32: the step's sequence of each row
    queries: np.ndarray  # (G, max_q) int32: each query's token in the step; padding: the token count
    max_q: int
    max_k: int


def attention_groups(q_lens: np.ndarray, kv_lens: np.ndarray, tokens: int | None = None, size=None) -> list[Group]:
    """The step's sequences with queries (``q_lens > 0``), short ones and
    long ones apart. ``size(n, least)`` rounds each padded extent up (the
    JAX engine's buckets, so that shapes repeat); None: exact. Padding rows
    take sequence 0 and no queries (their outputs are dropped). ``tokens``:
    the padding token index (default: the queries' count), one past the
    step's tokens."""
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(kv_lens)
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    tokens = int(q_lens.sum()) if tokens is None else tokens
    size = size or (lambda n, least: n)
    groups = []
    for members in (np.flatnonzero((q_lens > 0) & (q_lens <= SHORT)), np.flatnonzero(q_lens > SHORT)):
        if members.size == 0:
            continue
        rows = size(members.size, 1)
        max_q = size(int(q_lens[members].max()), 1)
        max_k = size(int(kv_lens[members].max()), 1)
        seqs = np.zeros(rows, np.int32)
        seqs[:members.size] = members
        queries = np.full((rows, max_q), tokens, np.int32)
        for row, s in enumerate(members):
            queries[row, :q_lens[s]] = starts[s] + np.arange(q_lens[s])
        groups.append(Group(seqs, queries, max_q, max_k))
    return groups

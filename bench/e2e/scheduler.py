"""Continuous batching, framework-neutral: which tokens each engine step
runs.

Requests arrive at random steps (an arrival schedule drawn from a seed, so
that two runs batch the same requests differently). Every step runs the
decode token of each request whose prompt is done, then fills the step's
token budget with chunks of waiting prompts (chunked prefill, mixed with the
decodes in one packed batch). KV-cache pages are taken from a free list when
a request needs them and returned when it finishes, so a request's pages
differ from run to run too. A step is described by host arrays (numpy); each
framework's engine turns it into one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    rid: int
    prompt: np.ndarray  # int32 tokens
    max_new: int
    arrival: int  # the first step it may run in
    seed: int  # its sampling noise's seed
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    pages: list[int] = field(default_factory=list)

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new

    def next_tokens(self, limit: int) -> np.ndarray:
        """The tokens this request would run next: a prompt chunk of at most
        ``limit`` tokens, or its last generated token."""
        if not self.prefilled:
            return self.prompt[self.cached:self.cached + limit]
        return np.asarray(self.generated[-1:], dtype=np.int32)


@dataclass(frozen=True)
class Step:
    """One packed forward pass over ``B`` sequences and ``T`` tokens."""

    rids: np.ndarray  # (B,) request ids
    tokens: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32: each token's position in its sequence
    cu_seqlens: np.ndarray  # (B + 1,) int32: sequence b owns tokens cu[b]:cu[b+1]
    cache_seqlens: np.ndarray  # (B,) int32: keys already cached before this step
    block_table: np.ndarray  # (B, pages_per_seq) int32
    emits: np.ndarray  # (B,) bool: the sequence's last token gives its next token
    positions_out: np.ndarray  # (B,) int32: the position of the token it samples
    seeds: np.ndarray  # (B,) int64

    @property
    def max_seqlen_q(self) -> int:
        return int(np.diff(self.cu_seqlens).max()) if len(self.rids) else 0


@dataclass(frozen=True)
class Workload:
    """Requests of a run: prompts, lengths, seeds (the same in every run)."""

    prompts: tuple[np.ndarray, ...]
    max_new: int
    seeds: tuple[int, ...]


def workload(n: int, min_prompt: int, max_prompt: int, max_new: int, vocab: int, seed: int = 0) -> Workload:
    """``n`` prompts of uniformly drawn lengths and tokens (tokens 1..vocab-1)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_prompt, max_prompt + 1, n)
    prompts = tuple(rng.integers(1, vocab, int(length), dtype=np.int32) for length in lengths)
    return Workload(prompts, max_new, tuple(int(s) for s in rng.integers(0, 2**31, n)))


class Scheduler:
    """Admits requests as they arrive and packs each step."""

    def __init__(self, work: Workload, *, schedule_seed: int, arrival_steps: int, token_budget: int,
                 max_seqs: int, page_size: int, num_pages: int, pages_per_seq: int) -> None:
        rng = np.random.default_rng(schedule_seed)
        arrivals = np.sort(rng.integers(0, arrival_steps + 1, len(work.prompts)))
        order = rng.permutation(len(work.prompts))  # which request arrives when
        self.waiting = [Request(int(r), work.prompts[r], work.max_new, int(a), work.seeds[r])
                        for r, a in zip(order, arrivals)]
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.token_budget, self.max_seqs = token_budget, max_seqs
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.free = list(rng.permutation(num_pages))  # pages handed out in a schedule-dependent order
        self.step_index = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _pages_for(self, request: Request, keys: int) -> bool:
        need = -(-keys // self.page_size) - len(request.pages)
        if need > len(self.free) or -(-keys // self.page_size) > self.pages_per_seq:
            return False
        for _ in range(max(need, 0)):
            request.pages.append(int(self.free.pop()))
        return True

    def next_step(self) -> Step | None:
        """The next step's batch (None while nothing can run yet)."""
        while self.waiting and self.waiting[0].arrival <= self.step_index and len(self.running) < self.max_seqs:
            self.running.append(self.waiting.pop(0))
        self.step_index += 1
        chosen, budget = [], self.token_budget
        # Decodes first (one token each), then prompt chunks in arrival order.
        for request in sorted(self.running, key=lambda r: not r.prefilled):
            if budget <= 0:
                break
            tokens = request.next_tokens(budget)
            if not self._pages_for(request, request.cached + len(tokens)):
                continue
            chosen.append((request, tokens))
            budget -= len(tokens)
        if not chosen:
            return None
        lengths = [len(t) for _, t in chosen]
        table = np.zeros((len(chosen), self.pages_per_seq), np.int32)
        for b, (request, _) in enumerate(chosen):
            table[b, :len(request.pages)] = request.pages
        emits = np.array([r.cached + len(t) >= len(r.prompt) for r, t in chosen])
        return Step(
            rids=np.array([r.rid for r, _ in chosen]),
            tokens=np.concatenate([t for _, t in chosen]).astype(np.int32),
            positions=np.concatenate([np.arange(r.cached, r.cached + len(t)) for r, t in chosen]).astype(np.int32),
            cu_seqlens=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            cache_seqlens=np.array([r.cached for r, _ in chosen], np.int32),
            block_table=table,
            emits=emits,
            positions_out=np.array([r.cached + len(t) for r, t in chosen], np.int32),
            seeds=np.array([r.seed for r, _ in chosen], np.int64),
        )

    def complete(self, step: Step, sampled: np.ndarray) -> None:
        """Record the step: its keys are cached, and each emitting sequence's
        sampled token (``sampled``: (B,) int) is appended."""
        by_id = {r.rid: r for r in self.running}
        for b, rid in enumerate(step.rids):
            request = by_id[int(rid)]
            request.cached += int(step.cu_seqlens[b + 1] - step.cu_seqlens[b])
            if step.emits[b]:
                request.generated.append(int(sampled[b]))
            if request.done:
                self.running.remove(request)
                self.free.extend(request.pages)
                request.pages = []
                self.finished[request.rid] = request

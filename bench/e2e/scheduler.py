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

Two options change what a request computes, not what it should get:

* ``prefix_cache``: full pages of prompt keys are kept under their prefix
  (every token up to the page's end); a request whose prompt starts with a
  kept prefix takes those pages as they are and computes only the rest.
* ``drafts`` and ``speculate=k``: a decoding request runs its last token and
  the next ``k`` tokens of its draft in one step (speculative decoding's
  verification), takes the logits of all ``k + 1`` positions, accepts the
  draft while the samples agree with it and appends the first sample that
  does not, or the sample after the last draft token.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    rid: int
    prompt: np.ndarray  # int32 tokens
    max_new: int
    arrival: int  # the first step it may run in
    seed: int  # its sampling noise's seed
    draft: tuple[int, ...] = ()  # tokens proposed for verification (speculate > 0)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    pages: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens taken from the prefix cache
    kept: int = 0  # prompt tokens whose pages the prefix cache holds

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new

    def next_tokens(self, limit: int, speculate: int) -> np.ndarray:
        """The tokens this request would run next: a prompt chunk of at most
        ``limit`` tokens, or its last generated token (and up to ``speculate``
        draft tokens after it)."""
        if not self.prefilled:
            return self.prompt[self.cached:self.cached + limit]
        n = len(self.generated)
        extra = list(self.draft[n:n + min(speculate, self.max_new - n - 1, max(limit - 1, 0))])
        return np.asarray(self.generated[-1:] + extra, dtype=np.int32)


@dataclass(frozen=True)
class Step:
    """One packed forward pass over ``B`` sequences and ``T`` tokens; logits
    are taken at ``S`` sample rows."""

    rids: np.ndarray  # (B,) request ids
    tokens: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32: each token's position in its sequence
    cu_seqlens: np.ndarray  # (B + 1,) int32: sequence b owns tokens cu[b]:cu[b+1]
    cache_seqlens: np.ndarray  # (B,) int32: keys already cached before this step
    block_table: np.ndarray  # (B, pages_per_seq) int32
    sample_rows: np.ndarray  # (S,) int: packed tokens whose logits give a next token
    sample_seqs: np.ndarray  # (S,) int: the sequence (0..B-1) of each sample row
    positions_out: np.ndarray  # (S,) int32: the position of the token each row samples
    seeds: np.ndarray  # (S,) int64: the request seed of each row

    @property
    def max_seqlen_q(self) -> int:
        return int(np.diff(self.cu_seqlens).max()) if len(self.rids) else 0


@dataclass(frozen=True)
class Workload:
    """Requests of a run: prompts, lengths, seeds (the same in every run)."""

    prompts: tuple[np.ndarray, ...]
    max_new: int
    seeds: tuple[int, ...]


def workload(n: int, min_prompt: int, max_prompt: int, max_new: int, vocab: int, seed: int = 0,
             shared_prefixes: int = 0, prefix_tokens: int = 0) -> Workload:
    """``n`` prompts of uniformly drawn lengths and tokens (tokens 1..vocab-1);
    with ``shared_prefixes``, each prompt starts with one of that many
    prefixes of ``prefix_tokens`` tokens (a system prompt, say)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_prompt, max_prompt + 1, n)
    prompts = [rng.integers(1, vocab, int(length), dtype=np.int32) for length in lengths]
    if shared_prefixes:
        prefixes = [rng.integers(1, vocab, prefix_tokens, dtype=np.int32) for _ in range(shared_prefixes)]
        prompts = [np.concatenate([prefixes[i % shared_prefixes], p]) for i, p in enumerate(prompts)]
    return Workload(tuple(prompts), max_new, tuple(int(s) for s in rng.integers(0, 2**31, n)))


class Scheduler:
    """Admits requests as they arrive and packs each step."""

    def __init__(self, work: Workload, *, schedule_seed: int, arrival_steps: int, token_budget: int,
                 max_seqs: int, page_size: int, num_pages: int, pages_per_seq: int, prefix_cache: bool = False,
                 drafts: dict[int, list[int]] | None = None, speculate: int = 0) -> None:
        rng = np.random.default_rng(schedule_seed)
        arrivals = np.sort(rng.integers(0, arrival_steps + 1, len(work.prompts)))
        order = rng.permutation(len(work.prompts))  # which request arrives when
        self.waiting = [Request(int(r), work.prompts[r], work.max_new, int(a), work.seeds[r],
                                tuple((drafts or {}).get(int(r), ())))
                        for r, a in zip(order, arrivals)]
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self.token_budget, self.max_seqs, self.speculate = token_budget, max_seqs, speculate
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.free = list(rng.permutation(num_pages))  # pages handed out in a schedule-dependent order
        self.refs: Counter[int] = Counter()  # holders of each page: requests, and the prefix cache
        self.prefixes: dict[bytes, int] | None = {} if prefix_cache else None
        self.step_index = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self, request: Request) -> None:
        """Start a request, with the kept pages of its prompt's prefix (never
        its last token, whose logits it needs)."""
        if self.prefixes is not None:
            ps = self.page_size
            for i in range((len(request.prompt) - 1) // ps):
                page = self.prefixes.get(request.prompt[:(i + 1) * ps].tobytes())
                if page is None:
                    break
                request.pages.append(page)
                self.refs[page] += 1
                request.cached = request.reused = request.kept = (i + 1) * ps
        self.running.append(request)

    def _pages_for(self, request: Request, keys: int) -> bool:
        need = -(-keys // self.page_size) - len(request.pages)
        if need > len(self.free) or -(-keys // self.page_size) > self.pages_per_seq:
            return False
        for _ in range(max(need, 0)):
            page = int(self.free.pop())
            request.pages.append(page)
            self.refs[page] += 1
        return True

    def next_step(self) -> Step | None:
        """The next step's batch (None while nothing can run yet)."""
        while self.waiting and self.waiting[0].arrival <= self.step_index and len(self.running) < self.max_seqs:
            self._admit(self.waiting.pop(0))
        self.step_index += 1
        chosen, budget = [], self.token_budget
        # Decodes first (one token each, or a verification), then prompt chunks in arrival order.
        for request in sorted(self.running, key=lambda r: not r.prefilled):
            if budget <= 0:
                break
            tokens = request.next_tokens(budget, self.speculate)
            if not self._pages_for(request, request.cached + len(tokens)):
                continue
            chosen.append((request, tokens))
            budget -= len(tokens)
        if not chosen:
            return None
        lengths = [len(t) for _, t in chosen]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = np.zeros((len(chosen), self.pages_per_seq), np.int32)
        rows, seqs, out_positions, seeds = [], [], [], []
        for b, (request, tokens) in enumerate(chosen):
            table[b, :len(request.pages)] = request.pages
            end = request.cached + len(tokens)
            if end < len(request.prompt):
                continue  # a prompt chunk that does not finish the prompt: no token to sample
            # A finished prompt samples at its last token; a decode at each of its tokens.
            first = len(tokens) - 1 if not request.prefilled else 0
            for j in range(first, len(tokens)):
                rows.append(cu[b] + j)
                seqs.append(b)
                out_positions.append(request.cached + j + 1)
                seeds.append(request.seed)
        return Step(
            rids=np.array([r.rid for r, _ in chosen]),
            tokens=np.concatenate([t for _, t in chosen]).astype(np.int32),
            positions=np.concatenate([np.arange(r.cached, r.cached + len(t)) for r, t in chosen]).astype(np.int32),
            cu_seqlens=cu,
            cache_seqlens=np.array([r.cached for r, _ in chosen], np.int32),
            block_table=table,
            sample_rows=np.array(rows, np.int64),
            sample_seqs=np.array(seqs, np.int64),
            positions_out=np.array(out_positions, np.int32),
            seeds=np.array(seeds, np.int64),
        )

    def complete(self, step: Step, sampled: np.ndarray) -> None:
        """Record the step: its keys are cached, and each sequence's sampled
        tokens (``sampled``: (S,) int, one per sample row) are appended, a
        verification's accepted drafts and the token after them."""
        by_id = {r.rid: r for r in self.running}
        samples: dict[int, list[int]] = {}
        for seq, token in zip(step.sample_seqs, sampled):
            samples.setdefault(int(seq), []).append(int(token))
        for b, rid in enumerate(step.rids):
            request = by_id[int(rid)]
            ran = int(step.cu_seqlens[b + 1] - step.cu_seqlens[b])
            got = samples.get(b, [])
            if request.prefilled and len(got) > 1:  # a verification: accept the draft while it agrees
                proposed = step.tokens[step.cu_seqlens[b] + 1:step.cu_seqlens[b + 1]]
                accepted = 0
                while accepted < len(proposed) and got[accepted] == proposed[accepted]:
                    accepted += 1
                request.generated.extend(int(t) for t in proposed[:accepted])
                request.generated.append(got[accepted])
                request.cached += 1 + accepted  # the keys of rejected draft tokens are stale
            else:
                request.cached += ran
                request.generated.extend(got)
            self._keep_prefix(request)
            if request.done:
                del request.generated[request.max_new:]
                self.running.remove(request)
                for page in request.pages:
                    self.refs[page] -= 1
                    if not self.refs[page]:
                        self.free.append(page)
                request.pages = []
                self.finished[request.rid] = request

    def _keep_prefix(self, request: Request) -> None:
        """Keep the request's full pages of prompt keys under their prefix."""
        if self.prefixes is None:
            return
        ps = self.page_size
        full = min(request.cached, len(request.prompt)) // ps
        for i in range(request.kept // ps, full):
            key = request.prompt[:(i + 1) * ps].tobytes()
            if key not in self.prefixes:
                self.prefixes[key] = request.pages[i]
                self.refs[request.pages[i]] += 1
        request.kept = max(request.kept, full * ps)

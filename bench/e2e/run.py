"""Runs of the engines over arrival schedules, and what they gave."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.e2e.scheduler import Scheduler, Workload


@dataclass(frozen=True)
class Serving:
    """The engine's limits: tokens per step, sequences per step, the paged cache."""

    token_budget: int
    max_seqs: int
    page_size: int
    num_pages: int
    pages_per_seq: int
    arrival_steps: int  # requests arrive over this many steps


def run_schedule(engine, work: Workload, serving: Serving, schedule_seed: int, logits: bool = False,
                 prefix_cache: bool = False, drafts=None, speculate: int = 0) -> dict:
    """One run: every request to completion. Returns the completions (request
    id -> tokens), the steps' sizes, the wall time, the prompt tokens taken
    from the prefix cache and, with ``logits``, each request's logits per
    sample (a verification's rejected positions included).

    An engine with ``compilations()`` (how many shapes it has compiled) has
    each step that compiled run twice; the wall time counts the second run,
    so that a schedule's new shapes do not count as serving time
    (``compiled_steps``: how many)."""
    s = Scheduler(work, schedule_seed=schedule_seed, arrival_steps=serving.arrival_steps,
                  token_budget=serving.token_budget, max_seqs=serving.max_seqs, page_size=serving.page_size,
                  num_pages=serving.num_pages, pages_per_seq=serving.pages_per_seq, prefix_cache=prefix_cache,
                  drafts=drafts, speculate=speculate)
    sizes, seen = [], {}
    compiles = getattr(engine, "compilations", None)
    recompiled, excess = 0, 0.0
    start = time.perf_counter()
    while not s.idle:
        step = s.next_step()
        if step is None:
            if not s.running and s.waiting:  # nothing to run until the next arrival
                s.step_index = max(s.step_index, s.waiting[0].arrival)
                continue
            raise RuntimeError("the scheduler cannot place any running request (too few cache pages)")
        before = compiles() if compiles else 0
        began = time.perf_counter()
        if logits:
            sampled, scores = engine.step(step, logits=True)
            for j, b in enumerate(step.sample_seqs):
                seen.setdefault(int(step.rids[b]), []).append(scores[j])
        else:
            sampled = engine.step(step)
        if compiles and compiles() > before:
            # The step compiled a new shape: its time is the compiler's. Run it
            # again (it writes the same keys to the same slots) and count that.
            took = time.perf_counter() - began
            began = time.perf_counter()
            engine.step(step)
            excess += took - (time.perf_counter() - began)
            recompiled += 1
        s.complete(step, sampled)
        sizes.append((len(step.rids), len(step.tokens)))
    seconds = time.perf_counter() - start - excess
    out = {"completions": {rid: r.generated for rid, r in s.finished.items()}, "steps": sizes, "seconds": seconds,
           "compiled_steps": recompiled,
           "generated": sum(len(r.generated) for r in s.finished.values()),
           "reused_prompt_tokens": sum(r.reused for r in s.finished.values())}
    if logits:
        out["logits"] = {rid: np.stack(v) for rid, v in seen.items()}
    return out


def distinct(runs: list[dict]) -> dict[int, dict]:
    """Per request: how many distinct completions the runs gave, and the first
    token position where any two differ (None if all agree)."""
    result = {}
    for rid in runs[0]["completions"]:
        outs = [tuple(r["completions"][rid]) for r in runs]
        first = None
        if len(set(outs)) > 1:
            first = next(i for i in range(len(outs[0])) if len({o[i] for o in outs}) > 1)
        result[rid] = {"distinct": len(set(outs)), "first_divergence": first}
    return result

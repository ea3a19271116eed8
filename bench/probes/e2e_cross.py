"""Where bi_torch's and bi_jax's serving engines part::

    python -m bench.probes.e2e_cross [--out DIR] [--request 1] [--requests 16] [--cpu]

One request of the e2e workload (``python -m bench --e2e``'s, with
``--requests``) served alone, step by step, by both frameworks' bi_ engines
side by side (the torch engine's tokens drive the schedule). Each step's
logits are compared bit for bit; at the first step whose logits differ, the
step runs again in both engines (it writes the same keys to the same slots)
with every intermediate kept: the embedding rows, and per layer each norm,
product, RoPE, attention output, activation and the residual stream, then the
head's norm and logits. One JSON line per step compared, and per kept value
of that step: elements that differ and the largest difference. The first kept
value that differs names the op that breaks the cross-framework equality
(the values before it are equal inputs to it).

``--cpu``: the tiny model in the interpreters (to try the probe; the two
frameworks' interpreters need not agree).
"""

from __future__ import annotations

import os

# Both frameworks in one process: JAX must not take 75 % of the GPU's
# memory at start (an 8B model in each, torch's ran out of memory).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from bench.e2e import command, jax_engine, torch_engine
from bench.e2e.scheduler import Scheduler, Workload, workload
from bench.probes._log import jsonl_emitter


def _torch_recorder(engine, kept: list):
    """Patch the torch engine so that a step keeps its intermediates in
    ``kept`` (name, tensor); returns a function that undoes it."""
    names = ("_norm", "_matmul", "_attention", "_rope")
    originals = {name: getattr(engine, name) for name in names}

    def keeping(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            kept.append((name.strip("_"), out))
            return out
        return wrapped

    for name in names:
        setattr(engine, name, keeping(name, originals[name]))
    activation = torch_engine.mlp_activation
    torch_engine.mlp_activation = keeping("activation", activation)

    def undo():
        for name in names:
            setattr(engine, name, originals[name])
        torch_engine.mlp_activation = activation
    return undo


def _torch_kept(engine, step):
    """The torch engine's step again, with its intermediates (name, numpy)."""
    import torch

    kept: list = []
    undo = _torch_recorder(engine, kept)
    try:
        import bi_torch

        batch = engine._batch(step)
        kept.append(("embedding", bi_torch.embedding(batch["tokens"], engine.w["embed"])))
        engine.step(step, logits=True)
    finally:
        undo()
    return [(name, t.float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)) for name, t in kept]


def _jax_kept(engine, step):
    """The JAX engine's step again, layer by layer, each layer jitted with its
    intermediates as outputs (name, numpy; the padding rows cut off)."""
    import jax
    import jax.numpy as jnp

    import bi_jax

    tokens, ix, max_q, shapes, last, seeds, pos_out, s_real = engine._padded(step)
    t_real = len(step.tokens)

    def recording(fn, trace: list, *args):
        """``fn(*args)`` traced with the engine's ops (and RoPE, activation)
        appending their outputs to ``trace``."""
        norm, mm = engine._ops()
        ops, rope, act = engine._ops, jax_engine.rope, jax_engine.mlp_activation

        def keeping(name, f):
            def wrapped(*a, **k):
                out = f(*a, **k)
                trace.append((name, out))
                return out
            return wrapped

        engine._ops = lambda: (keeping("norm", norm), keeping("matmul", mm))
        jax_engine.rope, jax_engine.mlp_activation = keeping("rope", rope), keeping("activation", act)
        try:
            return fn(*args)
        finally:
            engine._ops, jax_engine.rope, jax_engine.mlp_activation = ops, rope, act

    names: list = []  # the kept values' names, set while tracing

    def layer(p, x, k_cache, v_cache, ix):
        trace: list = []

        def attend(q, k, v):
            kc, vc = k_cache.at[ix["page"], ix["slot"]].set(k), v_cache.at[ix["page"], ix["slot"]].set(v)
            out = bi_jax.paged_attention(q, kc, vc, ix["table"], ix["kv_lens"], cu_seqlens_q=ix["cu"],
                                         max_seqlen_q=max_q)
            trace.append(("attention", out))
            return out, (kc, vc)

        out, (kc, vc) = recording(lambda: engine.block(p, x, ix["cos"], ix["sin"], attend), trace)
        names[:] = [name for name, _ in trace]
        return out, kc, vc, [value for _, value in trace]

    x = engine.w["embed"][tokens]
    kept = [("embedding", np.asarray(x.astype(jnp.float32))[:t_real])]
    jitted = jax.jit(layer)
    for i, p in enumerate(engine.layers):
        k_cache, v_cache = engine.caches[i]
        x, k_cache, v_cache, values = jitted(p, x, k_cache, v_cache, ix)
        engine.caches[i] = (k_cache, v_cache)
        kept.extend((name, np.asarray(v.astype(jnp.float32))[:t_real]) for name, v in zip(names, values))
    trace: list = []
    recording(lambda: engine.scores(engine.w["norm"], engine.w["head"], x[last]), trace)
    kept.extend((name, np.asarray(v.astype(jnp.float32))[:s_real]) for name, v in trace)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.e2e_cross", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--request", type=int, default=1, help="the request of the workload to serve alone")
    p.add_argument("--requests", type=int, default=16, help="the workload's request count (its prompts follow it)")
    p.add_argument("--cpu", action="store_true", help="the tiny model in the interpreters")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "e2e_cross")
    setup = command.setup_for(not args.cpu, requests=args.requests, runs=1)
    work = workload(setup.requests, setup.min_prompt, setup.max_prompt, setup.new_tokens, setup.model.vocab)
    r = args.request
    alone = Workload((work.prompts[r],), work.max_new, (work.seeds[r],))
    s = dataclasses.replace(setup.serving, num_pages=2 * setup.serving.pages_per_seq, arrival_steps=0)
    device = "cpu" if args.cpu else "cuda"
    engines = {fw: command._engine(fw, "bi", dataclasses.replace(setup, serving=s), 0.0, device)
               for fw in ("torch", "jax")}
    sched = Scheduler(alone, schedule_seed=0, arrival_steps=0, token_budget=s.token_budget, max_seqs=s.max_seqs,
                      page_size=s.page_size, num_pages=s.num_pages, pages_per_seq=s.pages_per_seq)
    index, diagnosed, tokens = 0, False, {"torch": [], "jax": []}
    emit({"request": r, "prompt_tokens": len(alone.prompts[0]), "new_tokens": alone.max_new,
          "model": dataclasses.asdict(setup.model)})
    while not sched.idle:
        step = sched.next_step()
        if step is None:
            raise RuntimeError("the scheduler placed no step for a lone request")
        got = {fw: e.step(step, logits=True) for fw, e in engines.items()}
        (t_tok, t_logits), (j_tok, j_logits) = got["torch"], got["jax"]
        tokens["torch"].extend(int(x) for x in t_tok)
        tokens["jax"].extend(int(x) for x in j_tok)
        differ = int((np.asarray(t_logits) != np.asarray(j_logits)).sum())
        emit({"step": index, "tokens": len(step.tokens), "cached": int(step.cache_seqlens[0]),
              "logits_differing": differ, "token_torch": int(t_tok[0]), "token_jax": int(j_tok[0])})
        if differ and not diagnosed:
            diagnosed = True
            t_kept = _torch_kept(engines["torch"], step)
            j_kept = _jax_kept(engines["jax"], step)
            layer = 0
            for k, ((tn, ta), (jn, ja)) in enumerate(zip(t_kept, j_kept)):
                row = {"step": index, "kept": k, "layer": layer, "torch_op": tn, "jax_op": jn,
                       "shape": list(ta.shape)}
                if ta.shape != ja.shape or tn != jn:
                    row["mismatch"] = f"torch {tn} {ta.shape}, jax {jn} {ja.shape}"
                else:
                    row["differ"] = int((ta != ja).sum())
                    row["max_abs_diff"] = float(np.abs(ta - ja).max()) if ta.size else 0.0
                emit(row)
                if tn == "matmul" and k and t_kept[k - 1][0] == "activation":
                    layer += 1  # the down projection ends the layer
            if len(t_kept) != len(j_kept):
                emit({"step": index, "kept_counts": [len(t_kept), len(j_kept)]})
        sched.complete(step, t_tok)
        index += 1
    first = next((i for i, (a, b) in enumerate(zip(tokens["torch"], tokens["jax"])) if a != b), None)
    emit({"request": r, "steps": index, "same_tokens": first is None, "first_differing_token": first})


if __name__ == "__main__":
    main()

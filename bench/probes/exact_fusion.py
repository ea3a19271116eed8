"""Which op of ``compile_backend(fuse="exact")`` changes a compiled Llama's
bits (GPU)::

    python -m bench.probes.exact_fusion [--out DIR]

The host-cost Llama (hidden 2048, 4 layers, bf16), B = 32, 64 prompt tokens,
greedy generation of 24 tokens with one static cache kept, compiled with
``mode="reduce-overhead"`` under the process-wide switch, against the eager
switch: every step's logits' bits, and the tokens; also the exact mode
with casts decomposed into ``convert_element_type``. If the exact mode
differs: with nothing marked; if marking is the cause, the groups of marked ops (each op of ``_EXACT_POINTWISE``, the views)
are taken out in halves until one group is found whose removal gives the
eager bits (one culprit assumed; a JSON line per try).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bi_torch
import bi_torch.hf as bhf
from bench.host_cost import KEPT, _generate_options, _llama
from bench.probes._log import jsonl_emitter
from bi_torch import compile as bc

_VIEWS = "views"


def _groups() -> list:
    return sorted(bc._EXACT_POINTWISE, key=str) + [_VIEWS]


def _generate(fuse, excluded=(), decomposed=None):
    """(logits of every step, tokens) of the switch, eager (``fuse`` None) or
    compiled; ``excluded``: groups left unmarked; ``decomposed``: the exact
    mode's decompositions (default its own)."""
    real_ops, real_check, real_decomposed = bc._EXACT_POINTWISE, bc._exact_on_cuda, bc._EXACT_DECOMPOSITIONS
    bc._EXACT_POINTWISE = frozenset(op for op in real_ops if op not in excluded)
    if _VIEWS in excluded:
        bc._exact_on_cuda = lambda node: real_check(node) and not getattr(node.target, "is_view", False)
    if decomposed is not None:
        bc._EXACT_DECOMPOSITIONS = decomposed
    torch._dynamo.reset()
    backend = bi_torch.compile_backend(mode="reduce-overhead", fuse=fuse) if fuse is not None else None
    model = bhf.batch_invariant(_llama("sdpa"), process_wide=True)
    if backend is not None:
        bi_torch.enable_batch_invariant_mode(compile_backend=backend)
    ids = torch.randint(1, 32000, (32, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    options = {"past_key_values": KEPT} if fuse is not None else {"cache_implementation": "static",
                                                                  "disable_compile": True}
    try:
        with torch.no_grad():
            for _ in range(2 if fuse is not None else 1):  # record, then replay
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                     min_new_tokens=24, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, **_generate_options(model, options, 64 + 24))
    finally:
        bi_torch.disable_batch_invariant_mode()
        bc._EXACT_POINTWISE, bc._exact_on_cuda, bc._EXACT_DECOMPOSITIONS = real_ops, real_check, real_decomposed
    return torch.stack(out.logits).float().cpu(), out.sequences[:, 64:].cpu()


def _compare(ref, got) -> dict:
    logits = (ref[0].view(torch.int32) != got[0].view(torch.int32))
    steps = logits.flatten(1).any(1)
    return {"differing_logits": int(logits.sum()),
            "first_step_differing": int(steps.nonzero()[0]) if steps.any() else None,
            "rows_with_other_tokens": int((ref[1] != got[1]).any(1).sum())}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.exact_fusion", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "exact_fusion")
    ref = _generate(None)
    for fuse in (False, "exact"):
        found = _compare(ref, _generate(fuse))
        emit({"fuse": fuse, **found})
    # Casts decomposed into convert_element_type (so that they fuse): torch's
    # decomposition broke the decode steps (bench/NOTES.md); float casts only?
    from torch._decomp import decomposition_table

    to_copy = torch.ops.aten._to_copy.default
    for name, fn in (("torch's", decomposition_table[to_copy]), ("float casts only", bc._float_cast)):
        emit({"fuse": "exact", "decomposed": f"_to_copy, {name}",
              **_compare(ref, _generate("exact", decomposed={to_copy: fn}))})
    if _same(found):
        return
    # Marking: nothing marked, then the marked groups in halves.
    nothing = _compare(ref, _generate("exact", _groups()))
    emit({"fuse": "exact", "excluded": "every group", **nothing})
    if not _same(nothing):
        return
    suspects = _groups()
    while len(suspects) > 1:
        half = suspects[: len(suspects) // 2]
        found = _compare(ref, _generate("exact", half))
        emit({"fuse": "exact", "excluded": [str(g) for g in half], **found})
        suspects = half if _same(found) else suspects[len(suspects) // 2:]
    found = _compare(ref, _generate("exact", suspects))
    emit({"fuse": "exact", "excluded": [str(g) for g in suspects], "culprit": _same(found), **found})


def _same(found) -> bool:
    return found["differing_logits"] == 0 and found["rows_with_other_tokens"] == 0


if __name__ == "__main__":
    main()

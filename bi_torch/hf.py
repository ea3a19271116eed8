"""Hugging Face transformers: the bi_ attention behind ``attn_implementation``,
and one call that makes a loaded model batch-invariant.

::

    import bi_torch.hf
    model = bi_torch.hf.batch_invariant(AutoModelForCausalLM.from_pretrained(...))
    out = model.generate(**batch)   # a prompt's tokens and logits: the same in any batch

or, to pick the attention alone (every other op as transformers runs it)::

    bi_torch.hf.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="batch_invariant")

The attention takes transformers' boolean masks (those of its ``sdpa``
implementation) and keeps a sequence's bits whatever padding the batch gives
it: with left padding (what ``generate`` uses for decoder-only models) a
sequence's keys sit after as many pad slots as its batch needs, and the
kernels fix their reduction order at key positions, so with a mask each
sequence's keys are counted from its first visible key
(``bi_torch.ops.attention.sdpa_from_first_visible``: the kernel reads each
sequence's start, nothing is copied).

Training: without a mask (unpadded batches, where transformers passes none)
the attention is ``bi_torch.attention``'s, with its fused backward; a padded
batch's masked attention is forward-only (refused under autograd). The
wrapper covers ``forward`` and ``generate``: run ``loss.backward()`` under
``set_batch_invariant_mode()`` too (or use ``process_wide=True``), so that the
backward formulas run the bi_ kernels.

Not supported, refused: ``softcap``, ``position_bias`` and attention sinks,
dropout, gradients through a mask, and attention weights
(``output_attentions`` returns ``None`` for them, as ``sdpa`` does).
"""

from __future__ import annotations

import functools

import torch

import bi_torch.compile  # noqa: F401  (registers torch.ops.bi_torch)
from bi_torch.mode import set_batch_invariant_mode
from bi_torch.ops.attention import scaled_dot_product_attention, sdpa_from_first_visible
from bi_torch.switch import enable_batch_invariant_mode

__all__ = ["IMPLEMENTATION", "attention_forward", "batch_invariant", "register"]

IMPLEMENTATION = "batch_invariant"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, Lq, D),
    ``key`` and ``value`` (B, Hkv, Lk, D), the mask of the ``sdpa``
    implementation (bool, True: attend; or additive float); returns the output
    as (B, Lq, H, D) and no weights."""
    op = "bi_torch.hf.attention_forward"
    for name in ("softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{op}: {name} is not supported by the batch-invariant attention")
    if dropout:
        raise NotImplementedError(f"{op}: dropout={dropout} is not supported (inference only; call model.eval())")
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"{op}: query and key must be 4-D (B, H, L, D), got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    sdpa = torch.ops.bi_torch.scaled_dot_product_attention if torch.compiler.is_compiling() \
        else scaled_dot_product_attention  # while compiling, the kernel's custom op (one node of the graph)
    gqa = query.shape[1] != key.shape[1]
    if attention_mask is None:
        # transformers leaves the mask out where torch's is_causal (queries
        # aligned to the first key) gives it: equal lengths, one query, or a
        # prefill into a static cache whose later slots are empty.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and query.shape[2] > 1
        out = sdpa(query, key, value, is_causal=causal, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # Each sequence's keys counted from its first visible one: one kernel
    # call, no copy of the keys.
    padded = torch.ops.bi_torch.sdpa_from_first_visible if torch.compiler.is_compiling() \
        else sdpa_from_first_visible
    return padded(query, key, value, attention_mask, scale=scaling, enable_gqa=gqa), None


def register() -> None:
    """Make ``attn_implementation="batch_invariant"`` select the bi_ attention
    (with the boolean masks of transformers' ``sdpa``). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def batch_invariant(model, *, strict: bool = False, process_wide: bool = False):
    """Make a loaded transformers model batch-invariant, in place, and return
    it: its attention becomes the bi_ attention (``register``,
    ``set_attn_implementation``), and its ``forward`` and ``generate`` run
    under ``set_batch_invariant_mode(strict=strict)``, so products, norms,
    softmaxes and reductions run the bi_ kernels (``strict``: an op that may
    change bits with the batch and has no bi_ kernel raises).

    ``process_wide=True``: switch ``enable_batch_invariant_mode()`` on now,
    for the whole process (``disable_batch_invariant_mode()`` switches it off),
    instead of the dispatch mode per call (the same kernels as aten's CUDA kernels, at a fraction of the dispatch
    mode's host cost; see ``bi_torch.switch``). On the GPU it gives the same
    bits. Not with ``strict`` (strictness needs the dispatch mode), and not
    for CPU runs under the Triton interpreter, where only the dispatch mode
    evaluates transcendental functions one element at a time."""
    if strict and process_wide:
        raise ValueError("batch_invariant: strict=True needs the per-thread dispatch mode; "
                         "pass process_wide=False (the default) for strictness")
    register()
    if process_wide and hasattr(model, "set_attn_implementation"):
        enable_batch_invariant_mode()  # once: per-call with blocks would race between threads
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"batch_invariant: {type(model).__name__} is not a transformers PreTrainedModel "
                        "(it has no set_attn_implementation)")
    model.set_attn_implementation(IMPLEMENTATION)
    for name in ("forward", "generate"):
        fn = getattr(model, name, None)
        if fn is None or getattr(fn, "_bi_wrapped", False):
            continue

        @functools.wraps(fn)
        def run(*args, _fn=fn, **kwargs):
            if process_wide:
                return _fn(*args, **kwargs)
            with set_batch_invariant_mode(True, strict=strict):
                return _fn(*args, **kwargs)

        run._bi_wrapped = True
        setattr(model, name, run)
    return model

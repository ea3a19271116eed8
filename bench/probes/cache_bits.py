"""Why transformers' static cache and its dynamic cache give other tokens
under the bi_ kernels (the host-cost Llama, 32 prompts of 64 tokens): first
the attention alone at decode sizes (keys sliced to the filled length, against
the whole buffer with a mask, the empty slots zero or random), then one
prefill and a few decoding steps of the model with each cache, the first
layer output that differs::

    python -m bench.probes.cache_bits [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bi_torch
import bi_torch.hf as bhf
from bench.host_cost import _llama
from bench.probes._log import jsonl_emitter


def attention_alone(emit) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, d = 32, 16, 8, 128
    for slots in (88, 1024):
        for filled in (65, 70, 88):
            if filled > slots:
                continue
            q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(b, hkv, slots, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(b, hkv, slots, d, device="cuda", dtype=torch.bfloat16, generator=g)
            sliced = bi_torch.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], enable_gqa=True)
            mask = torch.zeros(b, 1, 1, slots, device="cuda", dtype=torch.bool)
            mask[..., :filled] = True
            rec = {"part": "attention", "slots": slots, "filled": filled}
            for name, (kk, vv) in {"random empty slots": (k, v),
                                   "zero empty slots": (k.clone().index_fill_(2, torch.arange(
                                       filled, slots, device="cuda"), 0), v.clone().index_fill_(2, torch.arange(
                                           filled, slots, device="cuda"), 0))}.items():
                masked = bi_torch.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)
                rec[name] = {"equal": bool(torch.equal(sliced, masked)),
                             "max_abs": float((sliced.float() - masked.float()).abs().max())}
            full = torch.ones(b, 1, 1, filled, device="cuda", dtype=torch.bool)
            alike = bi_torch.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled], attn_mask=full,
                                                          enable_gqa=True)
            rec["same keys, an all-true mask"] = {"equal": bool(torch.equal(sliced, alike)),
                                                  "max_abs": float((sliced.float() - alike.float()).abs().max())}
            rec["masked, against the masked with every slot filled"] = bool(torch.equal(masked, bi_torch.scaled_dot_product_attention(
                q, k[:, :, :filled].contiguous(), v[:, :, :filled].contiguous(), attn_mask=full, enable_gqa=True)))
            emit(rec)


def model_steps(emit, steps: int = 4) -> None:
    from transformers import DynamicCache, StaticCache

    model = bhf.batch_invariant(_llama("sdpa"), process_wide=True)
    ids = torch.randint(1, 32000, (32, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    captured: dict[str, dict[str, torch.Tensor]] = {}
    current = {"run": None}

    def hook(name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured.setdefault(current["run"], {})[name] = out.detach().clone()
        return record

    for i, layer in enumerate(model.model.layers):
        for part in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            getattr(layer, part).register_forward_hook(hook(f"layer {i} {part}"))
    try:
        with torch.no_grad():
            caches = {"dynamic": DynamicCache(config=model.config),
                      "static": StaticCache(config=model.config, max_cache_len=64 + steps)}
            tokens = ids
            for step in range(steps):
                length = tokens.shape[1]
                new = tokens if step == 0 else tokens[:, -1:]
                positions = torch.arange(length - new.shape[1], length, device="cuda")
                logits = {}
                for name, cache in caches.items():
                    current["run"] = name
                    out = model(input_ids=new, attention_mask=torch.ones_like(tokens), past_key_values=cache,
                                cache_position=positions, use_cache=True)
                    logits[name] = out.logits[:, -1].float()
                first = next((k for k in captured["dynamic"] if not torch.equal(captured["dynamic"][k],
                                                                                  captured["static"][k])), None)
                emit({"part": "model", "step": step, "logits_equal": bool(torch.equal(*logits.values())),
                      "first_differing_output": first,
                      "rows_differing": None if first is None else int(
                          (captured["dynamic"][first] != captured["static"][first]).flatten(1).any(1).sum())})
                tokens = torch.cat([tokens, logits["dynamic"].argmax(-1, keepdim=True)], 1)
                captured.clear()
    finally:
        bi_torch.disable_batch_invariant_mode()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.cache_bits", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "cache_bits")
    attention_alone(emit)
    model_steps(emit)


if __name__ == "__main__":
    main()

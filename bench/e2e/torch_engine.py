"""The serving engine's forward pass in PyTorch: one packed step of mixed
prefill chunks and decodes over a paged KV cache.

``impl="bi"``: the bi_torch kernels (rms_norm, matmul, paged attention, the
embedding and SiLU-and-mul).
``impl="default"``: what PyTorch gives: ``F.rms_norm``, ``torch.matmul``
(cuBLAS), and attention by ``F.scaled_dot_product_attention`` over each
sequence's keys gathered from its pages (PyTorch has no paged attention),
decodes and prefill chunks in separate calls (``bench.e2e.groups``).
``impl="varlen"`` (CUDA only): the default, with attention by torch's
FlashAttention variable-length kernel (``torch.nn.attention.varlen.varlen_attn``)
over each step's keys gathered from the pages and packed, without padding
or repeated KV heads, in one call (a stronger default than the padded SDPA
calls; not yet run on a GPU).
``impl="control"``: the default, with products that sum K in two halves when
the step has an odd number of tokens (a negative control for the tests).
Everything else is the same code in both: the embedding gather, rotary
embeddings from fp32 tables, the cache writes, the residual adds and
sampling; SiLU-and-mul is the same fp32 expression in the defaults.
"""

from __future__ import annotations

import numpy as np

from bench.e2e import weights
from bench.e2e.config import ModelConfig, rope_tables, weight_specs
from bench.e2e.groups import attention_groups
from bench.e2e.scheduler import Step


# The elementwise parts, the JAX engine's twins (bench/e2e/jax_engine.py):
# whether the two frameworks round them alike is a question for the GPU
# (bench.probes.e2e_ops).


def rope(x, cos, sin):
    """Rotary embedding of (T, H, D) with fp32 ``cos``/``sin`` (T, 1, D/2)."""
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def mlp_activation(gate_up, intermediate: int, bi: bool = False):
    """SiLU(gate) * up of the fused (T, 2 I) projection: ``g / (1 + exp(-g)) *
    u`` written out in fp32, rounded once (``F.silu`` then a bf16 product
    would round twice, where XLA's fused form rounds once). ``bi``:
    ``bi_torch.silu_and_mul``, whose arithmetic is bi_jax's (torch's exp and
    division here and XLA's differ in the last bit now and then)."""
    import torch

    if bi:
        import bi_torch

        assert gate_up.shape[-1] == 2 * intermediate
        return bi_torch.silu_and_mul(gate_up)
    g, u = gate_up[:, :intermediate].float(), gate_up[:, intermediate:].float()
    return (g / (1.0 + torch.exp(-g)) * u).to(gate_up.dtype)


def gumbel(u):
    """Gumbel noise of uniforms ``u``."""
    import torch

    return -torch.log(-torch.log(u))


def packed_keys(block_table, kv_lens, page_size: int):
    """Every key of a step's sequences, packed in sequence order: the
    cumulative key counts, and each key's page and slot in the cache."""
    cu_k = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    seq = np.repeat(np.arange(len(kv_lens)), kv_lens)
    pos = np.arange(cu_k[-1]) - cu_k[:-1][seq]
    return cu_k, block_table[seq, pos // page_size], pos % page_size


class TorchEngine:
    def __init__(self, config: ModelConfig, *, impl: str, num_pages: int, page_size: int, device,
                 seed: int = 0, dtype=None, temperature: float = 0.0) -> None:
        import torch

        if impl not in ("bi", "default", "varlen", "control"):
            raise ValueError(f"impl must be 'bi', 'default', 'varlen' or 'control', got {impl!r}")
        self.config, self.impl, self.device = config, impl, torch.device(device)
        if impl == "varlen" and self.device.type != "cuda":
            raise ValueError("impl='varlen' runs torch's FlashAttention varlen kernel, which needs a CUDA device; "
                             f"got {self.device}")
        self.dtype = dtype or torch.bfloat16
        self.page_size, self.temperature = page_size, float(temperature)
        self.w = {name: weights.torch_tensor(shape, seed, index, scale, self.dtype, self.device, offset)
                  for index, (name, shape, scale, offset) in enumerate(weight_specs(config))}
        cos, sin = rope_tables(config)
        self.cos, self.sin = (torch.from_numpy(t).to(self.device) for t in (cos, sin))
        shape = (num_pages, page_size, config.kv_heads, config.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.layers)]

    # --- the ops that differ between the implementations ----------------------

    def _norm(self, x, weight):
        import torch

        if self.impl == "bi":
            import bi_torch

            return bi_torch.rms_norm(x, weight, self.config.eps)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.config.eps)

    def _matmul(self, a, b, out_dtype=None):
        import torch

        if self.impl == "bi":
            import bi_torch

            return bi_torch.matmul(a, b, out_dtype=out_dtype)
        if self.impl == "control" and a.shape[0] % 2:
            # A negative control: an odd number of rows sums K in two halves
            # (the batch picks the reduction order, as split-K does).
            half = a.shape[1] // 2
            out = torch.matmul(a[:, :half].float(), b[:half].float()) + torch.matmul(a[:, half:].float(), b[half:].float())
            return out.to(out_dtype or a.dtype)
        out = torch.matmul(a, b)
        return out if out_dtype is None else out.to(out_dtype)

    def _attention(self, q, layer, batch):
        if self.impl == "bi":
            import bi_torch

            return bi_torch.paged_attention(
                q, self.k_cache[layer], self.v_cache[layer], batch["table"], batch["kv_lens"],
                cu_seqlens_q=batch["cu"], max_seqlen_q=batch["max_q"], validate=False)
        if self.impl == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            k = self.k_cache[layer][batch["page_k"], batch["slot_k"]]  # (keys of the step, Hkv, D)
            v = self.v_cache[layer][batch["page_k"], batch["slot_k"]]
            # Causal, aligned to the end of each sequence's keys (FlashAttention's bottom right).
            return varlen_attn(q, k, v, batch["cu"], batch["cu_k"], batch["max_q"], batch["max_k"],
                               window_size=(-1, 0))
        return self._gathered_sdpa(q, layer, batch)

    def _gathered_sdpa(self, q, layer, batch):
        """Per group of sequences (``bench.e2e.groups``: decodes apart from
        prefill chunks), the queries against each sequence's keys gathered
        from its pages, padded to the group's longest; causal, aligned to the
        end of the keys."""
        import torch

        c = self.config
        q_ext = torch.cat([q, q.new_zeros((1,) + q.shape[1:])])  # the padding queries' row
        out = q.new_zeros(q_ext.shape)
        for g in batch["groups"]:
            seqs, queries = g["seqs"], g["queries"]
            slots = torch.arange(g["max_k"], device=self.device)
            pages = batch["table"].long()[seqs][:, slots // self.page_size]  # (G, Lk)
            k = self.k_cache[layer][pages, slots % self.page_size]  # (G, Lk, Hkv, D)
            v = self.v_cache[layer][pages, slots % self.page_size]
            kv_lens = batch["kv_lens"][seqs]
            # Query i of a sequence sits at key position kv_len - q_len + i.
            qpos = (kv_lens - batch["q_lens"][seqs])[:, None] + torch.arange(g["max_q"], device=self.device)
            mask = (slots[None, None, :] <= qpos[:, :, None]) & (slots[None, None, :] < kv_lens[:, None, None])
            # The KV heads repeated for their query heads, as transformers' SDPA
            # attention does: with a mask, ``enable_gqa`` would leave torch only
            # its math backend, and the memory-efficient one takes this form.
            k, v = (t.repeat_interleave(c.heads // c.kv_heads, dim=2) for t in (k, v))
            o = torch.nn.functional.scaled_dot_product_attention(
                q_ext[queries].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None])
            out[queries.reshape(-1)] = o.transpose(1, 2).reshape(-1, c.heads, c.head_dim)
        return out[:-1]

    # --- one step ------------------------------------------------------------------

    def _batch(self, step: Step) -> dict:
        """The step's index arrays on the device (one host-to-device copy each)."""
        import torch

        q_lens = np.diff(step.cu_seqlens)
        kv_lens = step.cache_seqlens + q_lens
        seq = np.repeat(np.arange(len(q_lens)), q_lens)
        index = np.arange(len(step.tokens)) - step.cu_seqlens[:-1][seq]
        pos = step.positions
        page = step.block_table[seq, pos // self.page_size]

        def dev(a, dtype=torch.int32):
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        packed = {}
        if self.impl == "varlen":
            cu_k, page_k, slot_k = packed_keys(step.block_table, kv_lens, self.page_size)
            packed = {"cu_k": dev(cu_k), "page_k": dev(page_k, torch.long), "slot_k": dev(slot_k, torch.long),
                      "max_k": int(kv_lens.max())}
        groups = [] if self.impl in ("bi", "varlen") else [
            {"seqs": dev(g.seqs, torch.long), "queries": dev(g.queries, torch.long), "max_q": g.max_q,
             "max_k": g.max_k} for g in attention_groups(q_lens, kv_lens)]
        return {**packed, "groups": groups, "tokens": dev(step.tokens, torch.long), "positions": dev(pos, torch.long),
                "cu": dev(step.cu_seqlens), "table": dev(step.block_table), "kv_lens": dev(kv_lens),
                "q_lens": dev(q_lens), "max_q": int(q_lens.max()), "page": dev(page, torch.long),
                "slot": dev(pos % self.page_size, torch.long), "seq_of_token": dev(seq, torch.long),
                "index_in_seq": dev(index, torch.long), "rows": dev(step.sample_rows, torch.long),
                "seeds": dev(step.seeds, torch.long), "positions_out": dev(step.positions_out)}

    def _rope(self, x, positions):
        return rope(x, self.cos[positions][:, None, :], self.sin[positions][:, None, :])

    def hidden(self, tokens, positions, attend):
        """The layers over ``tokens`` (T,) at ``positions`` (T,): the last
        hidden states (T, hidden). ``attend(layer, q, k, v)`` gives the
        attention output (T, heads, head_dim) for the layer's rotated queries
        and keys and its values."""
        c = self.config
        t = tokens.shape[0]
        nq, nkv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        if self.impl == "bi":  # the same gather; its weight gradient in a fixed order
            import bi_torch

            x = bi_torch.embedding(tokens, self.w["embed"])
        else:
            x = self.w["embed"][tokens]
        for i in range(c.layers):
            h = self._norm(x, self.w[f"{i}.attn_norm"])
            qkv = self._matmul(h, self.w[f"{i}.qkv"])
            q = self._rope(qkv[:, :nq].view(t, c.heads, c.head_dim), positions)
            k = self._rope(qkv[:, nq:nq + nkv].view(t, c.kv_heads, c.head_dim), positions)
            attn = attend(i, q, k, qkv[:, nq + nkv:].view(t, c.kv_heads, c.head_dim))
            x = x + self._matmul(attn.reshape(t, nq), self.w[f"{i}.o"])
            h = self._norm(x, self.w[f"{i}.mlp_norm"])
            gate_up = self._matmul(h, self.w[f"{i}.gate_up"])
            act = mlp_activation(gate_up, c.intermediate, bi=self.impl == "bi")
            x = x + self._matmul(act, self.w[f"{i}.down"])
        return x

    def scores(self, x):
        """fp32 logits of hidden states (rows, hidden)."""
        import torch

        return self._matmul(self._norm(x, self.w["norm"]), self.w["head"], out_dtype=torch.float32)

    def step(self, step: Step, logits: bool = False):
        """Run ``step``; returns the token sampled at each sample row (a host
        array) and, with ``logits``, the fp32 logits it was sampled from."""
        import torch

        c = self.config
        batch = self._batch(step)

        def attend(i, q, k, v):  # the step's keys and values into the cache, then paged attention
            self.k_cache[i][batch["page"], batch["slot"]] = k
            self.v_cache[i][batch["page"], batch["slot"]] = v
            return self._attention(q, i, batch)

        with torch.no_grad():
            x = self.hidden(batch["tokens"], batch["positions"], attend)
            scores = self.scores(x[batch["rows"]])
            if self.temperature > 0:
                u = weights.torch_uniform_noise(batch["seeds"], batch["positions_out"], c.vocab)
                sampled = (scores / self.temperature + gumbel(u)).argmax(dim=-1)  # Gumbel-max
            else:
                sampled = scores.argmax(dim=-1)
        tokens = sampled.cpu().numpy()
        return (tokens, scores.cpu().numpy()) if logits else tokens

"""The serving engine's forward pass in JAX, the torch engine's twin.

``impl="bi"``: the bi_jax kernels (rms_norm, matmul, paged attention, the
embedding and SiLU-and-mul).
``impl="default"``: what JAX gives: the same expressions through XLA
(``x @ w``, a jnp RMSNorm), and attention by ``jax.nn.dot_product_attention``
over each sequence's keys gathered from its pages, decodes and prefill chunks
apart (``bench.e2e.groups``).

Under ``jit`` every shape is static, so a step is padded: its token count to
a bucket (powers of two, at least 16) and its sequence count to the engine's
most sequences per step (``max_seqs``, plus the padding sequence), and the
longest query run is bounded by the token bucket: one compilation per token
bucket, so a new arrival schedule meets no new shape once its token counts
have been seen. The padding tokens form one more sequence
of their own, whose keys go to scratch pages past the cache's own; rows are
computed independently (that is the point of the bi_ kernels), so padding
changes no real row's bits. One layer is one jitted function, reused by
every layer (one compilation per bucket, not per model).
"""

from __future__ import annotations

import functools

import numpy as np

from bench.e2e import weights
from bench.e2e.config import ModelConfig, rope_tables, weight_specs
from bench.e2e.groups import attention_groups
from bench.e2e.scheduler import Step


def rope(x, cos, sin):
    """Rotary embedding of (T, H, D) with fp32 ``cos``/``sin`` (T, 1, D/2)."""
    import jax.numpy as jnp

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def mlp_activation(gate_up, intermediate: int, bi: bool = False):
    """SiLU(gate) * up of the fused (T, 2 I) projection, as the torch engine
    writes it: ``g / (1 + exp(-g)) * u`` in fp32, rounded once; ``bi``:
    ``bi_jax.silu_and_mul`` (bi_torch's arithmetic)."""
    import jax.numpy as jnp

    if bi:
        import bi_jax

        assert gate_up.shape[-1] == 2 * intermediate
        return bi_jax.silu_and_mul(gate_up)
    g = gate_up[:, :intermediate].astype(jnp.float32)
    u = gate_up[:, intermediate:].astype(jnp.float32)
    return (g / (1.0 + jnp.exp(-g)) * u).astype(gate_up.dtype)


def gumbel(u):
    """Gumbel noise of uniforms ``u``."""
    import jax.numpy as jnp

    return -jnp.log(-jnp.log(u))


def bucket(n: int, least: int = 16) -> int:
    """The next power of two, at least ``least``."""
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


class JaxEngine:
    def __init__(self, config: ModelConfig, *, impl: str, num_pages: int, page_size: int, pages_per_seq: int,
                 max_seqs: int, seed: int = 0, dtype: str = "bfloat16", temperature: float = 0.0) -> None:
        import jax.numpy as jnp

        if impl not in ("bi", "default"):
            raise ValueError(f"impl must be 'bi' or 'default', got {impl!r}")
        self.config, self.impl, self.page_size, self.temperature = config, impl, page_size, float(temperature)
        self.pages_per_seq = pages_per_seq
        self.seq_slots = max_seqs + 1  # one more sequence for the padding tokens
        self.w = {name: weights.jax_tensor(shape, seed, index, scale, dtype, offset)
                  for index, (name, shape, scale, offset) in enumerate(weight_specs(config))}
        self.layers = [{k.split(".", 1)[1]: v for k, v in self.w.items() if k.startswith(f"{i}.")}
                       for i in range(config.layers)]
        cos, sin = rope_tables(config)
        self.cos, self.sin = jnp.asarray(cos), jnp.asarray(sin)
        # Scratch pages past the cache's own hold the padding sequence's keys.
        self.scratch = num_pages
        shape = (num_pages + pages_per_seq, page_size, config.kv_heads, config.head_dim)
        self.caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers)]
        self._layer = self._jit_layer()
        self._head = self._jit_head()

    # --- jitted parts -----------------------------------------------------------

    def _ops(self):
        """(norm, matmul) of the engine's implementation."""
        import jax
        import jax.numpy as jnp

        c = self.config
        if self.impl == "bi":
            import bi_jax

            return functools.partial(bi_jax.rms_norm, eps=c.eps), bi_jax.matmul

        def norm(x, w):
            xf = x.astype(jnp.float32)
            r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + c.eps)
            return (xf * r * w.astype(jnp.float32)).astype(x.dtype)
        return norm, jnp.matmul

    def block(self, p, x, cos, sin, attend):
        """One layer with weights ``p`` over ``x`` (T, hidden) with the RoPE
        tables of its positions; ``attend(q, k, v)`` gives the attention
        output (T, heads, head_dim) and anything else to return beside the
        new ``x``."""
        c = self.config
        norm, mm = self._ops()
        nq, nkv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        t = x.shape[0]
        h = norm(x, p["attn_norm"])
        qkv = mm(h, p["qkv"])
        q = rope(qkv[:, :nq].reshape(t, c.heads, c.head_dim), cos, sin)
        k = rope(qkv[:, nq:nq + nkv].reshape(t, c.kv_heads, c.head_dim), cos, sin)
        attn, extra = attend(q, k, qkv[:, nq + nkv:].reshape(t, c.kv_heads, c.head_dim))
        x = x + mm(attn.reshape(t, nq), p["o"])
        h = norm(x, p["mlp_norm"])
        act = mlp_activation(mm(h, p["gate_up"]), c.intermediate, bi=self.impl == "bi")
        return x + mm(act, p["down"]), extra

    def scores(self, w_norm, w_head, h):
        """fp32 logits of hidden states (rows, hidden)."""
        import jax.numpy as jnp

        norm, mm = self._ops()
        return mm(norm(h, w_norm), w_head, preferred_element_type=jnp.float32)

    def _jit_layer(self):
        import jax
        import jax.numpy as jnp

        c, bi = self.config, self.impl == "bi"
        if bi:
            import bi_jax

        def attention(q, k_cache, v_cache, ix, max_q, shapes):
            if bi:
                return bi_jax.paged_attention(q, k_cache, v_cache, ix["table"], ix["kv_lens"],
                                              cu_seqlens_q=ix["cu"], max_seqlen_q=max_q)
            # Per group (bench.e2e.groups: decodes apart from prefill chunks),
            # each sequence's keys gathered from its pages, padded, masked.
            q_ext = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)])  # the padding queries' row
            out = jnp.zeros_like(q_ext)
            for (seqs, queries), (g_max_q, g_max_k) in zip(ix["groups"], shapes):
                slots = jnp.arange(g_max_k)
                pages = ix["table"][seqs][:, slots // self.page_size]
                k = k_cache[pages, slots % self.page_size]  # (G, Lk, Hkv, D)
                v = v_cache[pages, slots % self.page_size]
                kv_lens = ix["kv_lens"][seqs]
                qpos = (kv_lens - ix["q_lens"][seqs])[:, None] + jnp.arange(g_max_q)
                mask = (slots[None, None, :] <= qpos[:, :, None]) & (slots[None, None, :] < kv_lens[:, None, None])
                o = jax.nn.dot_product_attention(q_ext[queries], k, v, mask=mask[:, None])
                out = out.at[queries.reshape(-1)].set(o.reshape((-1,) + o.shape[2:]))
            return out[:-1]

        def layer(p, x, k_cache, v_cache, ix, max_q, shapes):
            def attend(q, k, v):  # the step's keys and values into the cache, then attention over the pages
                kc, vc = k_cache.at[ix["page"], ix["slot"]].set(k), v_cache.at[ix["page"], ix["slot"]].set(v)
                return attention(q, kc, vc, ix, max_q, shapes), (kc, vc)

            x, (k_cache_, v_cache_) = self.block(p, x, ix["cos"], ix["sin"], attend)
            return x, k_cache_, v_cache_

        return jax.jit(layer, static_argnames=("max_q", "shapes"), donate_argnums=(2, 3))

    def _jit_head(self):
        import jax
        import jax.numpy as jnp

        c, temperature = self.config, self.temperature

        def head(w_norm, w_head, x, last, seeds, positions_out):
            logits = self.scores(w_norm, w_head, x[last])
            if temperature > 0:
                u = weights.jax_uniform_noise(seeds, positions_out, c.vocab)
                return jnp.argmax(logits / temperature + gumbel(u), axis=-1), logits
            return jnp.argmax(logits, axis=-1), logits

        return jax.jit(head)

    def compilations(self) -> int:
        """Shapes compiled so far (``run_schedule`` times such steps again)."""
        return self._layer._cache_size() + self._head._cache_size()

    # --- one step ------------------------------------------------------------------

    def _padded(self, step: Step):
        """The step's index arrays, padded to its buckets."""
        import jax.numpy as jnp

        q_lens = np.diff(step.cu_seqlens)
        b_real, t_real = len(q_lens), len(step.tokens)
        t = bucket(t_real)
        pad = t - t_real
        b = self.seq_slots
        if b_real + 1 > b:
            raise ValueError(f"a step of {b_real} sequences: the engine holds at most {b - 1}")
        if pad > self.pages_per_seq * self.page_size:
            raise ValueError(f"a step of {t_real} tokens pads {pad}: more than a sequence's pages hold")
        lens = np.zeros(b, np.int32)
        lens[:b_real] = q_lens
        lens[b_real] = pad
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cached = np.zeros(b, np.int32)
        cached[:b_real] = step.cache_seqlens
        table = np.zeros((b, self.pages_per_seq), np.int32)
        table[:b_real] = step.block_table
        table[b_real] = self.scratch + np.arange(self.pages_per_seq)
        positions = np.concatenate([step.positions, np.arange(pad)]).astype(np.int32)
        seq = np.repeat(np.arange(b), lens)
        kv_lens = cached + lens
        max_q = t  # a bound on every sequence's queries, the padding's included
        groups = [] if self.impl == "bi" else attention_groups(
            q_lens, kv_lens[:b_real], tokens=t, size=lambda n, least: bucket(n, least=least))
        s_real = len(step.sample_rows)
        s = bucket(max(s_real, 1), least=8)
        last = np.zeros(s, np.int32)
        last[:s_real] = step.sample_rows
        seeds = np.zeros(s, np.uint32)
        seeds[:s_real] = step.seeds.astype(np.uint32)
        pos_out = np.zeros(s, np.int32)
        pos_out[:s_real] = step.positions_out
        tokens = np.zeros(t, np.int32)
        tokens[:t_real] = step.tokens
        ix = {"cu": cu, "table": table, "kv_lens": kv_lens.astype(np.int32), "q_lens": lens,
              "page": table[seq, positions // self.page_size], "slot": positions % self.page_size}
        ix = {k: jnp.asarray(v) for k, v in ix.items()}
        ix["groups"] = [(jnp.asarray(g.seqs), jnp.asarray(g.queries)) for g in groups]
        shapes = tuple((g.max_q, g.max_k) for g in groups)
        ix["cos"], ix["sin"] = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        return (jnp.asarray(tokens), ix, max_q, shapes, jnp.asarray(last), jnp.asarray(seeds), jnp.asarray(pos_out),
                s_real)

    def step(self, step: Step, logits: bool = False):
        """Run ``step``; the token sampled at each sample row (a host array)
        and, with ``logits``, the fp32 logits it was sampled from."""
        tokens, ix, max_q, shapes, last, seeds, pos_out, s_real = self._padded(step)
        x = self.w["embed"][tokens]
        for i, p in enumerate(self.layers):
            k_cache, v_cache = self.caches[i]
            x, k_cache, v_cache = self._layer(p, x, k_cache, v_cache, ix, max_q=max_q, shapes=shapes)
            self.caches[i] = (k_cache, v_cache)
        sampled, scores = self._head(self.w["norm"], self.w["head"], x, last, seeds, pos_out)
        out = np.asarray(sampled)[:s_real]
        return (out, np.asarray(scores)[:s_real]) if logits else out

"""Greedy generation with a Llama-shaped JAX decoder, jitted as it is and
under ``bi_jax.batch_invariant`` (part of ``python -m bench --host-cost``).

The decoder is plain JAX (no Flax): RMSNorm, rotary embeddings, grouped-query
attention through ``jax.nn.dot_product_attention`` with a boolean mask over a
fixed KV-cache buffer, a SiLU MLP, weights drawn from a seed. ``generate``
runs one jitted prefill and one jitted decode step per new token from a
Python loop, as a server does; the transform (strict: every reduction on a
bi_ kernel, or an error) rewrites the same functions (products, sums and the
attention call onto the bi_ kernels). Timed: the wall
time of ``generate`` up to its last token on the host, the median of a few
runs after one that compiles.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 4
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 32000
    eps: float = 1e-6
    rope_base: float = 10000.0


# The host-cost Llama of bench.host_cost (transformers), in JAX.
BENCH = Config()


def init(config: Config, seed: int = 0, dtype: str = "bfloat16") -> dict:
    """Weights drawn from ``seed``: normal, scaled by 1/sqrt(fan-in); norms near 1."""
    import jax
    import jax.numpy as jnp

    c = config
    keys = iter(jax.random.split(jax.random.key(seed), 4 + 9 * c.layers))

    def dense(fan_in, fan_out):
        return (jax.random.normal(next(keys), (fan_in, fan_out), jnp.float32) / fan_in ** 0.5).astype(dtype)

    def norm():
        return (1 + 0.1 * jax.random.normal(next(keys), (c.hidden,), jnp.float32)).astype(dtype)

    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    layers = [{"attn_norm": norm(), "wq": dense(c.hidden, q), "wk": dense(c.hidden, kv), "wv": dense(c.hidden, kv),
               "wo": dense(q, c.hidden), "mlp_norm": norm(), "gate": dense(c.hidden, c.intermediate),
               "up": dense(c.hidden, c.intermediate), "down": dense(c.intermediate, c.hidden)}
              for _ in range(c.layers)]
    return {"embed": jax.random.normal(next(keys), (c.vocab, c.hidden), jnp.float32).astype(dtype),
            "layers": layers, "norm": norm(), "head": dense(c.hidden, c.vocab)}


def _rms(x, weight, eps):
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale).astype(x.dtype) * weight


def _rope(x, positions, base):
    """Rotary embedding of (B, L, H, D) at int32 ``positions`` (B, L)."""
    import jax.numpy as jnp

    half = x.shape[-1] // 2
    inv = 1.0 / base ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * inv  # (B, L, 1, half)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def forward(config: Config, params, tokens, caches, start):
    """Logits of the last position and the updated caches: ``tokens`` (B, L)
    at positions ``start .. start + L - 1`` (``start`` may be traced), the
    caches a list of (k, v) buffers (B, T, Hkv, D) per layer."""
    import jax
    import jax.numpy as jnp

    c = config
    b, length = tokens.shape
    capacity = caches[0][0].shape[1]
    positions = start + jnp.arange(length, dtype=jnp.int32)
    # A query at position p sees the keys at 0..p of the buffer.
    mask = (jnp.arange(capacity, dtype=jnp.int32)[None, :] <= positions[:, None])[None, None]
    positions = jnp.broadcast_to(positions, (b, length))
    x = params["embed"][tokens]
    new_caches = []
    for p, (k_cache, v_cache) in zip(params["layers"], caches):
        h = _rms(x, p["attn_norm"], c.eps)
        q = _rope((h @ p["wq"]).reshape(b, length, c.heads, c.head_dim), positions, c.rope_base)
        k = _rope((h @ p["wk"]).reshape(b, length, c.kv_heads, c.head_dim), positions, c.rope_base)
        v = (h @ p["wv"]).reshape(b, length, c.kv_heads, c.head_dim)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, start, 0, 0))
        attn = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask)
        x = x + attn.reshape(b, length, c.heads * c.head_dim) @ p["wo"]
        h = _rms(x, p["mlp_norm"], c.eps)
        x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
        new_caches.append((k_cache, v_cache))
    logits = _rms(x[:, -1], params["norm"], c.eps) @ params["head"]
    return logits, new_caches


def step_fn(config: Config, transform: bool):
    """The jitted step, for the prefill and each decode step alike:
    ``(params, tokens, caches, start) -> (greedy next tokens (B, 1), logits
    (B, V), caches)`` (the caches donated); ``transform``: under
    ``bi_jax.batch_invariant``."""
    import jax
    import jax.numpy as jnp

    def step(params, tokens, caches, start):
        logits, caches = forward(config, params, tokens, caches, start)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], logits, caches

    if transform:
        import bi_jax

        step = bi_jax.batch_invariant(step, strict=True)  # every reduction on a bi_ kernel, or an error
    return jax.jit(step, donate_argnums=(2,))


def generate(config: Config, params, prompts, new_tokens: int, step):
    """Greedy generation: (B, P) int32 prompts -> (tokens (B, new_tokens),
    logits (new_tokens, B, V)); ``step`` from :func:`step_fn`."""
    import jax.numpy as jnp

    b, prompt = prompts.shape
    dtype = params["embed"].dtype
    shape = (b, prompt + new_tokens, config.kv_heads, config.head_dim)
    caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers)]
    token, logits, caches = step(params, prompts, caches, jnp.int32(0))
    tokens, all_logits = [token], [logits]
    for i in range(new_tokens - 1):
        token, logits, caches = step(params, token, caches, jnp.int32(prompt + i))
        tokens.append(token)
        all_logits.append(logits)
    return jnp.concatenate(tokens, axis=1), jnp.stack(all_logits)


def measure(batch: int = 32, prompt: int = 64, new: int = 24, runs: int = 5, config: Config = BENCH) -> list[dict]:
    """Wall time of :func:`generate`, jitted as it is and under the transform."""
    import jax
    import numpy as np

    params = init(config)
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt), 1, config.vocab, dtype=np.int32)
    rows, tokens = [], {}
    for name, transform in (("jit", False), ("jit(batch_invariant)", True)):
        step = step_fn(config, transform)
        times = []
        for i in range(runs + 1):
            start = time.perf_counter()
            out, _ = generate(config, params, prompts, new, step)
            out.block_until_ready()
            if i:  # the first run compiles
                times.append(time.perf_counter() - start)
        tokens[name] = np.asarray(out)
        rows.append({"variant": name, "batch": batch, "prompt": prompt, "new_tokens": new,
                     "ms": statistics.median(times) * 1e3, "spread_ms": (min(times) * 1e3, max(times) * 1e3)})
    rows[1]["ratio"] = rows[1]["ms"] / rows[0]["ms"]
    rows[1]["same_tokens_as_jit"] = bool((tokens["jit"] == tokens["jit(batch_invariant)"]).all())
    return rows

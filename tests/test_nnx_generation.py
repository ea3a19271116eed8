"""A Flax NNX Llama-style decoder generating with a KV cache: a probe prompt
gets the same greedy tokens and the same logits (bits) alone and in batches
of other prompts of other lengths, in any position.

Two ways in: the unmodified model (``lax.dot_general``, ``jnp.mean``,
``jax.nn.dot_product_attention``) under ``bi_jax.batch_invariant(strict=True)``,
and the model built with the hooks (``nnx.Linear(dot_general=bi_jax.dot_general)``,
``bi_jax.rms_norm``, ``bi_jax.dot_product_attention``) under plain ``jax.jit``.

The cache is a fixed buffer of ``SLOTS`` positions per sequence; prompts are
right-padded, each sequence writes its keys at its own positions, and a mask
hides the slots past each query's position, so a sequence's keys sit at the
same positions in any batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests_profile import PROFILE

nnx = pytest.importorskip("flax.nnx")  # optional: not a dependency of the package
jax = pytest.importorskip("jax")
jnp = jax.numpy

import bi_jax  # noqa: E402

GPU = PROFILE.native
# GPU: Llama-shaped width; CPU: the smallest head dim the kernels take.
VOCAB, DIM, HEADS, KV_HEADS, HIDDEN, LAYERS = (32000, 2048, 16, 8, 5632, 2) if GPU else (64, 128, 2, 1, 96, 1)
HEAD_DIM = DIM // HEADS
SLOTS = 64 if GPU else 16
NEW = 4 if GPU else 3
DTYPE = jnp.bfloat16 if GPU else jnp.float32
PROBE = [5, 17, 3, 40, 9]
OTHERS = [[7, 1, 2], [11, 12, 13, 14, 15, 16, 18], [21], [30, 31, 32, 33, 34, 35, 36, 37, 38]]


def _rms(x, w, hooks):
    if hooks:
        return bi_jax.rms_norm(x, w, 1e-6)
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * w).astype(x.dtype)


def _rope(x, positions):
    """Rotate-half RoPE of (B, T, N, D) at integer positions (B, T): elementwise only."""
    half = x.shape[-1] // 2
    inv = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float32) / half))
    angle = positions[..., None, None].astype(jnp.float32) * jnp.asarray(inv)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, hooks: bool, rngs: nnx.Rngs):
        dot = bi_jax.dot_general if hooks else jax.lax.dot_general

        def lin(i, o):
            return nnx.Linear(i, o, use_bias=False, dot_general=dot, param_dtype=DTYPE, dtype=DTYPE, rngs=rngs)

        self.hooks = hooks
        self.wq, self.wk, self.wv = lin(DIM, DIM), lin(DIM, KV_HEADS * HEAD_DIM), lin(DIM, KV_HEADS * HEAD_DIM)
        self.wo = lin(DIM, DIM)
        self.w1, self.w3, self.w2 = lin(DIM, HIDDEN), lin(DIM, HIDDEN), lin(HIDDEN, DIM)
        self.norm1 = nnx.Param(jnp.ones(DIM, DTYPE))
        self.norm2 = nnx.Param(jnp.ones(DIM, DTYPE))

    def __call__(self, x, k_cache, v_cache, positions):
        b, t, _ = x.shape
        h = _rms(x, self.norm1[...], self.hooks)
        q = _rope(self.wq(h).reshape(b, t, HEADS, HEAD_DIM), positions)
        k = _rope(self.wk(h).reshape(b, t, KV_HEADS, HEAD_DIM), positions)
        v = self.wv(h).reshape(b, t, KV_HEADS, HEAD_DIM)
        rows = jnp.arange(b)[:, None]
        k_cache = k_cache.at[rows, positions].set(k)
        v_cache = v_cache.at[rows, positions].set(v)
        # A query sees the keys up to its own position: causal within the
        # prompt, and no slot past what its sequence has written.
        mask = (jnp.arange(SLOTS)[None, None, :] <= positions[:, :, None])[:, None]
        attend = bi_jax.dot_product_attention if self.hooks else jax.nn.dot_product_attention
        a = attend(q, k_cache, v_cache, mask=mask).reshape(b, t, DIM)
        x = x + self.wo(a)
        h = _rms(x, self.norm2[...], self.hooks)
        return x + self.w2(jax.nn.silu(self.w1(h)) * self.w3(h)), k_cache, v_cache


class Llama(nnx.Module):
    def __init__(self, hooks: bool, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.hooks = hooks
        self.embed = nnx.Embed(VOCAB, DIM, param_dtype=DTYPE, dtype=DTYPE, rngs=rngs)
        self.blocks = nnx.List([Block(hooks, rngs) for _ in range(LAYERS)])
        self.norm = nnx.Param(jnp.ones(DIM, DTYPE))
        self.head = nnx.Linear(DIM, VOCAB, use_bias=False, param_dtype=DTYPE, dtype=DTYPE, rngs=rngs,
                               dot_general=bi_jax.dot_general if hooks else jax.lax.dot_general)

    def __call__(self, tokens, caches, positions):
        x = self.embed(tokens)
        new = []
        for block, (k_cache, v_cache) in zip(self.blocks, caches):
            x, k_cache, v_cache = block(x, k_cache, v_cache, positions)
            new.append((k_cache, v_cache))
        return self.head(_rms(x, self.norm[...], self.hooks)).astype(jnp.float32), new


def _step_fn(hooks: bool):
    """A pure (state, tokens, caches, positions) -> (logits, caches) step:
    the unmodified model under the transform, or the hooked one jitted."""
    graphdef, state = nnx.split(Llama(hooks))

    def step(state, tokens, caches, positions):
        return nnx.merge(graphdef, state)(tokens, caches, positions)

    return state, (jax.jit(step) if hooks else bi_jax.batch_invariant(step, strict=True))


def _generate(step, state, prompts):
    """Greedy decoding of NEW tokens per prompt: (tokens (B, NEW), logits (B, NEW, VOCAB))."""
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    width = int(lens.max())
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    caches = [(jnp.zeros((b, SLOTS, KV_HEADS, HEAD_DIM), DTYPE),) * 2 for _ in range(LAYERS)]
    logits, caches = step(state, jnp.asarray(tokens), caches, jnp.asarray(np.tile(np.arange(width), (b, 1))))
    last = np.asarray(logits)[np.arange(b), lens - 1]
    out_tokens, out_logits = [last.argmax(-1)], [last]
    for i in range(NEW - 1):
        positions = jnp.asarray((lens + i)[:, None])
        logits, caches = step(state, jnp.asarray(out_tokens[-1][:, None].astype(np.int32)), caches, positions)
        last = np.asarray(logits)[:, 0]
        out_tokens.append(last.argmax(-1))
        out_logits.append(last)
    return np.stack(out_tokens, 1), np.stack(out_logits, 1)


@pytest.fixture(scope="module", params=["transform", "hooks"])
def model(request):
    return _step_fn(request.param == "hooks")


@settings(max_examples=6 if GPU else 2, deadline=None, database=None)
@given(others=st.lists(st.sampled_from(range(len(OTHERS))), unique=True, min_size=1, max_size=3),
       at=st.integers(0, 3))
def test_invariance_nnx_generation_with_a_kv_cache(model, others, at):
    state, step = model
    prompts = [OTHERS[i] for i in others]
    at = min(at, len(prompts))
    prompts.insert(at, PROBE)
    alone_tokens, alone_logits = _generate(step, state, [PROBE])
    tokens, logits = _generate(step, state, prompts)
    assert np.array_equal(tokens[at], alone_tokens[0]), f"the probe's tokens changed in the batch {prompts}"
    assert np.array_equal(logits[at].view(np.int32), alone_logits[0].view(np.int32)), (
        f"the probe's logits changed in the batch {prompts}: max |diff| "
        f"{np.abs(logits[at] - alone_logits[0]).max():.3g}")


def test_the_transform_runs_the_models_products_and_attention_on_the_bi_kernels():
    """Under the transform every product, norm and attention of the unmodified
    model is a bi_ kernel (strict mode refuses anything else); the counters
    show them."""
    state, step = _step_fn(hooks=False)
    _generate(step, state, [PROBE])
    # Per trace (each call traces): 7 products a layer and the head, 2 norms a
    # layer and the last (their mean square), one attention a layer.
    handled = dict(step.handled)
    assert handled["dot_general"] >= 7 * LAYERS + 1, handled
    assert handled["reduce_sum"] >= 2 * LAYERS + 1, handled
    assert handled["bi_attention"] >= LAYERS, handled
    assert not any(step.unhandled.values()), dict(step.unhandled)


def test_negative_control_the_default_model_varies_with_the_batch():
    """The unmodified model under plain ``jax.jit`` (XLA's kernels): the probe's
    logits change in at least one batch, so the property above can fail. On
    the 2-core CPU, XLA's products changed the probe's logits behind three
    other prompts."""
    graphdef, state = nnx.split(Llama(hooks=False))
    step = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    _, alone = _generate(step, state, [PROBE])
    runs = [_generate(step, state, [OTHERS[i] for i in others] + [PROBE])[1][-1]
            for others in ([1, 3], [3, 2, 1], [0, 1, 2, 3])]
    assert any(not np.array_equal(r.view(np.int32), alone[0].view(np.int32)) for r in runs), \
        "the default model no longer varies with the batch here: the control cannot show a failure"

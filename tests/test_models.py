"""A small Llama-style block in each framework, run unmodified through the
drop-in mode (torch) and the transform (JAX): a sequence's outputs must have
the same bits whatever batch it is computed in. On the GPU a negative control
shows that the framework defaults do not guarantee that.

Block: embedding, RMSNorm, causal attention written as matmul + softmax,
SwiGLU MLP, RMSNorm, logits and log_softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests_profile import PROFILE

# On the GPU, products of width 4096: the defaults change kernels between the
# token counts of the batches below (cuBLAS and XLA at M <= 64 on an H100).
VOCAB, DIM, HEADS, HIDDEN, SEQ = (4096, 4096, 32, 4096, 4) if PROFILE.native else (64, 32, 2, 48, 6)
SEQUENCES, BATCH, POSITION = 16, 6, 3  # the probe sequence sits at POSITION of a batch of BATCH
# Batches that hold the probe sequence, as (first, stop) sequence indices: the
# full batch, the sequence alone, with one neighbour; the controls add every
# batch that starts at sequence 0 and holds the probe.
BATCHES = [(0, BATCH), (POSITION, POSITION + 1), (POSITION - 1, POSITION + 1)]
CONTROL_BATCHES = BATCHES + [(0, b) for b in range(POSITION + 1, SEQUENCES + 1) if b != BATCH]


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"embed": (VOCAB, DIM), "wq": (DIM, DIM), "wk": (DIM, DIM), "wv": (DIM, DIM), "wo": (DIM, DIM),
              "w1": (HIDDEN, DIM), "w3": (HIDDEN, DIM), "w2": (DIM, HIDDEN), "out": (VOCAB, DIM)}
    w = {k: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for k, s in shapes.items()}
    w["norm1"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
    w["norm2"] = (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
    return w


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(SEQUENCES, SEQ))


# --- torch ------------------------------------------------------------------


def _torch_block(w, tokens):
    import torch
    import torch.nn.functional as F

    b, t = tokens.shape
    x = F.embedding(tokens, w["embed"])
    h = F.rms_norm(x, (DIM,), w["norm1"], 1e-6)
    q, k, v = (F.linear(h, w[n]).view(b, t, HEADS, DIM // HEADS).transpose(1, 2) for n in ("wq", "wk", "wv"))
    scores = torch.matmul(q, k.transpose(-1, -2)) / (DIM // HEADS) ** 0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
    attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    x = x + F.linear(torch.matmul(attn, v).transpose(1, 2).reshape(b, t, DIM), w["wo"])
    h = F.rms_norm(x, (DIM,), w["norm2"], 1e-6)
    x = x + F.linear(F.silu(F.linear(h, w["w1"])) * F.linear(h, w["w3"]), w["w2"])
    return torch.log_softmax(F.linear(x, w["out"]), dim=-1)


def _torch_inputs(dtype):
    import torch

    device = "cuda" if PROFILE.native else "cpu"
    w = {k: torch.from_numpy(v).to(device, dtype) for k, v in _weights().items()}
    return w, torch.from_numpy(_tokens()).to(device)


def _orders(batches):
    """(first, stop) slices as lists of sequence indices."""
    return [list(range(a, b)) for a, b in batches]


def _torch_run(dtype, mode: bool, batches=BATCHES, orders=None):
    """The probe sequence's log-probs from each batch (slices, or explicit
    orders of sequence indices)."""
    import torch

    import bi_torch

    w, tokens = _torch_inputs(dtype)
    with torch.no_grad(), bi_torch.set_batch_invariant_mode(mode, strict=mode):
        return [_torch_block(w, tokens[torch.tensor(o, device=tokens.device)])[o.index(POSITION)]
                for o in orders or _orders(batches)]


def _same(a, b) -> bool:
    import torch

    ints = torch.int32 if a.element_size() == 4 else torch.int16
    return bool(torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_block_is_batch_invariant_in_the_mode(dtype):
    import torch

    full, *others = _torch_run(getattr(torch, dtype), mode=True)
    assert all(_same(full, o) for o in others), "a sequence's log-probs changed with its batch"


@pytest.mark.gpu
def test_torch_block_varies_without_the_mode():
    """Negative control: cuBLAS and torch's reductions are free to change with
    the batch, and for this block at least one batch composition shows it."""
    import torch

    full, *others = _torch_run(torch.bfloat16, mode=False, batches=CONTROL_BATCHES)
    assert not all(_same(full, o) for o in others)


# --- JAX --------------------------------------------------------------------


def _jax_block(w, tokens):
    import jax
    import jax.numpy as jnp

    def rms(x, g):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g

    b, t = tokens.shape
    x = w["embed"][tokens]
    h = rms(x, w["norm1"])
    q, k, v = ((h @ w[n].T).reshape(b, t, HEADS, DIM // HEADS).transpose(0, 2, 1, 3) for n in ("wq", "wk", "wv"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / (DIM // HEADS) ** 0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    attn = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    x = x + jnp.einsum("bhqk,bhkd->bqhd", attn, v).reshape(b, t, DIM) @ w["wo"].T
    h = rms(x, w["norm2"])
    x = x + (jax.nn.silu(h @ w["w1"].T) * (h @ w["w3"].T)) @ w["w2"].T
    return jax.nn.log_softmax(x @ w["out"].T, axis=-1)


def _jax_run(dtype, transform: bool, batches=BATCHES, orders=None):
    import jax.numpy as jnp

    import bi_jax

    w = {k: jnp.asarray(v, dtype) for k, v in _weights().items()}
    tokens = jnp.asarray(_tokens())
    f = bi_jax.batch_invariant(_jax_block, strict=True) if transform else _jax_block
    rows = [np.asarray(f(w, tokens[jnp.asarray(o)])[o.index(POSITION)]) for o in orders or _orders(batches)]
    return [r.view(np.int32 if r.dtype.itemsize == 4 else np.int16) for r in rows]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_block_is_batch_invariant_under_the_transform(dtype):
    full, *others = _jax_run(dtype, transform=True)
    assert all(np.array_equal(full, o) for o in others), "a sequence's log-probs changed with its batch"


@pytest.mark.gpu
def test_jax_block_varies_without_the_transform():
    full, *others = _jax_run("bfloat16", transform=False, batches=CONTROL_BATCHES)
    assert not all(np.array_equal(full, o) for o in others)


@st.composite
def _compositions(draw):
    """A batch that holds the probe sequence: other sequences, any number up to
    BATCH + 2 in any order, with the probe at any position."""
    others = draw(st.lists(st.sampled_from([i for i in range(SEQUENCES) if i != POSITION]), unique=True,
                           max_size=BATCH + 2))
    at = draw(st.integers(0, len(others)))
    return others[:at] + [POSITION] + others[at:]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@settings(max_examples=8 if PROFILE.native else 2, database=None)
@given(order=_compositions())
def test_block_is_batch_invariant_for_random_compositions(framework, order):
    """fp32, where a changed order shows: the probe's log-probs in a random
    batch have the bits they have alone."""
    if framework == "torch":
        import torch

        alone, other = (r.cpu().numpy().view(np.int32) for r in _torch_run(torch.float32, True, orders=[[POSITION], order]))
    else:
        alone, other = _jax_run("float32", transform=True, orders=[[POSITION], order])
    assert np.array_equal(alone, other), f"the probe's log-probs changed in the batch {order}"


def _flax_bits(a):
    return np.asarray(a).view(np.int32)


def test_flax_layers_take_the_bi_products():
    """``nnx.Linear(dot_general=)``, ``nnx.Einsum(einsum_op=)`` and
    ``linen.Dense(dot_general=)`` with the bi_ kernels: the products of the
    kernels, and a row's bits independent of its batch."""
    pytest.importorskip("flax")  # optional: not a dependency of the package
    import jax
    import jax.numpy as jnp
    from flax import linen, nnx

    import bi_jax

    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 16)), jnp.float32)
    linear = nnx.Linear(16, 8, dot_general=bi_jax.dot_general, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_flax_bits(linear(x)),
                                  _flax_bits(bi_jax.matmul(x, linear.kernel[...]) + linear.bias[...]))
    einsum = nnx.Einsum("bi,io->bo", (16, 8), (8,), einsum_op=bi_jax.einsum, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_flax_bits(einsum(x)),
                                  _flax_bits(bi_jax.matmul(x, einsum.kernel[...]) + einsum.bias[...]))
    dense = linen.Dense(8, dot_general=bi_jax.dot_general)
    params = dense.init(jax.random.key(2), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    np.testing.assert_array_equal(_flax_bits(dense.apply(params, x)), _flax_bits(bi_jax.matmul(x, kernel) + bias))
    for layer in (linear, einsum, lambda v: dense.apply(params, v)):
        assert np.array_equal(_flax_bits(layer(x)[1:3]), _flax_bits(layer(x[1:3])))

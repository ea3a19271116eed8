"""One training step on the engine's own samples: what on-policy RL needs.

The serving engine (``bench/e2e/torch_engine.py``, the bi_ kernels) generates
under continuous batching and records the fp32 logits each token was
sampled from. The training forward runs the same model over each whole
sequence (prompt and completion) at once, with the same code
(``TorchEngine.hidden``) but dense causal attention (``bi_torch.attention``)
instead of the paged cache, under autograd; its loss is the negative sum of
the completions' log-probabilities. On-policy means: the training forward's
logits of every generated position are the sampler's, bit for bit (so are
the log-probabilities computed from them), and the step's gradients are the
same bits on every run.

The JAX twin (``jax_step``) runs ``JaxEngine.block`` over each sequence with
dense causal ``bi_jax.attention``, one jitted layer function under
``jax.vjp``, the gradients of the sequences added in order.

The embedding table is trained too: its gradient is ``embedding``'s ordered
sum over the tokens (``bi_torch.embedding``, ``bi_jax.embedding``), not a
scatter-add with atomics.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def _trainable(engine):
    """The engine's weights as leaves that require grad, for the block; its
    own weights after."""
    saved = engine.w
    engine.w = {n: t.detach().clone().requires_grad_() for n, t in saved.items()}
    try:
        yield engine.w
    finally:
        engine.w = saved


def torch_step(engine, sequences) -> dict:
    """``sequences``: (tokens, prompt length) pairs, the tokens a prompt and
    its completion. Returns per sequence the fp32 logits of the generated
    positions and the log-probabilities of the generated tokens, and the
    gradient of every trained weight."""
    import torch

    import bi_torch

    if engine.impl != "bi":
        raise ValueError(f"the training step runs the bi_ kernels; the engine's impl is {engine.impl!r}")

    def dense(i, q, k, v):  # the whole sequence at once, causal
        return bi_torch.attention(q[None], k[None], v[None], causal=True)[0]

    logits, logprobs = [], []
    with _trainable(engine) as params:
        loss = None
        for tokens, prompt in sequences:
            tok = torch.as_tensor(np.asarray(tokens), device=engine.device, dtype=torch.long)
            positions = torch.arange(tok.shape[0], device=engine.device)
            x = engine.hidden(tok, positions, dense)
            scores = engine.scores(x[prompt - 1:tok.shape[0] - 1])  # the positions that sampled the completion
            chosen = bi_torch.log_softmax(scores, -1).gather(-1, tok[prompt:, None])[:, 0]
            logits.append(scores.detach().cpu().numpy())
            logprobs.append(chosen.detach().cpu().numpy())
            term = -bi_torch.sum(chosen)
            loss = term if loss is None else loss + term
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    return {"logits": logits, "logprobs": logprobs, "grads": grads}


def sampler_logprobs(engine, logits: np.ndarray, tokens) -> np.ndarray:
    """The log-probabilities of ``tokens`` under the sampler's fp32 logits,
    by the same bi_ log_softmax, on the engine's device."""
    import torch

    import bi_torch

    with torch.no_grad():
        lp = bi_torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits)).to(engine.device), -1)
        index = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=engine.device)
        return lp.gather(-1, index[:, None])[:, 0].cpu().numpy()


def jax_step(engine, sequences) -> dict:
    """``torch_step`` for the JAX engine: per sequence the fp32 logits of the
    generated positions and the generated tokens' log-probabilities, and the
    gradients of every weight (numpy arrays)."""
    import jax
    import jax.numpy as jnp

    import bi_jax

    if engine.impl != "bi":
        raise ValueError(f"the training step runs the bi_ kernels; the engine's impl is {engine.impl!r}")
    c = engine.config

    def dense(q, k, v):
        return bi_jax.attention(q[None], k[None], v[None], causal=True)[0], None

    @jax.jit
    def layer(p, x, cos, sin):
        return engine.block(p, x, cos, sin, dense)[0]

    def loss(params, tokens, prompt):
        x = bi_jax.embedding(tokens, params["embed"])
        positions = jnp.arange(tokens.shape[0])
        cos, sin = engine.cos[positions][:, None, :], engine.sin[positions][:, None, :]
        for i in range(c.layers):
            x = layer({k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}.")}, x, cos, sin)
        scores = engine.scores(params["norm"], params["head"], x[prompt - 1:tokens.shape[0] - 1])
        chosen = jnp.take_along_axis(bi_jax.log_softmax(scores, -1), tokens[prompt:, None], axis=-1)[:, 0]
        return -bi_jax.sum(chosen), (scores, chosen)

    params = dict(engine.w)
    total, logits, logprobs = None, [], []
    for tokens, prompt in sequences:
        (_, (scores, chosen)), grads = jax.value_and_grad(loss, has_aux=True)(params, jnp.asarray(tokens), prompt)
        logits.append(np.asarray(scores))
        logprobs.append(np.asarray(chosen))
        total = grads if total is None else jax.tree_util.tree_map(jnp.add, total, grads)
    return {"logits": logits, "logprobs": logprobs, "grads": {n: np.asarray(g) for n, g in total.items()}}

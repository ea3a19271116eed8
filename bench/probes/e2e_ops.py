"""Which of the serving engines' elementwise parts round alike in torch and
JAX: RoPE, SiLU(gate) * up, the Gumbel noise, the bf16 residual add, each on
the same inputs at the engines' shapes (torch eager, JAX jitted as in the
engine, where XLA fuses them), with the bi_ products and norm beside them
for reference. One JSON line per op: elements that differ, the largest
difference::

    python -m bench.probes.e2e_ops [--out DIR] [--tokens N] [--tiny]
"""

from __future__ import annotations

import os

# Both frameworks in one process: JAX must not take 75 % of the GPU's
# memory at start (an 8B model in each, torch's ran out of memory).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import bi_jax
import bi_torch
from bench.e2e import jax_engine, torch_engine
from bench.e2e.config import LLAMA3_8B, TINY, rope_tables
from bench.probes._log import jsonl_emitter


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.e2e_ops", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="the CPU model's widths")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "e2e_ops")
    c = TINY if args.tiny else LLAMA3_8B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    t = args.tokens

    def both(a: np.ndarray, dtype):
        """The same values in both frameworks (``dtype``: 'bfloat16' or 'float32')."""
        j = jnp.asarray(a, dtype=getattr(jnp, dtype))
        host = np.asarray(j.astype(jnp.float32))
        return torch.from_numpy(host).to(device, getattr(torch, dtype)), j

    def compare(name, got_torch, got_jax, **extra):
        a = got_torch.float().cpu().numpy()
        b = np.asarray(jnp.asarray(got_jax).astype(jnp.float32))
        differ = int((a != b).sum())
        emit({"op": name, "shape": list(a.shape), "elements": int(a.size), "differ": differ,
              "max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0, **extra})

    cos, sin = rope_tables(c)
    positions = rng.integers(0, c.max_positions, t)
    cos_t, cos_j = both(cos[positions][:, None, :], "float32")
    sin_t, sin_j = both(sin[positions][:, None, :], "float32")
    x_t, x_j = both(rng.standard_normal((t, c.heads, c.head_dim)), "bfloat16")
    compare("rope", torch_engine.rope(x_t, cos_t, sin_t), jax.jit(jax_engine.rope)(x_j, cos_j, sin_j))

    gu_t, gu_j = both(rng.standard_normal((t, 2 * c.intermediate)) * 2, "bfloat16")
    compare("silu(gate) * up", torch_engine.mlp_activation(gu_t, c.intermediate),
            jax.jit(jax_engine.mlp_activation, static_argnums=1)(gu_j, c.intermediate))
    compare("bi silu_and_mul", bi_torch.silu_and_mul(gu_t), jax.jit(bi_jax.silu_and_mul)(gu_j))

    u = (rng.integers(0, 2**24, (8, c.vocab)) + 0.5) * 2.0**-24
    u_t, u_j = both(u, "float32")
    compare("gumbel", torch_engine.gumbel(u_t), jax.jit(jax_engine.gumbel)(u_j))

    a_t, a_j = both(rng.standard_normal((t, c.hidden)), "bfloat16")
    b_t, b_j = both(rng.standard_normal((t, c.hidden)), "bfloat16")
    compare("residual add (bf16)", a_t + b_t, jax.jit(lambda a, b: a + b)(a_j, b_j))

    w_t, w_j = both(rng.standard_normal((c.hidden, c.qkv_width)) / np.sqrt(c.hidden), "bfloat16")
    compare("bi matmul (reference)", bi_torch.matmul(a_t, w_t), jax.jit(bi_jax.matmul)(a_j, w_j))
    n_t, n_j = both(1 + 0.1 * rng.standard_normal(c.hidden), "bfloat16")
    compare("bi rms_norm (reference)", bi_torch.rms_norm(a_t, n_t, c.eps),
            jax.jit(lambda x, w: bi_jax.rms_norm(x, w, eps=c.eps))(a_j, n_j))


if __name__ == "__main__":
    main()

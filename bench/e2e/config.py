"""The model of the end-to-end runs: Llama-shaped, weights from a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int = 4096
    eps: float = 1e-5
    rope_base: float = 500000.0

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


# Llama-3-8B's shapes (the GPU default) and a tiny width for the CPU interpreters.
LLAMA3_8B = ModelConfig(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                        vocab=128256)
TINY = ModelConfig(hidden=128, intermediate=192, layers=2, heads=2, kv_heads=1, head_dim=64, vocab=256,
                   max_positions=256)


def weight_specs(config: ModelConfig):
    """(name, shape, scale, offset) of every weight, in the order their
    seed indices follow. Projections are stored (in, out), fused: q, k and v
    in one, the gate and up projections in one."""
    c = config
    specs = [("embed", (c.vocab, c.hidden), 1.0, 0.0)]
    for i in range(c.layers):
        specs += [
            (f"{i}.attn_norm", (c.hidden,), 0.1, 1.0),
            (f"{i}.qkv", (c.hidden, c.qkv_width), math.sqrt(3.0 / c.hidden), 0.0),
            (f"{i}.o", (c.heads * c.head_dim, c.hidden), math.sqrt(3.0 / (c.heads * c.head_dim)), 0.0),
            (f"{i}.mlp_norm", (c.hidden,), 0.1, 1.0),
            (f"{i}.gate_up", (c.hidden, 2 * c.intermediate), math.sqrt(3.0 / c.hidden), 0.0),
            (f"{i}.down", (c.intermediate, c.hidden), math.sqrt(3.0 / c.intermediate), 0.0),
        ]
    specs += [("norm", (c.hidden,), 0.1, 1.0), ("head", (c.hidden, c.vocab), math.sqrt(3.0 / c.hidden), 0.0)]
    return specs


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max_positions, head_dim / 2), fp32, computed once in
    float64 on the host: both frameworks gather the same bits."""
    half = config.head_dim // 2
    inv = 1.0 / config.rope_base ** (np.arange(half, dtype=np.float64) / half)
    angle = np.arange(config.max_positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

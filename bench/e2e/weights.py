"""Weights drawn from a seed, bit for bit the same in torch and JAX.

Element ``i`` of tensor number ``t`` is a function of ``(seed, t, i)`` alone: a
32-bit integer hash (integer arithmetic, exact in both frameworks) gives 24
uniform bits ``u``; the value is ``offset + (2 u - 1) * scale``, each step one
correctly rounded fp32 operation, then rounded once to the model's dtype.
Uniform values (standard deviation ``scale / sqrt(3)``) rather than normal
ones: Box-Muller's ``log`` and ``cos`` round differently in the two
frameworks. Generated on the device, in chunks.
"""

from __future__ import annotations

import math

_MASK = 0xFFFFFFFF
_CHUNK = 1 << 26  # elements hashed at once (int64 temporaries of 512 MB in torch)


def _mix(x, shift_right, const, mask):
    """The murmur3 finaliser on 32-bit unsigned values held in ``x``."""
    x = x ^ shift_right(x, 16)
    x = mask(x * const(0x85EBCA6B))
    x = x ^ shift_right(x, 13)
    x = mask(x * const(0xC2B2AE35))
    return x ^ shift_right(x, 16)


def uniform_scale(fan_in: int) -> float:
    """The scale of a weight with ``fan_in`` inputs: standard deviation
    ``1 / sqrt(fan_in)``."""
    return math.sqrt(3.0 / fan_in)


def torch_tensor(shape, seed: int, index: int, scale: float, dtype, device, offset: float = 0.0):
    """``offset + (2 u - 1) * scale`` of tensor ``index``, in torch."""
    import torch

    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=device)
    key = (seed * 0x9E3779B1 + index * 0x632BE5AB) & _MASK
    for start in range(0, n, _CHUNK):
        i = torch.arange(start, min(n, start + _CHUNK), dtype=torch.int64, device=device)
        x = (i ^ key) & _MASK
        x = _mix(x, lambda v, s: v >> s, int, lambda v: v & _MASK)
        x = _mix((x + index) & _MASK, lambda v, s: v >> s, int, lambda v: v & _MASK)
        u = (x >> 8).to(torch.float32) * (2.0 ** -24)
        out[start:start + len(i)] = ((u * 2.0 - 1.0) * scale + offset).to(dtype)
    return out.view(shape)


def jax_tensor(shape, seed: int, index: int, scale: float, dtype, offset: float = 0.0):
    """The same values in JAX (uint32 arithmetic wraps as the masks above do)."""
    import jax.numpy as jnp
    import numpy as np

    n = math.prod(shape)
    key = np.uint32((seed * 0x9E3779B1 + index * 0x632BE5AB) & _MASK)
    parts = []
    for start in range(0, n, _CHUNK):
        i = jnp.arange(start, min(n, start + _CHUNK), dtype=jnp.uint32)
        x = i ^ key
        x = _mix(x, lambda v, s: v >> np.uint32(s), np.uint32, lambda v: v)
        x = _mix(x + np.uint32(index), lambda v, s: v >> np.uint32(s), np.uint32, lambda v: v)
        u = (x >> np.uint32(8)).astype(jnp.float32) * np.float32(2.0 ** -24)
        parts.append(((u * np.float32(2.0) - np.float32(1.0)) * np.float32(scale) + np.float32(offset)).astype(dtype))
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts)).reshape(shape)


def torch_uniform_noise(seeds, positions, width: int):
    """(B, width) fp32 uniforms in (0, 1) for sampling: a function of each
    row's request seed and position and of the column alone (so of nothing
    that the batch decides)."""
    import torch

    col = torch.arange(width, dtype=torch.int64, device=seeds.device)[None, :]
    x = ((seeds[:, None] * 0x9E3779B1 + positions[:, None].to(torch.int64) * 0x632BE5AB) & _MASK) ^ col
    x = _mix(x & _MASK, lambda v, s: v >> s, int, lambda v: v & _MASK)
    x = _mix((x + (seeds[:, None] & 0xFFFF)) & _MASK, lambda v, s: v >> s, int, lambda v: v & _MASK)
    return ((x >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def jax_uniform_noise(seeds, positions, width: int):
    """The same uniforms in JAX (``seeds`` uint32 of the low 32 bits)."""
    import jax.numpy as jnp
    import numpy as np

    col = jnp.arange(width, dtype=jnp.uint32)[None, :]
    x = (seeds[:, None] * np.uint32(0x9E3779B1) + positions[:, None].astype(jnp.uint32) * np.uint32(0x632BE5AB)) ^ col
    x = _mix(x, lambda v, s: v >> np.uint32(s), np.uint32, lambda v: v)
    x = _mix(x + (seeds[:, None] & np.uint32(0xFFFF)), lambda v, s: v >> np.uint32(s), np.uint32, lambda v: v)
    return ((x >> np.uint32(8)).astype(jnp.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)

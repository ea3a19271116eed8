"""Framework adapters. ``adapter(name)`` returns the torch or jax adapter."""

from __future__ import annotations

from functools import lru_cache

from harness.frameworks.base import Adapter

FRAMEWORKS = ("torch", "jax")


@lru_cache(maxsize=None)
def adapter(name: str) -> Adapter:
    if name == "torch":
        from harness.frameworks.torch_adapter import TorchAdapter

        return TorchAdapter()
    if name == "jax":
        from harness.frameworks.jax_adapter import JaxAdapter

        return JaxAdapter()
    raise ValueError(f"unknown framework {name!r}; expected one of {FRAMEWORKS}")


__all__ = ["Adapter", "FRAMEWORKS", "adapter"]

"""Framework adapters. ``adapter(name)`` returns the torch or jax adapter."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from harness.frameworks.base import Adapter, ArrayOps

FRAMEWORKS = ("torch", "jax")
# The packages each framework's kernels need.
_NEEDS = {"torch": ("torch", "triton"), "jax": ("jax", "jaxlib")}


def installed() -> tuple[str, ...]:
    """The frameworks whose packages are installed, in ``FRAMEWORKS`` order."""
    return tuple(fw for fw in FRAMEWORKS if all(importlib.util.find_spec(p) for p in _NEEDS[fw]))


@lru_cache(maxsize=None)
def adapter(name: str) -> Adapter:
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; expected one of {', '.join(FRAMEWORKS)}")
    if name not in installed():
        raise ModuleNotFoundError(
            f"framework {name!r} is not installed: pip install 'batch-invariant-kernels[{name}]'"
        )
    if name == "torch":
        from harness.frameworks.torch_adapter import TorchAdapter

        return TorchAdapter()
    from harness.frameworks.jax_adapter import JaxAdapter

    return JaxAdapter()


__all__ = ["Adapter", "ArrayOps", "FRAMEWORKS", "adapter", "installed"]

"""The interface every framework adapter implements."""

from __future__ import annotations

import abc
from typing import Any, Callable

import numpy as np

from harness.registry import Inputs, OpSpec

Fn = Callable[..., Any]


class Adapter(abc.ABC):
    name: str
    package: str  # the bi_ package: "bi_torch" or "bi_jax"

    @abc.abstractmethod
    def to_native(self, a: np.ndarray) -> Any:
        """numpy array (ml_dtypes bf16 allowed) -> framework array on the test device."""

    @abc.abstractmethod
    def to_numpy(self, t: Any) -> np.ndarray:
        """framework array -> numpy array with the same dtype and bits."""

    @abc.abstractmethod
    def take_rows(self, t: Any, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of ``t`` as the framework slices them (a view in torch)."""

    @abc.abstractmethod
    def default(self, op: str) -> Fn | None:
        """The framework's own implementation of ``op`` (the benchmark baseline)."""

    controls: dict[tuple[str, str], Fn] = {}

    def control(self, op: str, name: str) -> Fn:
        """A negative control: an implementation of ``op`` known to vary with the batch.

        ``"default"`` is the framework's own implementation (cuBLAS or XLA on a GPU).
        """
        if name == "default":
            fn = self.default(op)
            if fn is None:
                raise KeyError(f"{self.name} has no default {op}")
            return fn
        return self.controls[(op, name)]

    @abc.abstractmethod
    def bitwise_equal(self, a: Any, b: Any) -> bool:
        """Whether two arrays on the device have the same dtype, shape and bits."""

    @abc.abstractmethod
    def count_differing_rows(self, a: Any, b: Any) -> int:
        """How many rows (axis 0) of two same-shaped device arrays differ in any bit."""

    @abc.abstractmethod
    def synchronize(self, t: Any) -> None:
        """Block until ``t`` is computed."""

    def kernel(self, op: str) -> Fn | None:
        """The bi_ implementation of ``op``, or None if this framework has none yet."""
        import importlib

        from harness import registry

        return getattr(importlib.import_module(self.package), registry.get(op).function_name, None)

    def call(self, fn: Fn, spec: OpSpec, inputs: dict[str, Any]) -> np.ndarray:
        out = fn(**inputs, **spec.call_kwargs(self.name))
        self.synchronize(out)
        return self.to_numpy(out)

    def natives(self, inputs: Inputs) -> dict[str, Any]:
        return {k: self.to_native(v) for k, v in inputs.items()}

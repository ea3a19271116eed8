"""The interface every framework adapter implements.

An adapter knows a framework, not an op: how to move arrays in and out, slice
rows, compare bits and synchronise, and a small array namespace
(``ArrayOps``) from which the specs build their negative controls once for
every framework. What an op's kernel, default and controls are comes from its
spec (``harness.opspec.OpSpec``).
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Callable

import numpy as np

from harness.opspec import Inputs, OpSpec

Fn = Callable[..., Any]


class ArrayOps(abc.ABC):
    """The array functions the specs' negative controls are written with."""

    @abc.abstractmethod
    def f32(self, x): """``x`` converted to float32."""

    @abc.abstractmethod
    def cast(self, y, like): """``y`` converted to the dtype of ``like``."""

    @abc.abstractmethod
    def split(self, x, sections: int, axis: int) -> list: """``numpy.array_split``."""

    @abc.abstractmethod
    def sum(self, x, axis: int, keepdims: bool = False): """The framework's own sum."""

    @abc.abstractmethod
    def amax(self, x, axis: int, keepdims: bool = False): """The maximum along ``axis``."""

    @abc.abstractmethod
    def exp(self, x): """Elementwise exponential."""

    @abc.abstractmethod
    def rsqrt(self, x): """Elementwise reciprocal square root."""

    @abc.abstractmethod
    def matmul_f32(self, a, b): """``a @ b`` of float32 operands in full float32 precision."""


class Adapter(abc.ABC):
    name: str
    package: str  # the bi_ package: "bi_torch" or "bi_jax"
    xp: ArrayOps

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
    def bitwise_equal(self, a: Any, b: Any) -> bool:
        """Whether two arrays on the device have the same dtype, shape and bits."""

    @abc.abstractmethod
    def count_differing_rows(self, a: Any, b: Any) -> int:
        """How many rows (axis 0) of two same-shaped device arrays differ in any bit."""

    @abc.abstractmethod
    def synchronize(self, t: Any) -> None:
        """Block until ``t`` is computed."""

    @abc.abstractmethod
    def grad(self, fn: Fn, wrt: str) -> Fn:
        """``fn``'s gradient of ``sum(fn(**inputs)**2) / 2`` with respect to the
        input ``wrt``, as a function of the same keyword arguments: the
        backward pass with the output itself as the cotangent."""

    @abc.abstractmethod
    def primal(self, fn: Fn, wrt: str) -> Fn:
        """``fn``'s output as the forward of a training step computes it (the
        input ``wrt`` traced for its gradient), as a function of the same
        keyword arguments."""

    # --- what the spec says, resolved in this framework --------------------

    def kernel(self, op: str | OpSpec) -> Fn | None:
        """The bi_ implementation of ``op``, or None if this framework has none."""
        impl = _spec(op).impl(self.name)
        if impl is None:
            return None
        return getattr(importlib.import_module(self.package), impl.kernel)

    def default(self, op: str | OpSpec) -> Fn | None:
        """The framework's own implementation of ``op`` (the benchmark baseline)."""
        impl = _spec(op).impl(self.name)
        return None if impl is None else impl.default

    def control(self, op: str | OpSpec, name: str) -> Fn:
        """A negative control: an implementation of ``op`` known to vary with the batch.

        ``"default"`` is the framework's own implementation (cuBLAS or XLA on a GPU).
        """
        spec = _spec(op)
        if name == "default":
            fn = self.default(spec)
            if fn is None:
                raise KeyError(f"{self.name} has no default {spec.name}")
            return fn
        try:
            make = spec.controls[name]
        except KeyError:
            raise KeyError(f"{spec.name} has no control {name!r}; it has {sorted(spec.controls)}") from None
        return make(self.xp)

    # --- calls --------------------------------------------------------------

    def call(self, fn: Fn, spec: OpSpec, inputs: dict[str, Any]) -> np.ndarray:
        out = fn(**inputs, **spec.call_kwargs(self.name))
        self.synchronize(out)
        return self.to_numpy(out)

    def natives(self, inputs: Inputs) -> dict[str, Any]:
        return {k: self.to_native(v) for k, v in inputs.items()}

    def take_batch_rows(self, spec: OpSpec, native: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
        """The inputs restricted to batch rows ``start:stop`` (views where the framework has them)."""
        out = dict(native)
        for name in spec.batch_args:
            out[name] = self.take_rows(native[name], start, stop)
        return out


def _spec(op: str | OpSpec) -> OpSpec:
    if isinstance(op, OpSpec):
        return op
    from harness import registry

    return registry.get(op)

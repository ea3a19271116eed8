"""The op registry: one ``OpSpec`` per op drives tests and benchmarks alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound ``|out - ref| <= atol + rtol * |ref|``."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class BenchSpec:
    """What the benchmark sweeps and which resource bounds the op."""

    features: tuple[int, ...]  # feature sizes (hidden sizes) to sweep
    bound: str  # "memory" (report GB/s) or "compute" (report TFLOP/s)
    work: Callable[[int, int, str], float]  # (batch, features, dtype) -> bytes or flops


@dataclass(frozen=True)
class OpSpec:
    """Everything the harness needs to know about one op.

    ``make_inputs(rng, batch, features, dtype)`` returns numpy arrays (in the
    op's dtype, bf16 through ``ml_dtypes``); the ``batch_arg`` input and the
    output carry the batch on axis 0. ``reference(inputs)`` returns the
    float64 result. ``kwargs`` are fixed keyword arguments of every call.
    """

    name: str
    batch_arg: str
    make_inputs: Callable[[np.random.Generator, int, int, str], Inputs]
    reference: Callable[[Inputs], np.ndarray]
    tolerances: Mapping[str, Tolerance]
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    kwargs: Mapping[str, object] = field(default_factory=dict)
    bench: BenchSpec | None = None
    # Negative controls: names of implementations known to vary with the batch.
    controls: tuple[str, ...] = ()
    # Other inputs that carry the same batch axis 0 (per-sequence operands,
    # such as the keys of a batched attention product).
    batched: tuple[str, ...] = ()
    # Name of the bi_ function that implements the op (default: ``name``).
    function: str | None = None
    # Largest feature size the properties draw, and the elements of all
    # batched inputs per batch row (caps the batch at the profile's budget).
    max_features: int | None = None
    row_elements: Callable[[int], int] | None = None
    # Keyword arguments that differ between frameworks (torch's ``dim``
    # against JAX's ``axis``), by framework name; merged over ``kwargs``.
    framework_kwargs: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def call_kwargs(self, framework: str) -> dict[str, object]:
        """The keyword arguments of every call of this op in ``framework``."""
        return {**self.kwargs, **self.framework_kwargs.get(framework, {})}

    @property
    def batch_args(self) -> tuple[str, ...]:
        return (self.batch_arg,) + self.batched

    @property
    def function_name(self) -> str:
        return self.function or self.name

    def tolerance(self, dtype: str) -> Tolerance:
        return self.tolerances[dtype]


_REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    _load_specs()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered: {sorted(_REGISTRY)}") from None


def all_specs() -> list[OpSpec]:
    _load_specs()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_specs() -> None:
    # Importing the package registers every spec module in it.
    import harness.specs  # noqa: F401

"""What the harness knows about an op: the ``OpSpec`` and its parts.

An op's spec (one module under ``harness/specs/``) is the one place that knows
the op: its inputs, float64 reference and tolerances; each framework's bi_
kernel, default implementation and keyword arguments; its negative controls;
the sizes of the GPU sweeps and of the cross-framework check; the benchmark's
shapes and the resource that bounds it. Tests, the benchmark and the harness
core read the spec and name no op.

Nothing here imports a framework: defaults and controls import torch or JAX
when they are first called, so a spec loads where only one framework is
installed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

Inputs = dict[str, np.ndarray]
Fn = Callable[..., Any]
# A negative control is built from the framework's array namespace
# (``harness.frameworks.base.ArrayOps``): ``make(xp)`` returns the function.
ControlFactory = Callable[[Any], Fn]


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound ``|out - ref| <= atol + rtol * |ref|``."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class Bench:
    """What the benchmark sweeps and which resource bounds the op."""

    features: tuple  # feature sizes (hidden sizes), or (K, N) weight shapes
    bound: str  # "memory" (report GB/s) or "compute" (report TFLOP/s)
    work: Callable[[int, Any, str], float]  # (batch, features, dtype) -> bytes or flops
    # Largest batch worth timing at a feature size (None: any), for ops whose
    # inputs grow with more than the batch (an attention's keys).
    max_batch: Callable[[Any], int] | None = None
    # Further settings of the bi_ kernel timed beside it, by name: keyword
    # arguments (attention's ``split_kv=False``, split-KV off); rows
    # ``bi_<name>``.
    variants: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # Token counts the default GPU sweep also times, beyond bench.sweep.DEFAULT_M
    # (not with --m or --quick): matmul's long prefills.
    extra_m: tuple[int, ...] = ()
    # Plots: the batch axis's label, what a feature tuple means (default
    # "K x N"), and whether a memory-bound op is drawn as GB/s rather than time.
    batch_axis: str = "# tokens (M)"
    shape_note: str = "K x N"
    plot_throughput: bool = False
    # The label of the first element of a feature tuple (a sequence length),
    # if the benchmark should also plot throughput against it, one line per
    # implementation and batch size: ``<op>_<dtype>_by_length.png``.
    length_axis: str | None = None

    def __post_init__(self) -> None:
        if self.bound not in ("memory", "compute"):
            raise ValueError(f"bound must be 'memory' or 'compute', got {self.bound!r}")


@dataclass(frozen=True)
class Impl:
    """One framework's side of an op.

    ``kernel`` names the function of the framework's bi_ package
    (``bi_torch`` or ``bi_jax``) that implements the op; ``default`` is the
    framework's own implementation, the benchmark's baseline, called with
    the same inputs; ``label`` names that default in plots and tables.
    ``kwargs`` are keyword arguments of every call in this framework
    (torch's ``dim`` against JAX's ``axis``), merged over the spec's.
    """

    kernel: str
    default: Fn | None = None
    label: str | None = None
    kwargs: Mapping[str, object] = field(default_factory=dict)
    # The kernel has a backward pass (the gradient properties run on it).
    grad: bool = False


@dataclass(frozen=True)
class DefaultVaries:
    """Where the framework default is known to vary with the batch on a GPU
    (a negative control that needs the real library): rows ``s:s+M`` for
    every ``M`` in ``1..sizes``, against a batch of ``batch`` rows of
    ``features``."""

    features: Any
    batch: int
    sizes: int
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class OpSpec:
    """Everything the harness, the tests and the benchmark know about one op.

    ``make_inputs(rng, batch, features, dtype)`` returns numpy arrays (in the
    op's dtype, bf16 through ``ml_dtypes``); the ``batch_arg`` input, the
    ``batched`` inputs and the output carry the batch on axis 0.
    ``reference(inputs)`` returns the float64 result.
    """

    name: str
    batch_arg: str
    make_inputs: Callable[[np.random.Generator, int, Any, str], Inputs]
    reference: Callable[[Inputs], np.ndarray]
    tolerances: Mapping[str, Tolerance]
    impls: Mapping[str, Impl]  # by framework name
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    kwargs: Mapping[str, object] = field(default_factory=dict)
    # Other inputs that carry the same batch axis 0 (per-sequence operands,
    # such as the keys of a batched attention product).
    batched: tuple[str, ...] = ()
    bench: Bench | None = None
    # Negative controls: implementations known to vary with the batch, built
    # once for every framework from its array namespace.
    controls: Mapping[str, ControlFactory] = field(default_factory=dict)
    default_varies: DefaultVaries | None = None
    # Largest feature size the properties draw, and the elements of all
    # batched inputs per batch row (caps the batch at the profile's budget).
    max_features: int | None = None
    row_elements: Callable[[Any], int] | None = None
    # The same for the gradient properties, where a backward holds more per
    # row than the forward (attention's (heads, L, L) scores); default
    # ``row_elements``.
    grad_row_elements: Callable[[Any], int] | None = None
    # GPU checks: feature sizes of the cross-framework equality test, and
    # of the every-batch-size sweep (by dtype) up to ``sweep_batch`` rows.
    cross_features: tuple = (4096, 8192)
    sweeps: Mapping[str, tuple] = field(default_factory=dict)
    sweep_batch: int = 4096
    # The feature size of a set of inputs (default: the last dimension of the
    # ``batch_arg`` input), to draw fresh rows like them.
    features_of: Callable[[Inputs], Any] | None = None
    # The host-cost benchmark (``python -m bench --host-cost``): the feature
    # size of a decode-sized call (``HOST_BATCH`` batch rows); None: the op
    # is not measured there.
    host_features: Any = None
    # Backward passes (``harness.grads``): for each differentiable input, its
    # float64 gradient of the loss ``sum(f(inputs)**2) / 2``, whose cotangent
    # is the output: ``grads[name](inputs, cotangent)`` with float64 inputs.
    grads: Mapping[str, Callable[[Inputs, np.ndarray], np.ndarray]] = field(default_factory=dict)
    # Negative controls of the batch argument's gradient: ``make(xp)`` returns
    # a function of the inputs that gives that gradient with a reduction
    # whose order changes with the batch size.
    grad_controls: Mapping[str, ControlFactory] = field(default_factory=dict)

    def impl(self, framework: str) -> Impl | None:
        return self.impls.get(framework)

    def call_kwargs(self, framework: str) -> dict[str, object]:
        """The keyword arguments of every call of this op in ``framework``."""
        impl = self.impl(framework)
        return {**self.kwargs, **(impl.kwargs if impl else {})}

    @property
    def batch_args(self) -> tuple[str, ...]:
        return (self.batch_arg,) + self.batched

    def features(self, inputs: Inputs):
        """The feature size that ``make_inputs`` took to make ``inputs``."""
        return self.features_of(inputs) if self.features_of else inputs[self.batch_arg].shape[-1]

    def tolerance(self, dtype: str) -> Tolerance:
        return self.tolerances[dtype]


HOST_BATCH = 32


def lazy_jit(fn: Fn, **jit_kwargs) -> Fn:
    """``jax.jit(fn, **jit_kwargs)``, made on the first call, so that a spec
    module imports without JAX."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if call.jitted is None:
            import jax

            call.jitted = jax.jit(fn, **jit_kwargs)
        return call.jitted(*args, **kwargs)

    call.jitted = None
    return call


def feature_label(features) -> str:
    """``4096``, or ``"4096x14336"`` for a (K, N) weight shape."""
    return "x".join(map(str, features)) if isinstance(features, tuple) else str(features)

"""The sweep: every registered op x framework x implementation x shape x M."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from harness.frameworks import adapter
from harness.registry import OpSpec

DEFAULT_M = tuple(2**i for i in range(14))  # 1 .. 8192


@dataclass
class Row:
    op: str
    framework: str
    impl: str  # "bi" or "default"
    features: str  # hidden size, or "KxN" for a weight shape
    dtype: str
    m: int
    median_us: float
    p20_us: float
    p80_us: float
    throughput: float  # GB/s or TFLOP/s
    unit: str
    pct_of_ceiling: float  # % of measured copy bandwidth (memory-bound ops)
    ratio_to_default: float  # default time / this time (>1: faster than the default)
    rows_differing: int  # rows of the M-row result that differ from the same rows in the largest batch
    timing: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def feature_label(features) -> str:
    """``4096`` or ``"4096x14336"`` for a (K, N) weight shape."""
    return "x".join(map(str, features)) if isinstance(features, tuple) else str(features)


@dataclass(frozen=True)
class Job:
    spec: OpSpec
    framework: str
    features: int | tuple[int, ...]
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.spec.name}/{self.framework}/{self.dtype}/{feature_label(self.features)}"


def jobs(specs: list[OpSpec], frameworks: list[str], dtypes: list[str], features: list | None) -> Iterator[Job]:
    for spec in specs:
        if spec.bench is None:
            continue
        for fw in frameworks:
            for dtype in dtypes:
                if dtype not in spec.dtypes:
                    continue
                for n in features or spec.bench.features:
                    yield Job(spec, fw, n, dtype)


def implementations(job: Job) -> dict[str, Callable[..., Any]]:
    ad = adapter(job.framework)
    impls = {}
    default = ad.default(job.spec.name)
    if default is not None:
        impls["default"] = default
    kernel = ad.kernel(job.spec.name)
    if kernel is not None:
        impls["bi"] = kernel
    return impls


def _bind(fn: Callable[..., Any], spec: OpSpec, framework: str) -> Callable[..., Any]:
    kwargs = spec.call_kwargs(framework)
    return lambda **inputs: fn(**inputs, **kwargs)


def run_job(
    job: Job,
    ms: list[int],
    native: bool,
    copy_gbs: float | None,
    advance: Callable[[], None],
    seed: int = 0,
) -> list[Row]:
    """Time (on a GPU) and check invariance of every implementation for each M."""
    spec, ad = job.spec, adapter(job.framework)
    impls = {name: _bind(fn, spec, job.framework) for name, fn in implementations(job).items()}
    largest = max(ms)
    rng = np.random.default_rng(seed)
    base = ad.natives(spec.make_inputs(rng, largest, job.features, job.dtype))
    reference = {name: fn(**base) for name, fn in impls.items()}

    from harness.properties import take_batch_rows

    rows: list[Row] = []
    for m in ms:
        sub = take_batch_rows(spec, ad, base, 0, m)
        sets = _input_sets(job, sub, m, rng) if native else None
        times = _time_all(job, impls, sets) if native else {name: None for name in impls}
        for name, fn in impls.items():
            differing = ad.count_differing_rows(fn(**sub), ad.take_rows(reference[name], 0, m))
            timing = times[name]
            work = spec.bench.work(m, job.features, job.dtype)
            if timing is None:
                thr, pct = math.nan, math.nan
            elif spec.bench.bound == "memory":
                thr = work / (timing.median_us * 1e-6) / 1e9
                pct = 100.0 * thr / copy_gbs if copy_gbs else math.nan
            else:
                thr, pct = work / (timing.median_us * 1e-6) / 1e12, math.nan
            rows.append(
                Row(
                    op=spec.name,
                    framework=job.framework,
                    impl=name,
                    features=feature_label(job.features),
                    dtype=job.dtype,
                    m=m,
                    median_us=timing.median_us if timing else math.nan,
                    p20_us=timing.p20_us if timing else math.nan,
                    p80_us=timing.p80_us if timing else math.nan,
                    throughput=thr,
                    unit="GB/s" if spec.bench.bound == "memory" else "TFLOP/s",
                    pct_of_ceiling=pct,
                    ratio_to_default=math.nan,
                    rows_differing=differing,
                    timing=timing.method if timing else "none (interpreter: invariance only)",
                )
            )
            advance()
        if times.get("default") is not None:
            for row in rows[-len(impls):]:
                row.ratio_to_default = times["default"].median_us / row.median_us
    return rows


def _input_sets(job: Job, first: dict, m: int, rng: np.random.Generator) -> list[dict]:
    """``first`` (the M-row inputs already on the device), then enough further
    independent input sets (weights included) that cycling through them does
    not run out of L2: each call reads its inputs from memory. Large inputs
    (a 128256-column vocabulary at M = 8192 is 2 GB) need no further set, and
    none is generated: generating them on the host took most of a run."""
    from bench import timing

    spec, ad = job.spec, adapter(job.framework)
    footprint = sum(v.nbytes for v in first.values()) * 2  # inputs and an output of similar size
    sets = [first]
    for _ in range(timing.buffer_sets(footprint) - 1):
        sets.append(ad.natives(spec.make_inputs(rng, m, job.features, job.dtype)))
    return sets


def _time_all(job: Job, impls: dict[str, Callable[..., Any]], sets: list[dict]) -> dict:
    """Timing of every implementation on the same input sets. torch's are
    interleaved replay by replay, so that clock drift during the job affects
    the default and the bi_ kernel alike; JAX's are timed one after the other
    (the profiler attributes kernels to calls by their order)."""
    from bench import timing

    if job.framework == "torch":
        return timing.time_torch_interleaved(impls, sets)
    return {name: timing.time_jax(fn, sets) for name, fn in impls.items()}

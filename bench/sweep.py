"""The sweep: every benchmarked op x framework x implementation x shape x M.

Nothing here names an op or branches on a framework: each op's spec
(``harness.specs``) gives its inputs, implementations, shapes and bound, and
``bench.timing`` times each framework its own way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from harness.frameworks import adapter
from harness.opspec import OpSpec, feature_label

DEFAULT_M = tuple(2**i for i in range(14))  # 1 .. 8192
QUICK_M = (1, 16, 256, 4096)
# Without a GPU the interpreters run the kernels: small sizes, invariance only.
CPU_M = (1, 2, 5, 8)
CPU_QUICK_M = (1, 3)
CPU_FEATURES = (64,)


@dataclass
class Row:
    op: str
    framework: str
    impl: str  # "bi", "default", or "bi_<variant>" (the spec's Bench.variants)
    features: str  # hidden size, or "KxN" for a weight shape
    dtype: str
    m: int
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    throughput: float | None  # GB/s or TFLOP/s
    unit: str
    pct_of_ceiling: float | None  # % of measured copy bandwidth (memory-bound ops)
    ratio_to_default: float | None  # default time / this time (>1: faster than the default)
    rows_differing: int  # rows of the M-row result that differ from the same rows in the largest batch
    timing: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            if spec.impl(fw) is None:
                continue
            for dtype in dtypes:
                if dtype not in spec.dtypes:
                    continue
                for n in features or spec.bench.features:
                    yield Job(spec, fw, n, dtype)


def implementations(job: Job) -> dict[str, Callable[..., Any]]:
    """The framework default (if the spec has one) and the bi_ kernel, with
    the op's keyword arguments bound."""
    ad = adapter(job.framework)
    kwargs = job.spec.call_kwargs(job.framework)
    impls = {}
    for name, fn in (("default", ad.default(job.spec)), ("bi", ad.kernel(job.spec))):
        if fn is not None:
            impls[name] = _bind(fn, kwargs)
    kernel = ad.kernel(job.spec)
    for name, extra in job.spec.bench.variants.items():
        impls[f"bi_{name}"] = _bind(kernel, {**kwargs, **extra})
    return impls


def batch_sizes(job: Job, ms: list[int], extra: bool = False) -> list[int]:
    """The requested batch sizes this job times: those up to the spec's cap
    (at least the smallest one); ``extra``: also the spec's ``extra_m`` (the
    default GPU sweep)."""
    if extra:
        ms = sorted({*ms, *job.spec.bench.extra_m})
    cap = job.spec.bench.max_batch(job.features) if job.spec.bench.max_batch else None
    if cap is None:
        return list(ms)
    return [m for m in ms if m <= cap] or [min(ms)]


def _bind(fn: Callable[..., Any], kwargs: dict) -> Callable[..., Any]:
    return lambda **inputs: fn(**inputs, **kwargs)


def _throughput(job: Job, m: int, median_us: float | None, copy_gbs: float | None):
    """(throughput, % of the copy ceiling) of one timed point."""
    if median_us is None:
        return None, None
    work = job.spec.bench.work(m, job.features, job.dtype)
    if job.spec.bench.bound == "memory":
        gbs = work / (median_us * 1e-6) / 1e9
        return gbs, (100.0 * gbs / copy_gbs if copy_gbs else None)
    return work / (median_us * 1e-6) / 1e12, None


def run_job(
    job: Job,
    ms: list[int],
    native: bool,
    copy_gbs: float | None,
    advance: Callable[[], None],
    seed: int = 0,
    extra: bool = False,
) -> list[Row]:
    """Time (on a GPU) and check invariance of every implementation for each M:
    each M-row call is compared, row by row, with the same rows computed in
    the largest batch."""
    from bench import timing

    spec, ad = job.spec, adapter(job.framework)
    impls = implementations(job)
    ms = batch_sizes(job, ms, extra)
    largest = max(ms)
    rng = np.random.default_rng(seed)
    base = ad.natives(spec.make_inputs(rng, largest, job.features, job.dtype))
    reference = {name: fn(**base) for name, fn in impls.items()}

    rows: list[Row] = []
    for m in ms:
        sub = ad.take_batch_rows(spec, base, 0, m)
        times = timing.time_interleaved(job.framework, impls, _input_sets(job, sub, m, rng)) if native else {}
        default = times.get("default")
        for name, fn in impls.items():
            differing = ad.count_differing_rows(fn(**sub), ad.take_rows(reference[name], 0, m))
            t = times.get(name)
            median = t.median_us if t else None
            throughput, pct = _throughput(job, m, median, copy_gbs)
            rows.append(
                Row(
                    op=spec.name,
                    framework=job.framework,
                    impl=name,
                    features=feature_label(job.features),
                    dtype=job.dtype,
                    m=m,
                    median_us=median,
                    p20_us=t.p20_us if t else None,
                    p80_us=t.p80_us if t else None,
                    throughput=throughput,
                    unit="GB/s" if spec.bench.bound == "memory" else "TFLOP/s",
                    pct_of_ceiling=pct,
                    ratio_to_default=default.median_us / median if default and median else None,
                    rows_differing=differing,
                    timing=t.method if t else "none (interpreter: invariance only)",
                )
            )
            advance()
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

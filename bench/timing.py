"""Device-side timing for each framework, interleaved across implementations.

* torch: a CUDA graph of many calls, rotating among enough input sets that
  they do not all fit in L2, replayed between CUDA events; a sample is the
  replay time over the number of calls.
* jax: JAX's own CUPTI timer (``jax.experimental.mosaic.gpu.profiler.measure``)
  around one jitted program that calls the function once per input set, each
  call ordered after the previous one (``lax.optimization_barrier``, so that
  XLA cannot fuse the calls together); a sample is the summed kernel time
  over the number of calls, so Python dispatch and launch gaps are excluded.

Either way the implementations of one point (the framework default and the
bi_ kernel) are sampled in turn, ``rounds`` times in ABBA order, so that
clock drift during a measurement affects them alike (``interleave``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

L2_BYTES_GUESS = 60 * 2**20  # H200; the H100's is 50 MB


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    method: str


def buffer_sets(footprint_bytes: int, l2_bytes: int = L2_BYTES_GUESS, cap: int = 32) -> int:
    """Input sets to rotate among so that the rotation is several times L2."""
    return int(min(cap, max(1, math.ceil(3 * l2_bytes / max(footprint_bytes, 1)))))


def _summary(samples_us: list[float], method: str) -> Timing:
    a = np.asarray(samples_us, dtype=np.float64)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), method)


def interleave(samplers: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Call each sampler in turn, ``rounds`` times, in ABBA order; every call
    returns one or more samples in us."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    names = list(samplers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name] += samplers[name]()
    return samples


def _turns(n: int) -> str:
    return "" if n == 1 else f", interleaved (ABBA) with {n - 1} other implementation(s)"


# --- torch -------------------------------------------------------------------


def _torch_graph(fn: Callable[..., Any], arg_sets: list[dict], target_ms: float):
    """A CUDA graph of about ``target_ms`` of calls of ``fn`` over ``arg_sets``, and its call count."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets * 2:  # warm-up: compilation, autotuning caches, allocator
            fn(**args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def capture(calls: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: JAX's runtime threads may touch CUDA while torch captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for i in range(calls):
                fn(**arg_sets[i % len(arg_sets)])
        return graph

    probe_calls = len(arg_sets)
    probe = capture(probe_calls)
    probe.replay()
    est = _replay_us(probe, probe_calls)
    del probe
    calls = int(min(2000, max(len(arg_sets), target_ms * 1e3 / max(est, 1e-3))))
    calls = max(len(arg_sets), calls - calls % len(arg_sets))
    graph = capture(calls)
    graph.replay()
    torch.cuda.synchronize()
    return graph, calls


def _replay_us(graph, calls: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def time_torch(fns: dict[str, Callable[..., Any]], arg_sets: list[dict], target_ms: float = 2.0,
               rounds: int = 25) -> dict[str, Timing]:
    """Device time per call of each of ``fns`` on the same inputs: CUDA graph
    replays between CUDA events, interleaved. On an H100 the clock drifts with
    power and temperature over a measurement, and timing one implementation's
    block after the other's gave ratios from 0.88x to 1.10x over three runs of
    one point (bi_torch against cuBLAS, 8192x28672 at M = 8192)."""
    graphs = {name: _torch_graph(fn, arg_sets, target_ms) for name, fn in fns.items()}
    samplers = {name: (lambda g=graph, c=calls: [_replay_us(g, c)]) for name, (graph, calls) in graphs.items()}
    samples = interleave(samplers, rounds)
    out = {
        name: _summary(samples[name], f"CUDA graph of {calls} calls over {len(arg_sets)} input sets, "
                                      f"CUDA events{_turns(len(fns))}")
        for name, (_, calls) in graphs.items()
    }
    del graphs
    return out


# --- jax ---------------------------------------------------------------------


def _chained(fn: Callable[..., Any]):
    """One program that calls ``fn`` once per input set, each call after the
    previous one's output exists (so XLA neither fuses nor overlaps them),
    returning every output (so that XLA removes none of the calls: returning
    only the last one left a single kernel per run on an H200)."""
    import jax

    def run(arg_sets: list[dict]):
        outs = []
        for args in arg_sets:
            if outs:
                args, _ = jax.lax.optimization_barrier((args, outs[-1]))
            outs.append(fn(**args))
        return outs

    return jax.jit(run)


def time_jax(fns: dict[str, Callable[..., Any]], arg_sets: list[dict], rounds: int = 10,
             target_ms: float = 2.0, max_iterations: int = 10) -> dict[str, Timing]:
    """Device time per call of each of ``fns`` on the same inputs, with JAX's
    CUPTI timer, interleaved. A sample is one run of the chained program over
    ``arg_sets``; each turn takes enough runs for about ``target_ms``."""
    import jax
    from jax.experimental.mosaic.gpu.profiler import measure

    calls = len(arg_sets)

    def sampler(fn):
        program = _chained(fn)
        _, ms = measure(program)(arg_sets)  # compiles, warms up, and sizes the turns
        if ms is None:
            raise RuntimeError("JAX's CUPTI timer recorded no kernel")
        iterations = int(min(max_iterations, max(1, math.ceil(target_ms / max(ms, 1e-6)))))
        timed = measure(program, iterations=iterations)

        def sample() -> list[float]:
            out, times = timed(arg_sets)
            jax.block_until_ready(out)
            times = times if isinstance(times, list) else [times]
            return [t * 1e3 / calls for t in times]

        return sample

    samples = interleave({name: sampler(fn) for name, fn in fns.items()}, rounds)
    method = (f"JAX CUPTI kernel time (mosaic.gpu.profiler.measure), {calls} chained call(s) over "
              f"{calls} input set(s){_turns(len(fns))}")
    return {name: _summary(samples[name], method) for name in fns}


TIMERS = {"torch": time_torch, "jax": time_jax}


def time_interleaved(framework: str, fns: dict[str, Callable[..., Any]], arg_sets: list[dict]) -> dict[str, Timing]:
    """Device time per call of each of ``fns`` in ``framework``, interleaved."""
    return TIMERS[framework](fns, arg_sets)


# --- the copy ceiling ---------------------------------------------------------


def copy_bandwidth_gbs(framework: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written) measured now, in
    GB/s, with ``framework``'s own copy and timer."""
    n = 1 << 30  # 1 GiB each way
    if framework == "torch":
        import torch

        src = torch.randn(n // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        # The better of a cudaMemcpy-style copy and an elementwise copy kernel.
        fns = {"copy": lambda s, d: d.copy_(s), "mul": lambda s, d: torch.mul(s, 1.0, out=d)}
        times = time_torch(fns, [{"s": src, "d": dst}], target_ms=20, rounds=10)
    else:
        import jax
        import jax.numpy as jnp

        src = jax.random.normal(jax.random.key(0), (n // 4,), jnp.float32)
        times = time_jax({"negate": lambda s: -s}, [{"s": src}], rounds=4, target_ms=20)
    return max(2 * n / (t.median_us * 1e-6) / 1e9 for t in times.values())

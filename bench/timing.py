"""Device-side timing for each framework.

* torch: a CUDA graph of many calls, rotating among enough input sets that
  they do not all fit in L2, replayed between CUDA events; per-call time is
  the replay time over the number of calls. The benchmark interleaves the
  replays of the default and the bi_ kernel (``time_torch_interleaved``).
* jax: the JAX profiler (CUPTI) records every kernel of many jitted calls,
  again on rotating inputs; per-call time is the sum of that call's kernel
  durations, so Python dispatch is excluded.
"""

from __future__ import annotations

import glob
import math
import tempfile
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


def time_torch(fn: Callable[..., Any], arg_sets: list[dict], target_ms: float = 2.0, reps: int = 25) -> Timing:
    """Device time per call of ``fn`` (see ``time_torch_interleaved``)."""
    return time_torch_interleaved({"fn": fn}, arg_sets, target_ms, reps)["fn"]


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


def time_torch_interleaved(
    fns: dict[str, Callable[..., Any]], arg_sets: list[dict], target_ms: float = 2.0, reps: int = 25
) -> dict[str, Timing]:
    """Device time per call of each of ``fns`` on the same inputs.

    Each function's calls are captured in a CUDA graph, rotating among
    ``arg_sets``; the graphs are then replayed in turn, ``reps`` rounds in
    ABBA order, each replay timed with CUDA events. Interleaving matters for
    long compute-bound launches: on an H100 the clock drifts with power and
    temperature over a measurement, and timing one implementation's block
    after the other's gave ratios from 0.88x to 1.10x over three runs of one
    point (bi_torch against cuBLAS, 8192x28672 at M = 8192).
    """
    graphs = {name: _torch_graph(fn, arg_sets, target_ms) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            graph, calls = graphs[name]
            samples[name].append(_replay_us(graph, calls))
    out = {}
    for name, (graph, calls) in graphs.items():
        turn = "" if len(fns) == 1 else f", replays interleaved with {len(fns) - 1} other implementation(s)"
        out[name] = _summary(samples[name], f"CUDA graph of {calls} calls over {len(arg_sets)} input sets, CUDA events{turn}")
    del graphs
    return out


def _device_kernel_events(path: str) -> list[tuple[int, int]]:
    """(start_ns, duration_ns) of every GPU kernel in a profile, in time order."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    events = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lname = line.name.lower()
            if "stream" not in lname or "memcpy" in lname:
                continue
            for ev in line.events:
                name = ev.name.lower()
                if "memcpy" in name or "memset" in name:
                    continue
                events.append((int(ev.start_ns), int(ev.duration_ns)))
    events.sort()
    return events


def time_jax(fn: Callable[..., Any], arg_sets: list[dict], calls: int = 200) -> Timing:
    import jax

    jitted = jax.jit(fn)
    for args in arg_sets * 2:
        jax.block_until_ready(jitted(**args))
    calls = max(len(arg_sets), calls - calls % len(arg_sets))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        # Only the last output is kept: holding all of them (200 outputs of up
        # to 2 GB) ran the device out of memory. Freed buffers are reused in
        # stream order, so dropping them does not wait for the device.
        out = None
        for i in range(calls):
            out = jitted(**arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        events = _device_kernel_events(paths[0]) if paths else []
    if not events or len(events) % calls:
        raise RuntimeError(
            f"the JAX profiler recorded {len(events)} GPU kernels for {calls} calls; cannot attribute them to calls"
        )
    per_call = len(events) // calls
    durations = np.asarray([d for _, d in events], dtype=np.float64).reshape(calls, per_call).sum(axis=1) / 1e3
    # Every call's kernels, grouped in launch order; summarise over groups of calls.
    groups = durations[: calls - calls % 8].reshape(8, -1).mean(axis=1) if calls >= 8 else durations
    return _summary(list(groups), f"JAX profiler kernel time, {calls} jitted calls over {len(arg_sets)} input sets, {per_call} kernel(s) per call")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written) measured now, in GB/s."""
    import torch

    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    # The better of a cudaMemcpy-style copy and an elementwise copy kernel.
    best = 0.0
    for fn in (lambda s, d: d.copy_(s), lambda s, d: torch.mul(s, 1.0, out=d)):
        t = time_torch(fn, [{"s": src, "d": dst}], target_ms=20, reps=10)
        best = max(best, 2 * n / (t.median_us * 1e-6) / 1e9)
    return best

"""Backward passes against the frameworks' own (``python -m bench --backward``,
GPU only).

For every op with a backward (``OpSpec.grads``), at its first benchmark
shape and a few token counts: the time of one training step of the op alone,
the forward and the gradients of every differentiable input of the loss
``sum(out**2) / 2`` (``harness.grads``'s), with the bi_ kernels and with the
framework's default (cuBLAS and torch's autograd formulas; XLA's
derivatives under ``jax.jit``). torch: ``triton.testing.do_bench`` (CUDA
events around the eager step, its host time included, the L2 flushed
between calls), and the step's device time alone: CUDA graph replays of it,
the two implementations interleaved (``bench.timing.time_torch``, as the
forward sweep times; inputs stay in L2 between calls). JAX: the jitted
step's wall time with a synchronisation, the median of repeated calls. The
ratios are default time over bi_ time (above 1: bi_ is faster).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

M_VALUES = (256, 4096)
QUICK_M = (256,)


def _torch_step(fn, inputs, kwargs, wrt):
    import torch

    leaves = {k: (v.detach().requires_grad_() if k in wrt else v) for k, v in inputs.items()}

    def step():
        out = fn(**leaves, **kwargs)
        return torch.autograd.grad(out, [leaves[k] for k in wrt], out.detach())

    return step


def _torch_ms(step) -> float:
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=25, rep=100))


def _torch_device_ms(steps) -> dict:
    """The device time of each eager step (its kernels without the host's
    Python between them): ``{name}_device_ms`` and ``device_ratio``, or a
    ``device_error`` where a step cannot be captured in a CUDA graph (a
    host synchronisation in it, say)."""
    from bench import timing

    try:
        times = timing.time_torch(steps, [{}])
    except Exception as e:  # reported, not hidden
        return {"device_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    out = {f"{name}_device_ms": t.median_us / 1e3 for name, t in times.items()}
    out["device_ratio"] = out["default_device_ms"] / out["bi_device_ms"]
    return out


def _jax_step(fn, inputs, kwargs, wrt):
    import jax

    names = list(wrt)

    @jax.jit
    def step(*xs):
        args = dict(inputs)

        def f(*vs):
            return fn(**{**args, **dict(zip(names, vs))}, **kwargs)

        out, pullback = jax.vjp(f, *xs)
        return pullback(out)

    xs = [inputs[k] for k in names]
    return lambda: step(*xs)


def _jax_ms(step, reps: int = 30) -> float:
    import jax

    jax.block_until_ready(step())  # compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(frameworks, quick: bool = False, console=None, path: Path | None = None, ops=None) -> list[dict]:
    """The rows, each also written to ``path`` (JSON) as soon as it is
    measured (a run cut by a time limit keeps what it measured)."""
    from harness import registry
    from harness.frameworks import adapter

    rows = []
    for spec in registry.all_specs():
        if not spec.grads or spec.bench is None or (ops is not None and spec.name not in ops):
            continue
        features = spec.bench.features[0]
        for framework in frameworks:
            impl = spec.impl(framework)
            if impl is None or not impl.grad:
                continue
            ad = adapter(framework)
            kwargs = spec.call_kwargs(framework)
            limit = spec.bench.max_batch(features) if spec.bench.max_batch else None
            for m in sorted({min(m, limit) if limit else m for m in (QUICK_M if quick else M_VALUES)}):
                inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), m, features, "bfloat16"))
                wrt = tuple(spec.grads)
                make, time_ms = (_torch_step, _torch_ms) if framework == "torch" else (_jax_step, _jax_ms)
                row = {"op": spec.name, "framework": framework, "m": m,
                       "features": "x".join(map(str, features)) if isinstance(features, tuple) else str(features),
                       "wrt": list(wrt), "dtype": "bfloat16"}
                steps = {name: make(fn, inputs, kwargs, wrt)
                         for name, fn in (("default", ad.default(spec)), ("bi", ad.kernel(spec)))}
                for name, step in steps.items():
                    try:
                        row[f"{name}_ms"] = time_ms(step)
                    except Exception as e:  # reported, not hidden: a failing step is a finding
                        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if "default_ms" in row and "bi_ms" in row:
                    row["ratio"] = row["default_ms"] / row["bi_ms"]
                    if framework == "torch":
                        row.update(_torch_device_ms(steps))
                rows.append(row)
                if path is not None:
                    path.write_text(json.dumps(rows, indent=1))
                if console is not None:
                    console.print(f"backward {spec.name} {framework} M={m}: default {row.get('default_ms', '-')} ms, "
                                  f"bi_ {row.get('bi_ms', row.get('bi_error'))}")
    return rows


def run(out: Path, console, frameworks, quick: bool = False, ops=None) -> list[Path]:
    """``ops``: the op names to measure (default: every op with a backward)."""
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    path = out / "backward.json"
    rows = measure(frameworks, quick, console, path, ops)
    table = Table(title="forward + backward of one op (bf16; loss: half the squared norm of the output; "
                        "default time / bi_ time)")
    for col in ("op", "framework", "features", "M", "inputs", "default ms", "bi_ ms", "ratio",
                "device ms, default / bi_ (torch)", "device ratio"):
        table.add_column(col)
    for r in rows:
        device = (f"{r['default_device_ms']:.3f} / {r['bi_device_ms']:.3f}" if "bi_device_ms" in r
                  else r.get("device_error", "-"))
        table.add_row(r["op"], r["framework"], r["features"], str(r["m"]), ",".join(r["wrt"]),
                      f"{r['default_ms']:.3f}" if "default_ms" in r else r.get("default_error", "-"),
                      f"{r['bi_ms']:.3f}" if "bi_ms" in r else r.get("bi_error", "-"),
                      f"{r['ratio']:.2f}x" if "ratio" in r else "-", device,
                      f"{r['device_ratio']:.2f}x" if "device_ratio" in r else "-")
    console.print(table)
    return [path]

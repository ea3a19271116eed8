"""Command line: ``python -m bench`` (also ``bi-bench``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.devices import configure, release_device_memory


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v]


def _feature(text: str):
    """``4096`` (a hidden size) or ``4096x14336`` (a K x N weight shape)."""
    parts = tuple(int(v) for v in text.lower().split("x"))
    return parts[0] if len(parts) == 1 else parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput and batch invariance of the bi_ kernels against the PyTorch and XLA defaults.",
    )
    p.add_argument("--ops", type=_csv(str), help="comma-separated op names (default: every registered op)")
    p.add_argument("--frameworks", type=_csv(str), default=["torch", "jax"], help="torch,jax")
    p.add_argument("--dtypes", type=_csv(str), default=["bfloat16"], help="float32,bfloat16,float16")
    p.add_argument("--m", type=_csv(int), help="token counts M (default 1,2,4,...,8192)")
    p.add_argument(
        "--features",
        type=_csv(_feature),
        help="feature sizes, or KxN weight shapes for the matmul (default: each op's realistic shapes)",
    )
    p.add_argument("--quick", action="store_true", help="a short sweep (M = 1, 16, 256, 4096)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results.json, results.csv and the PNG plots")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    profile = configure()  # before any kernel package is imported
    # torch and JAX share the GPU in this process: JAX grows its pool as it
    # needs instead of taking 75 % of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress

    from bench import report, sweep
    from harness import registry

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    specs = registry.all_specs() if not args.ops else [registry.get(o) for o in args.ops]
    native = profile.native
    if native:
        ms = args.m or ([1, 16, 256, 4096] if args.quick else list(sweep.DEFAULT_M))
        features = args.features
    else:
        console.print(
            "[yellow]No GPU: kernels run in the Triton and Pallas interpreters. This run checks "
            "invariance only; it measures no meaningful time.[/yellow]"
        )
        ms = args.m or [1, 2, 5, 8]
        features = args.features or [64]
    jobs = list(sweep.jobs(specs, args.frameworks, args.dtypes, features))
    if not jobs:
        console.print("[red]nothing to run: no op matches the filters[/red]")
        return 2

    copy_gbs = None
    if native:
        from bench.timing import copy_bandwidth_gbs

        copy_gbs = copy_bandwidth_gbs()
        console.print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")

    info = report.provenance(native, copy_gbs)
    rows = []
    total = sum(len(ms) * len(sweep.implementations(j)) for j in jobs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sweeping", total=total)
        for job in jobs:
            progress.update(task, description=job.key)
            if native:
                rows += sweep.run_job(job, ms, native, copy_gbs, lambda: progress.advance(task))
                release_device_memory()
                # The results so far, after every job: a long sweep that is cut
                # off keeps what it measured.
                report.write_results(rows, info, args.out)
                continue
            try:
                rows += sweep.run_job(job, ms, native, copy_gbs, lambda: progress.advance(task))
            except Exception as err:  # the CPU interpreters only; GPU errors propagate
                if type(err).__name__ != "InterpreterError":
                    raise
                # Triton 3.6's interpreter cannot take a runtime loop bound with
                # numpy >= 2.4 (triton-lang/triton#9171); the matmul's K loop has one.
                console.print(f"[yellow]skipped {job.key}: the Triton interpreter failed ({err}); "
                              "known interpreter defect triton-lang/triton#9171, GPU runs are unaffected[/yellow]")

    report.print_table(rows, info, console)
    for path in report.write_results(rows, info, args.out):
        console.print(f"wrote {path}")
    if native:
        from bench.plots import plot_rows

        for path in plot_rows([r.as_dict() for r in rows], info, args.out):
            console.print(f"wrote {path}")
    else:
        console.print("no plots: the interpreters measure no time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

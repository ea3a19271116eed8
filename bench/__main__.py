"""Command line: ``python -m bench`` (also ``bi-bench``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from bi_core.devices import nvidia_gpu_present, requested_device
from harness.devices import configure, jax_off_the_gpu, release_device_memory


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _feature(text: str):
    """``4096`` (a hidden size), ``4096x14336`` (a K x N weight shape) or
    ``4096x32x8x128`` (length x query heads x KV heads x head dim)."""
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if not parts or len(parts) > 4 or any(v < 1 for v in parts):
        raise argparse.ArgumentTypeError(f"a feature size is N, KxN or LxHqxHkvxD with positive integers, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _features(text: str):
    values = [_feature(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated feature sizes, got {text!r}")
    return values


def _choices(kind: str, allowed: list[str], hint: str = ""):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}{hint}"
            )
        return list(dict.fromkeys(values))  # each once, in the order given

    return parse


def _results_folder(p: argparse.ArgumentParser, out: Path) -> None:
    """Make ``out`` (``--out``) now: results are written at the end of a run,
    so a folder that cannot take them is refused before the run, not after."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out {out}: cannot make the results folder ({err.strerror or err})")
    if not os.access(out, os.W_OK | os.X_OK):
        p.error(f"--out {out}: the results folder is not writable")


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be finite and >= 0, got {text!r}")
    return values


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m bench" if name in ("", "__main__.py", "-c") else name


def parser() -> argparse.ArgumentParser:
    from bench.sweep import CPU_FEATURES, CPU_M, CPU_QUICK_M, DEFAULT_M, QUICK_M
    from harness import registry
    from harness.frameworks import FRAMEWORKS, installed

    benched = [s.name for s in registry.all_specs() if s.bench is not None]
    others = [s.name for s in registry.all_specs() if s.bench is None]
    hint = f" ({', '.join(others)} run the kernels of the ops above and are not benchmarked)" if others else ""
    frameworks = list(installed()) or list(FRAMEWORKS)
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Throughput and batch invariance of the bi_ kernels against the PyTorch and XLA defaults. "
        "On a machine without a GPU the kernels run in the Triton and Pallas interpreters at small sizes: "
        "that run checks invariance only and measures no time.",
    )
    p.add_argument("--ops", type=_choices("op", benched, hint), default=benched,
                   help=f"comma-separated ops, of {', '.join(benched)} (default: all)")
    p.add_argument("--frameworks", type=_choices("framework", list(FRAMEWORKS)), default=frameworks,
                   help=f"comma-separated frameworks, of {_csv(FRAMEWORKS)} (default: the installed ones, "
                        f"here {_csv(frameworks)})")
    p.add_argument("--dtypes", type=_choices("dtype", ["float32", "bfloat16", "float16"]), default=["bfloat16"],
                   help="comma-separated dtypes, of float32,bfloat16,float16 (default: bfloat16)")
    extra = "".join(f", {s.name} also {_csv(s.bench.extra_m)}" for s in registry.all_specs()
                    if s.bench is not None and s.bench.extra_m)
    p.add_argument("--m", type=_positive_ints, default=None,
                   help=f"comma-separated token counts M (default: {_csv(DEFAULT_M)} on a GPU{extra}; "
                        f"{_csv(CPU_M)} without)")
    p.add_argument("--features", type=_features, default=None,
                   help="comma-separated feature sizes, or shapes of the rank of an op's own (KxN weight shapes, "
                        "LxHqxHkvxD sequence shapes) (default: each "
                        f"op's benchmark shapes on a GPU, {_csv(CPU_FEATURES)} without)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short sweep: M = {_csv(QUICK_M)} on a GPU, {_csv(CPU_QUICK_M)} without (--m wins)")
    p.add_argument("--host-cost", action="store_true",
                   help="instead of the sweep: host time per call of the torch drop-in paths (bi_ direct, the "
                        "dispatch mode, the process-wide switch) and Llama generation under each, and a JAX "
                        "decoder's generation under the transform (GPU only; writes host_cost.json)")
    p.add_argument("--backward", action="store_true",
                   help="instead of the sweep: forward + backward of each op with a backward pass (of --ops), bi_ "
                        "against the framework's default (GPU only; --quick: fewer token counts; writes backward.json)")
    p.add_argument("--e2e", action="store_true",
                   help="instead of the sweep: continuous batching end to end (bench/e2e): each request served under "
                        "several arrival schedules by each framework's engine, default and bi_ kernels; distinct "
                        "completions per request and tokens/s (writes e2e.json and plots/e2e.png)")
    p.add_argument("--e2e-requests", type=_positive_int, default=None, help="requests of the --e2e workload (default: 256 "
                   "on a GPU, 6 without)")
    p.add_argument("--e2e-runs", type=_positive_int, default=None, help="arrival schedules per engine for --e2e (default: 5 "
                   "on a GPU, 3 without)")
    p.add_argument("--e2e-temperatures", type=_temperatures, default=None,
                   help="comma-separated sampling temperatures for --e2e, 0 for greedy (default: 0,0.8); greedy "
                        "also runs verification and the prefix cache")
    p.add_argument("--e2e-impls", type=_choices("engine", ["default", "bi", "varlen"]), default=None,
                   help="comma-separated engines for --e2e, of default,bi,varlen (default: default,bi; varlen: the "
                        "torch default with FlashAttention's variable-length kernel, GPU only)")
    p.add_argument("--e2e-schedules", type=_positive_ints, default=None, metavar="S,...",
                   help="which of the --e2e-runs timed schedules (1..R) this process runs, comma-separated (default: "
                        "all); with --e2e-resume, each engine's row gathers the schedules of every process, so a "
                        "long run can be split over several (each also runs the warm-up schedule 0)")
    p.add_argument("--e2e-resume", type=Path, default=None, metavar="E2E_JSON",
                   help="an earlier --e2e run's e2e.json (or e2e.partial.json) with the same workload: its engines "
                        "are kept and not run again, so one run can be split over several processes (one framework "
                        "each) and still compare the frameworks' tokens")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for results.json, results.csv and plots/ (host_cost.json with --host-cost, "
                        "backward.json with --backward, e2e.json with --e2e) (default: bench-results)")
    return p


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    profile = configure()  # before any kernel package is imported
    # torch and JAX share the GPU in this process: JAX grows its pool as it
    # needs instead of taking 75 % of the memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    p = parser()
    args = p.parse_args(argv)
    e2e_only = [f"--{name.replace('_', '-')}" for name in ("e2e_requests", "e2e_runs", "e2e_temperatures", "e2e_impls",
                                                          "e2e_schedules", "e2e_resume")
                if getattr(args, name) is not None]
    if e2e_only and not args.e2e:
        p.error(f"{', '.join(e2e_only)} only apply with --e2e")

    from rich.console import Console
    from rich.progress import Progress

    from bench import report, sweep
    from harness import registry
    from harness.frameworks import installed

    missing = [fw for fw in args.frameworks if fw not in installed()]
    if missing:
        p.error(f"framework {', '.join(missing)} is not installed (pip install -e '.[{missing[0]}]')")
    if profile.native and "jax" in args.frameworks:
        problem = jax_off_the_gpu()
        if problem:
            p.error(f"{problem}; or leave JAX out with --frameworks torch")

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    gpu_only = {"host_cost": "--host-cost measures host time around GPU launches",
                "backward": "--backward times GPU kernels"}
    for mode, what in gpu_only.items():
        if getattr(args, mode):
            if not profile.native:
                p.error(f"{what}; this machine has no GPU")
            _results_folder(p, args.out)
            module = importlib.import_module(f"bench.{mode}")
            extra = {"ops": args.ops} if mode == "backward" else {}
            for path in module.run(args.out, console, args.frameworks, quick=args.quick, **extra):
                console.print(f"wrote {path}")
            return 0
    if args.e2e:
        from bench.e2e import command

        if "varlen" in (args.e2e_impls or ()) and not profile.native:
            p.error("--e2e-impls varlen runs torch's FlashAttention varlen kernel; this machine has no GPU")
        previous = None
        if args.e2e_resume is not None:
            try:
                previous = command.resumable(args.e2e_resume,
                                             command.setup_for(profile.native, args.e2e_requests, args.e2e_runs))
            except ValueError as error:
                p.error(str(error))
        runs = command.setup_for(profile.native, args.e2e_requests, args.e2e_runs).runs
        if args.e2e_schedules and max(args.e2e_schedules) > runs:
            p.error(f"--e2e-schedules {','.join(map(str, args.e2e_schedules))}: the workload has schedules 1..{runs} "
                    "(--e2e-runs)")
        _results_folder(p, args.out)
        for path in command.run(args.out, console, args.frameworks, profile.native, requests=args.e2e_requests,
                                runs=args.e2e_runs, impls=tuple(args.e2e_impls or command.IMPLS), previous=previous,
                                schedules=args.e2e_schedules,
                                **({"temperatures": args.e2e_temperatures} if args.e2e_temperatures else {})):
            console.print(f"wrote {path}")
        return 0
    specs = [registry.get(o) for o in args.ops]
    if args.features:
        # A shape belongs to ops benchmarked on shapes of its rank; a size to the rest.
        for spec in specs:
            first = spec.bench.features[0]
            rank = len(first) if isinstance(first, tuple) else 1
            wrong = [f for f in args.features if (len(f) if isinstance(f, tuple) else 1) != rank]
            if wrong:
                forms = {2: "KxN", 4: "LxHqxHkvxD"}
                want = "feature sizes" if rank == 1 else forms.get(rank, "x".join(["N"] * rank)) + \
                    " shapes such as " + "x".join(map(str, first))
                p.error(f"argument --features: {spec.name} takes {want}, not "
                        f"{', '.join('x'.join(map(str, f)) if isinstance(f, tuple) else str(f) for f in wrong)}; "
                        "pick the ops with --ops")
    native = profile.native
    if native:
        ms = args.m or list(sweep.QUICK_M if args.quick else sweep.DEFAULT_M)
        features = args.features
    else:
        why = "No GPU" if not nvidia_gpu_present() or requested_device() == "cpu" else \
            "This machine has an NVIDIA GPU, but no installed framework can use it (torch's CUDA build, or JAX " \
            "with its cuda13/cuda12 extra)"
        console.print(
            f"[yellow]{why}: kernels run in the Triton and Pallas interpreters. This run checks "
            "invariance only; it measures no meaningful time.[/yellow]"
        )
        ms = args.m or list(sweep.CPU_QUICK_M if args.quick else sweep.CPU_M)
        features = args.features or list(sweep.CPU_FEATURES)
    jobs = list(sweep.jobs(specs, args.frameworks, args.dtypes, features))
    if not jobs:
        p.error(f"no benchmark matches: {', '.join(args.ops)} in {', '.join(args.dtypes)} "
                f"with {', '.join(args.frameworks)}")
    _results_folder(p, args.out)

    copy_gbs = None
    if native:
        from bench.timing import copy_bandwidth_gbs

        copy_gbs = copy_bandwidth_gbs(args.frameworks[0])
        console.print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")

    info = report.provenance(native, copy_gbs)
    rows = []
    extra = native and not args.m and not args.quick  # the default GPU sweep: each op's extra_m too
    total = sum(len(sweep.batch_sizes(j, ms, extra)) * len(sweep.implementations(j)) for j in jobs)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sweeping", total=total)
        for job in jobs:
            progress.update(task, description=job.key)
            rows += sweep.run_job(job, ms, native, copy_gbs, lambda: progress.advance(task), extra=extra)
            if native:
                release_device_memory()
                # The results so far, after every job: a long sweep that is cut
                # off keeps what it measured.
                report.write_results(rows, info, args.out)

    report.print_table(rows, info, console)
    for path in report.write_results(rows, info, args.out):
        console.print(f"wrote {path}")
    if native:
        from bench.plots import plot_rows

        for path in plot_rows([r.as_dict() for r in rows], info, args.out / "plots"):
            console.print(f"wrote {path}")
    else:
        console.print("no plots: the interpreters measure no time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

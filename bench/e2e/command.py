"""``python -m bench --e2e``: every request of a workload served R times, each
time under another arrival schedule, by each framework's engine with its
default kernels and with the bi_ kernels; per request, how many distinct
completions the runs gave, where they first differ, and the throughput.

On a GPU: Llama-3-8B's shapes (bf16), 256 requests of 16-2048 prompt tokens
and 128 new tokens, 5 schedules; without one, a tiny model in the
interpreters (fp32), a few requests. Greedy, and seeded sampling (T = 0.8).
With greedy decoding, also: speculative verification (each request's
tokens as drafts, checked in steps of several queries) and a prefix cache
(a workload whose prompts share prefixes, warm against cold), each against
the plain run's tokens. Results to ``e2e.json`` and ``plots/e2e.png``.

Throughput is generated tokens over serving time. A JAX engine compiles each
new step shape under ``jit`` (the default's attention groups keep meeting new
ones); such a step is run twice and its second run counted
(``compiled_steps`` per run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.e2e.config import LLAMA3_8B, TINY, ModelConfig
from bench.e2e.run import Serving, run_schedule
from bench.e2e.scheduler import workload


@dataclass(frozen=True)
class Setup:
    model: ModelConfig
    dtype: str
    requests: int
    min_prompt: int
    max_prompt: int
    new_tokens: int
    runs: int
    serving: Serving


GPU = Setup(LLAMA3_8B, "bfloat16", 256, 16, 2048, 128, 5,
            Serving(token_budget=2048, max_seqs=64, page_size=16, num_pages=64 * 137, pages_per_seq=137,
                    arrival_steps=200))
CPU = Setup(TINY, "float32", 6, 3, 40, 4, 3,
            Serving(token_budget=32, max_seqs=4, page_size=16, num_pages=48, pages_per_seq=4, arrival_steps=8))


def _engine(framework: str, impl: str, setup: Setup, temperature: float, device: str):
    s = setup.serving
    if framework == "torch":
        import torch

        from bench.e2e.torch_engine import TorchEngine

        return TorchEngine(setup.model, impl=impl, num_pages=s.num_pages, page_size=s.page_size, device=device,
                           dtype=getattr(torch, setup.dtype), temperature=temperature)
    from bench.e2e.jax_engine import JaxEngine

    return JaxEngine(setup.model, impl=impl, num_pages=s.num_pages, page_size=s.page_size,
                     pages_per_seq=s.pages_per_seq, max_seqs=s.max_seqs, dtype=setup.dtype, temperature=temperature)


SPECULATE = 3  # draft tokens per verification step


def _variants(engine, setup: Setup, single: dict, work) -> dict:
    """Greedy only: (1) verification, the workload again (another schedule)
    with each request's single-decode tokens as drafts, ``SPECULATE`` at a
    time; (2) a prefix cache, on a workload whose prompts share 4 prefixes,
    cold against warm (two schedules). Requests whose tokens agree, each."""
    s = setup.serving
    verified = run_schedule(engine, work, s, schedule_seed=setup.runs + 1, drafts=single, speculate=SPECULATE)
    prefix = max(s.page_size, setup.max_prompt // 4 // s.page_size * s.page_size)
    shared = workload(max(8, setup.requests // 4), setup.min_prompt, setup.max_prompt - prefix, setup.new_tokens,
                      setup.model.vocab, seed=1, shared_prefixes=4, prefix_tokens=prefix)
    cold = run_schedule(engine, shared, s, schedule_seed=setup.runs + 2)
    warm = run_schedule(engine, shared, s, schedule_seed=setup.runs + 3, prefix_cache=True)
    return {"verification": {"speculate": SPECULATE, "requests": len(single),
                             "same_tokens": sum(verified["completions"][r] == single[r] for r in single),
                             "steps": len(verified["steps"]), "tokens_per_s": verified["generated"] / verified["seconds"]},
            "prefix_cache": {"requests": len(cold["completions"]), "prefix_tokens": prefix,
                             "same_tokens": sum(warm["completions"][r] == cold["completions"][r]
                                                for r in cold["completions"]),
                             "reused_prompt_tokens": warm["reused_prompt_tokens"],
                             "cold_seconds": cold["seconds"], "warm_seconds": warm["seconds"]}}


def _release(framework: str) -> None:
    import gc

    gc.collect()
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _share_jax_compilations() -> None:
    """Each engine jits its own layer function, so a second engine of the
    same kernels (another temperature) would compile every shape again; an
    on-disk compilation cache for this process lets it reuse them (the
    default engine meets ~100 attention-group shapes over 6 schedules).
    A cache the user configured is kept. GPU runs only (the CPU run's tiny
    model compiles fast, and a test process keeps its configuration)."""
    import tempfile

    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bi-e2e-xla-"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


IMPLS = ("default", "bi")  # the engines a run has by default; "varlen" (torch, GPU) on request


def _setup_dict(setup: Setup) -> dict:
    return json.loads(json.dumps({**asdict(setup), "model": asdict(setup.model)}))


def _digests(completions: dict) -> dict:
    """Each request's completion as a digest of its token ids (what the
    cross-framework comparison needs, small enough to keep in e2e.json)."""
    return {str(r): hashlib.sha256(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:16]
            for r, tokens in completions.items()}


# What a result row must hold to be kept, compared and plotted.
_ROW_KEYS = frozenset({"framework", "impl", "temperature", "runs", "tokens_per_s", "distinct_per_request"})


def resumable(path: Path, setup: Setup) -> dict:
    """The results of an earlier ``e2e.json`` or ``e2e.partial.json`` to build
    on; it must have been run with the same setup."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"--e2e-resume {path}: not a readable e2e.json ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or "setup" not in data:
        raise ValueError(f"--e2e-resume {path}: not an e2e.json (no setup and list of results)")
    if not all(isinstance(row, dict) and _ROW_KEYS <= row.keys() for row in data["results"]):
        raise ValueError(f"--e2e-resume {path}: not an e2e.json (a result row without {', '.join(sorted(_ROW_KEYS))})")
    if any("completion_digests" not in row for row in data["results"]):
        raise ValueError(f"--e2e-resume {path}: written before e2e.json kept the completions' digests, which the "
                         "cross-framework comparison needs; run those engines again")
    ours = _setup_dict(setup)
    if data["setup"] != ours:
        theirs = data["setup"] if isinstance(data["setup"], dict) else {}
        differ = ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(set(theirs) | set(ours))
                           if theirs.get(k) != ours.get(k))
        raise ValueError(f"--e2e-resume {path}: run with another setup ({differ}); pass the same --e2e-requests and "
                         "--e2e-runs on the same kind of device")
    return data


def pack_tokens(completions: dict) -> dict:
    """Each request's token ids, compact enough for e2e.json (int32,
    zlib-compressed, base64): a later process needs one schedule's tokens to
    place the first divergence of the schedules it runs."""
    rids = sorted(completions)
    flat = np.concatenate([np.asarray(completions[r], np.int32) for r in rids]) if rids else np.zeros(0, np.int32)
    return {"requests": rids, "lengths": [len(completions[r]) for r in rids],
            "tokens": base64.b64encode(zlib.compress(flat.astype("<i4").tobytes(), 9)).decode("ascii")}


def unpack_tokens(packed: dict) -> dict:
    flat = np.frombuffer(zlib.decompress(base64.b64decode(packed["tokens"])), "<i4")
    out, at = {}, 0
    for rid, n in zip(packed["requests"], packed["lengths"]):
        out[rid] = flat[at:at + n].tolist()
        at += n
    return out


def _first_difference(a, b) -> int | None:
    """The first token position where two completions differ (None: equal)."""
    if list(a) == list(b):
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _schedule_entry(run: dict, reference: dict) -> dict:
    """One timed schedule of an engine: its timing, each request's digest and
    first difference from the engine's reference schedule."""
    return {"seconds": run["seconds"], "steps": len(run["steps"]), "compiled_steps": run["compiled_steps"],
            "generated": run["generated"], "digests": _digests(run["completions"]),
            "first_difference": {str(r): _first_difference(reference[r], run["completions"][r]) for r in reference}}


def _summarise(row: dict) -> dict:
    """The row's figures from its schedules (those of every process that ran
    this engine): distinct completions per request (digests), the first
    divergence (the earliest first difference from the reference schedule:
    where two schedules part, one of them parts from the reference there or
    earlier), tokens/s over the median schedule."""
    sched = row["schedules"]
    seeds = sorted(sched, key=int)
    rids = list(sched[seeds[0]]["digests"])
    per_request = {r: len({sched[s]["digests"][r] for s in seeds}) for r in rids}
    first = {r: min((d for d in (sched[s]["first_difference"][r] for s in seeds) if d is not None), default=None)
             for r in rids}
    counts, firsts = list(per_request.values()), [f for f in first.values() if f is not None]
    seconds = [sched[s]["seconds"] for s in seeds]
    row.update({"runs": len(seeds), "schedule_seeds": [int(s) for s in seeds], "requests": len(counts),
                "requests_with_one_completion": counts.count(1), "max_distinct": max(counts),
                "mean_distinct": statistics.fmean(counts),
                "first_divergence_median": statistics.median(firsts) if firsts else None,
                "tokens_per_s": sched[seeds[0]]["generated"] / statistics.median(seconds), "seconds": seconds,
                "steps": [sched[s]["steps"] for s in seeds], "compiled_steps": [sched[s]["compiled_steps"] for s in seeds],
                "distinct_per_request": per_request, "first_divergence_per_request": first,
                "completion_digests": sched[str(row["reference"]["schedule"])]["digests"]})
    return row


def _todo(row: dict | None, schedules, temperature: float) -> tuple[list[int], bool]:
    """The schedules still to run for an engine with the resumed ``row``, and
    whether its verification and prefix-cache runs are (greedy only). A row
    from before e2e.json kept schedules counts as complete."""
    if row is not None and "schedules" not in row:
        return [], False
    have = set(row["schedules"]) if row is not None else set()
    return [s for s in schedules if str(s) not in have], temperature == 0 and (row is None or "verification" not in row)


def measure(setup: Setup, frameworks, temperatures, device: str, console=None, partial: Path | None = None,
            impls=IMPLS, previous: dict | None = None, schedules=None) -> dict:
    """Every (framework, temperature, impl of ``impls``): the timed schedules
    ``schedules`` (default 1..R) after one warm-up run under schedule 0
    (compilations; not counted). ``partial``: a JSON file rewritten with the
    rows so far after each engine (a run cut by a time limit keeps them).
    ``previous``: an earlier run's results (``resumable``); its rows are kept,
    and an engine runs only the schedules its row lacks, merged into the row,
    so that one run can be split over processes (each framework, or a few
    schedules of one engine, in its own) and still count every schedule and
    compare the frameworks."""
    schedules = list(range(1, setup.runs + 1)) if schedules is None else sorted(set(schedules))
    if not schedules or not all(1 <= s <= setup.runs for s in schedules):
        raise ValueError(f"schedules must be among 1..{setup.runs} (the setup's runs), got {schedules}")
    if "jax" in frameworks and device != "cpu":
        _share_jax_compilations()
    work = workload(setup.requests, setup.min_prompt, setup.max_prompt, setup.new_tokens, setup.model.vocab)
    results = [dict(r) for r in previous["results"]] if previous else []
    index = {(r["framework"], r["temperature"], r["impl"]): i for i, r in enumerate(results)}
    for framework in frameworks:
        for temperature in temperatures:
            for impl in impls:
                if impl == "varlen" and framework != "torch":
                    continue  # torch's FlashAttention varlen default; JAX has no such kernel
                key = (framework, temperature, impl)
                row = results[index[key]] if key in index else None
                todo, variants = _todo(row, schedules, temperature)
                if not todo and not variants:
                    if console is not None and row is not None:
                        console.print(f"e2e {framework} {impl} T={temperature}: kept from the resumed run")
                    continue
                engine = _engine(framework, impl, setup, temperature, device)
                run_schedule(engine, work, setup.serving, schedule_seed=0)

                def keep(row, key=key):
                    # The row so far into the results, and the partial file
                    # rewritten: a run cut by a time limit keeps every
                    # schedule that finished.
                    _summarise(row)
                    if key not in index:
                        index[key] = len(results)
                        results.append(row)
                    results[index[key]] = row
                    if partial is not None:
                        partial.parent.mkdir(parents=True, exist_ok=True)
                        partial.write_text(json.dumps({"setup": _setup_dict(setup), "results": results}, indent=1))

                for s in todo:
                    run = run_schedule(engine, work, setup.serving, schedule_seed=s)
                    if row is None:
                        row = {"framework": framework, "impl": impl, "temperature": temperature, "schedules": {},
                               "reference": {"schedule": s, **pack_tokens(run["completions"])}}
                    entry = _schedule_entry(run, unpack_tokens(row["reference"]))
                    row["schedules"] = dict(sorted({**row["schedules"], str(s): entry}.items(),
                                                   key=lambda kv: int(kv[0])))
                    keep(row)
                if variants:
                    if row is None:  # no schedule ran here or before: nothing to verify against
                        raise ValueError(f"e2e {framework} {impl}: verification needs a timed schedule first")
                    row.update(_variants(engine, setup, unpack_tokens(row["reference"]), work))
                    keep(row)
                if console is not None:
                    console.print(f"e2e {framework} {impl} T={temperature}: schedules {', '.join(map(str, todo))} run "
                                  f"({row['runs']} of {setup.runs} kept): {row['requests_with_one_completion']}/"
                                  f"{row['requests']} requests with one completion, {row['tokens_per_s']:.0f} tok/s")
                del engine
                _release(framework)
    rows = {(r["framework"], r["temperature"], r["impl"]): r for r in results}
    for (framework, temperature, impl), row in rows.items():
        base, varlen = rows.get((framework, temperature, "default")), rows.get((framework, temperature, "varlen"))
        if impl == "bi" and base is not None:
            row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        if impl == "bi" and varlen is not None:
            row["throughput_ratio_vs_varlen"] = row["tokens_per_s"] / varlen["tokens_per_s"]
    cross = []
    for temperature in sorted({r["temperature"] for r in results}):
        a, b = rows.get(("torch", temperature, "bi")), rows.get(("jax", temperature, "bi"))
        if a is not None and b is not None:
            a, b = a["completion_digests"], b["completion_digests"]
            cross.append({"temperature": temperature, "requests": len(a), "same_tokens": sum(a[r] == b.get(r) for r in a)})
    return {"setup": _setup_dict(setup), "results": results, "cross_framework": cross}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    # Engines cut short (a time limit) ran fewer schedules: each says how many.
    mixed = len({r["runs"] for r in rows}) > 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in rows:
        counts = sorted(row["distinct_per_request"].values(), reverse=True)
        # Equal curves overlap: JAX's drawn wider, under torch's; defaults dashed.
        jax = row["framework"] == "jax"
        runs = f", {row['runs']} runs" if mixed else ""
        left.plot(range(len(counts)), counts, label=f"{row['framework']} {row['impl']} T={row['temperature']}{runs}",
                  drawstyle="steps-post", linestyle="--" if row["impl"] == "default" else "-",
                  linewidth=4 if jax else 1.5, alpha=0.5 if jax else 1.0, zorder=1 if jax else 2)
    left.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_xlabel("request (sorted)")
    left.set_ylabel("distinct completions" if mixed else f"distinct completions in {rows[0]['runs']} runs")
    left.legend(fontsize=7)
    labels = [f"{r['framework']}\n{r['impl']}\nT={r['temperature']}" for r in rows]
    right.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
              color=["tab:blue" if r["impl"] == "bi" else "tab:gray" for r in rows])
    right.set_xticks(range(len(rows)), labels, fontsize=7)
    right.set_ylabel("generated tokens / s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setup_for(native: bool, requests=None, runs=None) -> Setup:
    """The GPU or CPU setup, with the command line's request and run counts."""
    setup = GPU if native else CPU
    if requests is not None or runs is not None:
        from dataclasses import replace

        setup = replace(setup, requests=requests or setup.requests, runs=runs or setup.runs)
    return setup


def run(out: Path, console, frameworks, native: bool, *, requests=None, runs=None, temperatures=(0.0, 0.8),
        impls=IMPLS, previous: dict | None = None, schedules=None) -> list[Path]:
    """``previous``: an earlier run's results of the same setup
    (``resumable``); its engines' schedules are kept, the missing ones of
    ``schedules`` (default all) run, and e2e.json holds them all (the
    cross-framework comparison included)."""
    setup = setup_for(native, requests, runs)
    start = time.perf_counter()
    data = measure(setup, frameworks, temperatures, "cuda" if native else "cpu", console,
                   partial=out / "e2e.partial.json", impls=impls, previous=previous, schedules=schedules)
    data["wall_seconds"] = time.perf_counter() - start
    from rich.table import Table

    table = Table(title=f"continuous batching, {setup.requests} requests x {setup.runs} schedules")
    for col in ("framework", "impl", "T", "one completion", "max distinct", "first divergence (median)", "tok/s",
                "ratio"):
        table.add_column(col)
    for r in data["results"]:
        table.add_row(r["framework"], r["impl"], str(r["temperature"]),
                      f"{r['requests_with_one_completion']}/{r['requests']}", str(r["max_distinct"]),
                      "-" if r["first_divergence_median"] is None else str(r["first_divergence_median"]),
                      f"{r['tokens_per_s']:.0f}",
                      f"{r['throughput_ratio']:.2f}x" if "throughput_ratio" in r else "-")
    console.print(table)
    if not native:
        console.print("(the CPU interpreters: tokens/s and their ratios say nothing of the kernels' speed; the "
                      "counts of completions and the cross-framework tokens are the result)")
    for r in data["results"]:
        if r["runs"] < setup.runs:
            console.print(f"{r['framework']} {r['impl']} T={r['temperature']}: {r['runs']} of {setup.runs} schedules so "
                          f"far ({', '.join(map(str, r.get('schedule_seeds', [])))}); --e2e-resume e2e.json with "
                          "--e2e-schedules runs the others")
    for r in data["results"]:
        if "verification" in r:
            v, c = r["verification"], r["prefix_cache"]
            console.print(f"{r['framework']} {r['impl']}: verification of {v['speculate']} drafts gave the single "
                          f"decodes' tokens for {v['same_tokens']}/{v['requests']} requests; a warm prefix cache "
                          f"({c['reused_prompt_tokens']} prompt tokens reused) gave the cold tokens for "
                          f"{c['same_tokens']}/{c['requests']}")
    for c in data["cross_framework"]:
        console.print(f"bi_torch and bi_jax, T={c['temperature']}: {c['same_tokens']}/{c['requests']} requests "
                      "with the same tokens")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "e2e.json"
    path.write_text(json.dumps(data, indent=1))
    (out / "e2e.partial.json").unlink(missing_ok=True)
    plot(data, out / "plots" / "e2e.png")
    return [path, out / "plots" / "e2e.png"]


def main(argv: list[str] | None = None) -> int:
    """Re-plot committed e2e results, merging the rows of several files (runs
    of one framework each, say)::

        python -m bench.e2e.command --out e2e.png e2e-jax.json e2e-torch.json
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.e2e.command",
                                description="Re-plot committed e2e results, the rows of several files merged.")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("files", type=Path, nargs="+", help="e2e.json (or e2e.partial.json) files")
    args = p.parse_args(argv)
    if args.out.suffix.lower() not in (".png", ".svg", ".pdf"):
        p.error(f"--out {args.out}: write a .png, .svg or .pdf")
    rows = []
    for path in args.files:
        try:
            found = json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as error:  # ValueError: not UTF-8 or not JSON
            p.error(f"{path}: not an e2e.json ({type(error).__name__}: {error})")
        if not isinstance(found, list) or not all(isinstance(r, dict) and _ROW_KEYS <= r.keys() for r in found):
            p.error(f"{path}: not an e2e.json (a result row without {', '.join(sorted(_ROW_KEYS))})")
        rows += found
    if not rows:
        p.error("the files hold no result rows")
    plot({"results": rows}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

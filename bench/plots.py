"""PNG plots of benchmark results: one figure per op, one panel per shape.

Compute-bound ops (a spec whose bound is "compute") plot TFLOP/s against the
number of tokens; the others plot time per call. Both axes are logarithmic, with one line per
implementation (framework default and bi_ kernel in each framework), so the
figures read at a glance: where the bi_ line sits on or above its default, the
invariance costs nothing. Ops come from the rows, so a new op needs no code.

Re-plot committed results (several files are merged, e.g. separate torch and
JAX runs)::

    python -m bench.plots --out DIR [--ops matmul] results.json [more/results.json ...]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from bench.report import read_results

# framework, impl -> legend label and style: defaults dashed, bi_ solid.
_LABELS = {
    ("torch", "default"): ("torch default", "tab:green", "--"),
    ("torch", "bi"): ("bi_torch", "tab:blue", "-"),
    ("jax", "default"): ("XLA default", "tab:red", "--"),
    ("jax", "bi"): ("bi_jax", "tab:orange", "-"),
}


def _label(op: str, framework: str, impl: str) -> tuple[str, str, str]:
    """Legend text, colour and line style; a default is named by its op's spec."""
    from harness import registry

    if impl.startswith("bi_") and (framework, "bi") in _LABELS:
        # A variant of the bi_ kernel (the spec's Bench.variants): its colour, dotted.
        text, color, _ = _LABELS[(framework, "bi")]
        return f"{text} ({impl[3:]})", color, ":"
    text, color, style = _LABELS.get((framework, impl), (f"{framework} {impl}", None, "-"))
    if impl == "default" and op in registry.names():
        spec_impl = registry.get(op).impl(framework)
        text = spec_impl.label if spec_impl is not None and spec_impl.label else text
    return text, color, style


def _timed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("median_us") not in (None, 0) and r["median_us"] == r["median_us"]]


def plot_rows(rows: list[dict], provenance: dict, out: Path) -> list[Path]:
    """Write ``<op>_<dtype>.png`` under ``out`` for every op and dtype with
    timings; returns the paths (none for interpreter runs, which have no times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harness import registry

    rows = _timed(rows)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"])].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, dtype), op_rows in sorted(groups.items()):
        shapes = sorted({str(r["features"]) for r in op_rows}, key=lambda s: [int(x) for x in s.split("x")])
        bench = registry.get(op).bench if op in registry.names() else None
        compute = all(r["unit"] == "TFLOP/s" for r in op_rows)
        rates = compute or (bench is not None and bench.plot_throughput)
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False, sharey=rates)
        for ax, shape in zip(axes[0], shapes):
            lines: dict[tuple[str, str], list[dict]] = defaultdict(list)
            for r in op_rows:
                if str(r["features"]) == shape:
                    lines[(r["framework"], r["impl"])].append(r)
            for (fw, impl), pts in sorted(lines.items(), key=lambda kv: (kv[0][0] != "torch", kv[0][1] == "bi")):
                pts.sort(key=lambda r: r["m"])
                text, color, style = _label(op, fw, impl)
                ys = [r["throughput"] if rates else r["median_us"] for r in pts]
                ax.plot([r["m"] for r in pts], ys, style, color=color, marker="o", markersize=3, label=text)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            note = bench.shape_note if bench is not None else "K x N"
            ax.set_title(f"{op} {shape}" + (f"\n({note})" if "x" in shape else ""), fontsize=10)
            ax.set_xlabel(bench.batch_axis if bench is not None else "# tokens (M)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(op_rows[0]["unit"] if rates else "time per call (us)")
        max(reversed(axes[0]), key=lambda a: len(a.get_lines())).legend(fontsize=8)  # the panel with every line
        device = provenance.get("device", "?")
        fig.suptitle(f"{op}, {dtype}, {device}", fontsize=11)
        fig.tight_layout()
        path = out / f"{op}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if bench is not None and bench.length_axis and rates:
            written.append(_plot_by_length(plt, op, dtype, op_rows, bench, provenance, out))
    return written


def _plot_by_length(plt, op, dtype, rows, bench, provenance, out: Path) -> Path:
    """Throughput against the feature tuple's first element (a sequence
    length): one line per implementation and batch size, over the shapes
    that agree in the rest of the tuple (the first such group)."""
    rest = sorted({tuple(str(r["features"]).split("x")[1:]) for r in rows})[0]
    lines: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in rows:
        dims = str(r["features"]).split("x")
        if tuple(dims[1:]) == rest:
            lines[(r["framework"], r["impl"], r["m"])].append(r)
    fig, ax = plt.subplots(figsize=(8.6, 4.4))
    batches = sorted({m for _, _, m in lines})
    markers = dict(zip(batches, "os^vD*"))
    for (fw, impl, m), pts in sorted(lines.items(), key=lambda kv: (kv[0][0] != "torch", kv[0][1] == "bi", kv[0][2])):
        if m not in markers:
            continue
        pts.sort(key=lambda r: int(str(r["features"]).split("x")[0]))
        text, color, style = _label(op, fw, impl)
        ax.plot([int(str(r["features"]).split("x")[0]) for r in pts], [r["throughput"] for r in pts], style,
                color=color, marker=markers[m], markersize=4, label=f"{text}, {m}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(bench.length_axis)
    ax.set_ylabel(rows[0]["unit"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title=bench.batch_axis, title_fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    note = "x".join(("*", *rest))
    ax.set_title(f"{op} {note} ({bench.shape_note}), {dtype}, {provenance.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    path = out / f"{op}_{dtype}_by_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files (rows are merged)")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    p.add_argument("--ops", help="comma-separated op names to plot (default: all in the files)")
    args = p.parse_args(argv)
    ops = set(args.ops.split(",")) if args.ops else None
    rows, provenance = [], {}
    for path in args.results:
        data = read_results(path)
        rows += [r for r in data["rows"] if ops is None or r["op"] in ops]
        provenance = provenance or data["provenance"]
    written = plot_rows(rows, provenance, args.out)
    if not written:
        print("no timed rows (interpreter runs measure no time): nothing to plot")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

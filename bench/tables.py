"""Markdown tables of saved results: the results page of the docs.

    python -m bench.tables bench/results/h100/results.json --out docs/results.md
    python -m bench.tables bench/results/h100/results.json [--m 1,16,256,4096] [--ops matmul] [--features 4096]

One table per op: a row per M, a column per framework and shape, each cell the
bi_ kernel's time per call in us and its ratio to the default of the same run
(> 1: faster than the default), then the rows of each default that changed with
the batch. With ``--out`` the tables are written as a page with the run's
provenance (device, versions, commits, timing methods); without, printed.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from bench.report import read_results


def _shape_key(features: str) -> list[int]:
    return [int(v) for v in str(features).split("x")]


def _us(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def op_tables(
    rows: list[dict], ms: list[int] | None = None, ops: set[str] | None = None, features: set[str] | None = None
) -> str:
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if (ops is None or r["op"] in ops) and (features is None or str(r["features"]) in features):
            by_op[r["op"]].append(r)
    parts = []
    for op, op_rows in by_op.items():
        cells = {(r["framework"], str(r["features"]), r["m"]): r for r in op_rows if r["impl"] == "bi"}
        cols = sorted({(fw, f) for fw, f, _ in cells}, key=lambda c: (c[0] != "torch", _shape_key(c[1])))
        op_ms = sorted({m for _, _, m in cells if ms is None or m in ms})
        head = "| M | " + " | ".join(f"bi_{fw} {f}" for fw, f in cols) + " |"
        lines = [f"**{op}** (us per call, x default)", "", head, "|---" * (len(cols) + 1) + "|"]
        for m in op_ms:
            vals = []
            for fw, f in cols:
                r = cells.get((fw, f, m))
                ok = r is not None and r.get("median_us") and r.get("ratio_to_default")
                vals.append(f"{_us(r['median_us'])} ({r['ratio_to_default']:.2f}x)" if ok else "-")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        varied = defaultdict(list)
        for r in op_rows:
            if r["rows_differing"]:
                varied[(r["framework"], r["impl"], str(r["features"]))].append(f"{r['m']} ({r['rows_differing']})")
        lines.append("")
        if not varied:
            lines.append("No implementation's rows changed with the batch.")
        for (fw, impl, f), where in sorted(varied.items()):
            lines.append(f"- {fw} {impl} {f}: rows changed at M = {', '.join(where)}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _bandwidth(gbs) -> str:
    return f"{gbs:.0f} GB/s" if gbs else "not measured"


def page(payload: dict, source: str, ms: list[int] | None = None) -> str:
    """The results page: provenance, how the times were taken, the tables."""
    info, rows = payload["provenance"], payload["rows"]
    runs = info.get("runs") or [{"commit": info.get("commit"), "date": info.get("date")}]
    commits = ", ".join(sorted({str(r["commit"]) for r in runs}))
    # One line per kind of timing (the call and set counts vary by point).
    methods = sorted({re.sub(r"\d+", "N", f"{r['framework']}: {r['timing']}") for r in rows if r.get("median_us")})
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "jax", "jaxlib") if info.get(k))
    lines = [
        f"# Results: {info.get('device', '?')}",
        "",
        f"Written by `python -m bench.tables {source} --out ...` from the committed results; do not edit by hand.",
        "",
        f"- Device: {info.get('device', '?')}, driver {info.get('driver', '?')}, CUDA {info.get('cuda', '?')}",
        f"- Versions: {versions}",
        f"- Commits: {commits} ({len(runs)} run(s), the last on {info.get('date', '?')})",
        f"- Copy bandwidth measured in the run(s): {_bandwidth(info.get('copy_bandwidth_gbs'))} (read + write)",
        "- Cells: the bi_ kernel's time per call in us, and in brackets the default's time over bi_'s in the "
        "same run (> 1: bi_ is faster). Rows changed: rows of an M-row call whose bits differ from the same "
        "rows computed in the largest batch of the sweep.",
        "- Timing:",
        *[f"  - {m}" for m in methods],
        "",
        op_tables(rows, ms),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.json")
    p.add_argument("--m", help="comma-separated M values to show (default: all)")
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--features", help="comma-separated shapes, e.g. 4096,4096x14336 (default: all)")
    p.add_argument("--out", type=Path, help="write the results page (Markdown) here instead of printing the tables")
    args = p.parse_args(argv)
    payload = read_results(args.results)
    ms = [int(v) for v in args.m.split(",")] if args.m else None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page(payload, str(args.results), ms))
        print(f"wrote {args.out}")
        return 0
    ops = set(args.ops.split(",")) if args.ops else None
    features = set(args.features.split(",")) if args.features else None
    print(op_tables(payload["rows"], ms, ops, features))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Markdown tables of saved results, for the README and notes.

    python -m bench.tables bench/results/h100/results.json [--m 1,16,256,4096] [--ops matmul] [--features 4096]

One table per op: a row per M, a column per framework and shape, each cell the
bi_ kernel's time per call in us and its ratio to the default of the same run
(> 1: faster than the default), then the rows of each default that changed with
the batch.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a results.json")
    p.add_argument("--m", help="comma-separated M values to show (default: all)")
    p.add_argument("--ops", help="comma-separated op names (default: all)")
    p.add_argument("--features", help="comma-separated shapes, e.g. 4096,4096x14336 (default: all)")
    args = p.parse_args(argv)
    rows = json.loads(args.results.read_text())["rows"]
    ms = [int(v) for v in args.m.split(",")] if args.m else None
    ops = set(args.ops.split(",")) if args.ops else None
    features = set(args.features.split(",")) if args.features else None
    print(op_tables(rows, ms, ops, features))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

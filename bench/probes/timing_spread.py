"""How far repeated benchmark runs of the same code disagree.

Given two or more ``results.json`` of the same points (same commit, same
device), prints per framework and implementation the spread of the bi_
kernel's ratio to the default (largest minus smallest ratio over the runs)
and of the median times, point by point and in summary::

    python -m bench.probes.timing_spread run1/results.json run2/results.json [--label new]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from bench.report import read_results

_KEY = ("op", "framework", "features", "dtype", "m")


def spreads(payloads: list[dict]) -> dict[tuple, dict[str, float]]:
    """Per point: the spread of the bi_ ratio and of each implementation's
    median time (relative: largest over smallest, minus one)."""
    points: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for payload in payloads:
        for r in payload["rows"]:
            key = tuple(r[k] for k in _KEY)
            if r.get("median_us"):
                points[key][f"{r['impl']}_us"].append(r["median_us"])
            if r["impl"] == "bi" and r.get("ratio_to_default"):
                points[key]["ratio"].append(r["ratio_to_default"])
    out = {}
    for key, series in points.items():
        if any(len(v) < len(payloads) for v in series.values()):
            continue  # a point some run did not measure
        out[key] = {
            name: (max(v) - min(v)) if name == "ratio" else (max(v) / min(v) - 1.0) for name, v in series.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.timing_spread", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files of repeated runs")
    p.add_argument("--label", default="", help="a name for this set of runs in the summary")
    args = p.parse_args(argv)
    if len(args.results) < 2:
        p.error("give at least two results.json")
    table = spreads([read_results(path) for path in args.results])
    if not table:
        p.error("the runs share no timed point")
    for key in sorted(table, key=lambda k: tuple(str(v) for v in k)):
        cells = "  ".join(f"{name} {value:.3f}" for name, value in sorted(table[key].items()))
        print(" ".join(str(v) for v in key), " ", cells)
    by_framework: dict[str, list[float]] = defaultdict(list)
    for key, values in table.items():
        if "ratio" in values:
            by_framework[key[1]].append(values["ratio"])
    for framework, values in sorted(by_framework.items()):
        values.sort()
        print(f"{args.label} {framework}: {len(values)} points, ratio spread median {values[len(values) // 2]:.3f}, "
              f"max {values[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Merge the results of several runs of ``python -m bench`` on one device.

A full sweep takes longer than one sitting on a lent GPU may, so it can be run
in parts (``--ops``, ``--frameworks``, ``--features``) and merged::

    python -m bench.merge --out bench/results/h100 part1/results.json part2/results.json

Rows keep the commit and date of the run that measured them; where two files
measure the same point (op, framework, implementation, shape, dtype, M), the
later file wins. Runs on different devices or library versions are refused:
their timings do not compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.plots import plot_rows
from bench.report import read_results, write_results

# Provenance that must agree for rows to share one table.
_SAME = ("device", "driver", "cuda", "torch", "triton", "jax", "jaxlib", "mode")
_KEY = ("op", "framework", "impl", "features", "dtype", "m")


def merge(payloads: list[dict]) -> tuple[list[dict], dict]:
    """The merged rows and a provenance listing every run's commit and date."""
    if not payloads:
        raise ValueError("no results to merge")
    first = payloads[0]["provenance"]
    merged: dict[tuple, dict] = {}
    runs = []
    for payload in payloads:
        info = payload["provenance"]
        for field in _SAME:
            if info.get(field) != first.get(field):
                raise ValueError(
                    f"cannot merge runs with different {field}: {first.get(field)!r} and {info.get(field)!r}"
                )
        runs.append({"commit": info["commit"], "date": info["date"], "rows": len(payload["rows"])})
        for row in payload["rows"]:
            merged[tuple(row[k] for k in _KEY)] = {**row, "commit": info["commit"], "date": info["date"]}
    commits = sorted({r["commit"] for r in runs})
    info = {**first, "commit": ",".join(commits), "date": max(r["date"] for r in runs), "runs": runs}
    return list(merged.values()), info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files, earliest first")
    p.add_argument("--out", type=Path, required=True, help="directory for the merged results.json, results.csv and PNGs")
    args = p.parse_args(argv)
    rows, info = merge([read_results(path) for path in args.results])
    for path in write_results(rows, info, args.out) + plot_rows(rows, info, args.out / "plots"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

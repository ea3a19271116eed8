"""Provenance, terminal table and result files."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.sweep import Row


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _git_commit() -> str:
    if os.environ.get("BI_COMMIT"):  # for copies of the tree without .git
        return os.environ["BI_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(native: bool, copy_gbs: float | None) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "mode": "gpu" if native else "cpu-interpreters (invariance only; no meaningful timings)",
        "copy_bandwidth_gbs": copy_gbs,
    }
    if native:
        from harness.frameworks import installed

        if "torch" in installed():
            import torch

            info["device"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
        else:
            import jax

            info["device"] = jax.devices()[0].device_kind
            info["cuda"] = "unknown"
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[Row], info: dict, console: Console) -> None:
    title = f"{info['device']} | torch {info['torch']} triton {info['triton']} jax {info['jax']} | {info['commit']}"
    table = Table(title=title, show_lines=False)
    for col in ("op", "fw", "impl", "N", "dtype", "M", "median us", "p20-p80 us", "throughput", "% copy BW", "x default", "rows differing"):
        table.add_column(col, justify="right" if col not in ("op", "fw", "impl", "dtype") else "left")
    for r in rows:
        spread = f"{_fmt(r.p20_us, '.2f')}-{_fmt(r.p80_us, '.2f')}" if r.p20_us is not None else "-"
        differ = f"{r.rows_differing}/{r.m}"
        table.add_row(
            r.op, r.framework, r.impl, str(r.features), r.dtype, str(r.m),
            _fmt(r.median_us, ".2f"), spread, f"{_fmt(r.throughput, '.1f')} {r.unit}",
            _fmt(r.pct_of_ceiling, ".0f"), _fmt(r.ratio_to_default, ".2f"),
            f"[red]{differ}[/red]" if r.rows_differing else differ,
        )
    console.print(table)
    console.print(
        "rows differing: rows of the M-row result whose bits differ from the same rows computed in the "
        f"batch of {max((r.m for r in rows), default=0)}. x default: default time / this time."
    )
    methods = sorted({f"{r.framework}: {r.timing}" for r in rows})
    for m in methods:
        console.print(f"timing {m}")


def strict(value):
    """``value`` with every NaN float replaced by None, so that it serialises
    as strict JSON (``null``); parsers that follow RFC 8259 reject ``NaN``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_results(rows: list[Row] | list[dict], info: dict, out: Path) -> list[Path]:
    """``results.json`` (strict JSON: no NaN) and ``results.csv`` under
    ``out``. Rows are ``Row``s or their dicts; a dict may carry its own
    ``commit`` and ``date`` (merged runs)."""
    out.mkdir(parents=True, exist_ok=True)
    dicts = [strict(r if isinstance(r, dict) else r.as_dict()) for r in rows]
    payload = {"provenance": strict(info), "rows": dicts}
    json_path = out / "results.json"
    json_path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        fields = list(Row.__dataclass_fields__) + ["device", "commit", "date"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in dicts:
            writer.writerow({"device": info["device"], "commit": info["commit"], "date": info["date"], **r})
    return [json_path, csv_path]


def read_results(path: Path) -> dict:
    """A ``results.json``; runs written before results were strict JSON may
    hold bare ``NaN`` tokens, which are read as None."""
    return strict(json.loads(path.read_text()))

"""``python -m bench`` runs end to end (through the interpreters without a GPU)."""

from __future__ import annotations

import json

from bench.__main__ import main
from tests_profile import PROFILE


def test_bench_writes_results_with_invariance_column(tmp_path):
    args = ["--ops", "rms_norm", "--m", "1,3,8", "--out", str(tmp_path)]
    if not PROFILE.native:
        args += ["--features", "64"]
    else:
        args += ["--features", "4096"]
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert {(r["framework"], r["impl"]) for r in rows} == {
        ("torch", "bi"), ("torch", "default"), ("jax", "bi"), ("jax", "default")
    }
    assert sorted({r["m"] for r in rows}) == [1, 3, 8]
    # The bi_ kernels never change a row's bits with the batch.
    assert all(r["rows_differing"] == 0 for r in rows if r["impl"] == "bi")
    assert data["provenance"]["jax"] and data["provenance"]["torch"]
    assert (tmp_path / "results.csv").read_text().startswith("op,framework,impl")
    if PROFILE.native:
        assert all(r["median_us"] > 0 for r in rows)


def _row(op, fw, impl, features, m, us, unit):
    return {"op": op, "framework": fw, "impl": impl, "features": features, "dtype": "bfloat16", "m": m,
            "median_us": us, "throughput": 1e3 / us, "unit": unit}


def test_plots_one_png_per_op_and_dtype(tmp_path):
    from bench.plots import main as plots_main
    from bench.plots import plot_rows

    rows = [
        _row(op, fw, impl, feat, m, 10.0 * m ** 0.5 + (impl == "bi"), unit)
        for op, feat, unit in (("matmul", "64x96", "TFLOP/s"), ("matmul", "128x64", "TFLOP/s"), ("rms_norm", "64", "GB/s"))
        for fw in ("torch", "jax") for impl in ("default", "bi") for m in (1, 2, 4, 8)
    ]
    written = plot_rows(rows, {"device": "test"}, tmp_path)
    assert sorted(p.name for p in written) == ["matmul_bfloat16.png", "rms_norm_bfloat16.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in written)
    # Interpreter rows carry no times: nothing to plot.
    untimed = [{**r, "median_us": None} for r in rows]
    assert plot_rows(untimed, {"device": "cpu"}, tmp_path / "none") == []
    # The CLI merges files and filters ops.
    (tmp_path / "a.json").write_text(json.dumps({"provenance": {"device": "test"}, "rows": rows[:16]}))
    (tmp_path / "b.json").write_text(json.dumps({"provenance": {"device": "test"}, "rows": rows[16:]}))
    assert plots_main(["--out", str(tmp_path / "cli"), "--ops", "matmul", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert [p.name for p in (tmp_path / "cli").iterdir()] == ["matmul_bfloat16.png"]


def test_default_cpu_run_covers_every_registered_op(tmp_path):
    """The Quickstart's ``python -m bench`` on a machine without a GPU: a small
    interpreter sweep over every benchmarked op of the registry, invariance only."""
    import pytest

    from harness import registry

    if PROFILE.native:
        pytest.skip("on a GPU the default run is the full timed sweep")
    assert main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # The torch matmul is skipped under Triton 3.6's interpreter (triton-lang/triton#9171).
    benched = {s.name for s in registry.all_specs() if s.bench is not None}
    assert benched >= {"rms_norm", "matmul"}
    assert {r["op"] for r in rows if r["framework"] == "jax"} == benched
    assert all(r["rows_differing"] == 0 for r in rows if r["impl"] == "bi")
    assert not list(tmp_path.glob("*.png"))


def test_merge_of_partial_runs(tmp_path):
    """Parts of a sweep merge into one table: a later run replaces the points it
    remeasures, rows keep their run's commit, other devices are refused."""
    import csv

    import pytest

    from bench.merge import main as merge_main
    from bench.merge import merge

    info = {"device": "gpu", "driver": "1", "cuda": "13", "torch": "2.11", "triton": "3.6", "jax": "0.11.2",
            "jaxlib": "0.11.2", "mode": "gpu", "copy_bandwidth_gbs": 3000.0}
    old = [_row("rms_norm", "torch", impl, "4096", m, 5.0, "GB/s") for impl in ("default", "bi") for m in (1, 2)]
    new = [_row("rms_norm", "torch", "bi", "4096", 2, 4.0, "GB/s"), _row("matmul", "jax", "bi", "64x96", 1, 3.0, "TFLOP/s")]
    a = {"provenance": {**info, "commit": "aaa", "date": "2026-01-01"}, "rows": old}
    b = {"provenance": {**info, "commit": "bbb", "date": "2026-01-02"}, "rows": new}
    rows, merged = merge([a, b])
    assert len(rows) == 5
    by_key = {(r["op"], r["impl"], r["m"]): r for r in rows}
    assert by_key[("rms_norm", "bi", 2)]["median_us"] == 4.0 and by_key[("rms_norm", "bi", 2)]["commit"] == "bbb"
    assert by_key[("rms_norm", "bi", 1)]["commit"] == "aaa"
    assert merged["commit"] == "aaa,bbb" and [r["rows"] for r in merged["runs"]] == [4, 2]
    with pytest.raises(ValueError, match="different device"):
        merge([a, {**b, "provenance": {**b["provenance"], "device": "other"}}])

    for name, payload in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(payload))
    out = tmp_path / "merged"
    assert merge_main(["--out", str(out), str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["commit"] for r in table) == ["aaa", "aaa", "aaa", "bbb", "bbb"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["matmul_bfloat16.png", "rms_norm_bfloat16.png"]


def test_markdown_tables_name_times_ratios_and_varying_defaults():
    from bench.tables import op_tables

    rows = [
        {**_row("sum", fw, impl, "4096", m, 2.0 if impl == "bi" else 3.0, "GB/s"),
         "ratio_to_default": 1.5 if impl == "bi" else 1.0, "rows_differing": int(impl == "default" and m == 4)}
        for fw in ("torch", "jax") for impl in ("default", "bi") for m in (1, 4, 16)
    ]
    text = op_tables(rows, ms=[1, 4])
    lines = text.splitlines()
    assert lines[2] == "| M | bi_torch 4096 | bi_jax 4096 |"
    assert lines[4] == "| 1 | 2 (1.50x) | 2 (1.50x) |" and not any(line.startswith("| 16 |") for line in lines)
    assert "- jax default 4096: rows changed at M = 4 (1)" in lines

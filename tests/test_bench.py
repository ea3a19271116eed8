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

"""Tuning probe: RMSNorm speed against the number of programs per row.

Runs the benchmark's own job (bi_ kernel and framework default, same timing)
with ``bi_core.rms_norm.column_split`` forced to each value (capped at the
row's most), then with the shipped policy. Any split gives the same bits
(``tests/test_rms_norm.py::test_invariance_column_split_or_not``).

    BI_DEVICE=gpu python -m bench.probe_rms_norm_split --features 4096,8192 --splits 1,4,16,64
"""

from __future__ import annotations

import argparse

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser()
    p.add_argument("--features", default="4096,8192")
    p.add_argument("--splits", default="1,2,4,8,16,32,64")
    p.add_argument("--m", default="1,2,4,8,16,32,64,128,256,512")
    p.add_argument("--frameworks", default="torch,jax")
    args = p.parse_args()

    import jax

    from bench import sweep, timing
    from bi_core import rms_norm as contract
    from bi_jax.ops import rms_norm as jmod
    from bi_torch.ops import rms_norm as tmod
    from harness import registry

    spec = registry.get("rms_norm")
    shipped = contract.column_split
    copy = timing.copy_bandwidth_gbs()
    ms = [int(m) for m in args.m.split(",")]
    variants = [(s, f"split={s}") for s in (int(v) for v in args.splits.split(","))] + [(None, "policy")]
    for n in (int(f) for f in args.features.split(",")):
        for split, label in variants:
            if split is None:
                choose = shipped
            else:
                most = max(1, contract.rms_norm_config(n).block // contract.MIN_SLICE)
                choose = lambda rows, cols, s=min(split, most): s  # noqa: E731
            tmod.column_split = jmod.column_split = choose
            jax.clear_caches()  # a cached trace would keep the previous split
            for fw in args.frameworks.split(","):
                rows = sweep.run_job(sweep.Job(spec, fw, n, "bfloat16"), ms, True, copy, lambda: None)
                bi = [r for r in rows if r.impl == "bi"]
                line = " ".join(f"{r.m}:{r.median_us:.2f}us/{r.ratio_to_default:.2f}x" for r in bi)
                print(f"N={n} {label} {fw}: {line}", flush=True)
        tmod.column_split = jmod.column_split = shipped


if __name__ == "__main__":
    main()

"""Tuning probe: RMSNorm speed against the number of programs per row.

Runs the benchmark's own job (bi_ kernel and framework default, same timing)
with ``bi_core.rms_norm.column_split`` forced to each value (capped at the
row's most), then with the shipped policy. Any split gives the same bits
(``tests/test_rms_norm.py::test_invariance_column_split_or_not``).

``--rstd`` also times another epilogue in place of ``bi_core.rms_norm.rstd_asm``
(a speed probe; it changes the bits): ``shipped`` is ``mul.rn``, ``add.rn`` and
one ``rsqrt.approx.f32``, ``ieee`` the correctly rounded ``rcp.rn(sqrt.rn(.))``
that shipped before (bench/NOTES.md, "RMSNorm v6"). ``--order rows`` launches
split programs rows first, as before ``bi_core.rms_norm.slices_adjacent``
("RMSNorm v7"), and ``--weight late`` loads the weight after the reduction at
every size. ``--rounds`` repeats the list of variants, in turn.

    BI_DEVICE=gpu python -m bench.probe_rms_norm_split --features 4096,8192 --splits 1,4,16,64
    BI_DEVICE=gpu python -m bench.probe_rms_norm_split --splits '' --rstd ieee,shipped
    BI_DEVICE=gpu python -m bench.probe_rms_norm_split --splits '' --order policy,rows --rounds 2
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
    p.add_argument("--rstd", default="shipped", help="epilogues to time: shipped, ieee")
    p.add_argument("--order", default="policy", help="launch orders of split programs: policy, rows (grid (rows, split))")
    p.add_argument("--weight", default="policy", help="weight loads: policy, late (always after the reduction)")
    p.add_argument("--rounds", type=int, default=1, help="times to run the whole list of variants, in turn")
    args = p.parse_args()

    import jax

    from bench import sweep, timing
    from bi_core import rms_norm as contract
    from bi_jax.ops import rms_norm as jmod
    from bi_torch.ops import rms_norm as tmod
    from harness import registry

    spec = registry.get("rms_norm")
    shipped = contract.column_split
    shipped_rstd = contract.rstd_asm
    epilogues = {"shipped": shipped_rstd, "ieee": _ieee_rstd_asm}
    orders = {"policy": contract.slices_adjacent, "rows": lambda split: False}
    weights = {"policy": contract.early_weight, "late": lambda rows: False}
    copy = timing.copy_bandwidth_gbs()
    ms = [int(m) for m in args.m.split(",")]
    splits = [int(v) for v in args.splits.split(",") if v]
    knobs = [(r, o, w) for r in args.rstd.split(",") for o in args.order.split(",") for w in args.weight.split(",")]
    variants = [(s, f"split={s}", k) for k in knobs for s in splits] + [(None, "policy", k) for k in knobs]
    for n, (split, label, (rstd, order, weight)) in (
        (int(f), v) for _ in range(args.rounds) for f in args.features.split(",") for v in variants
    ):
        if split is None:
            choose = shipped
        else:
            most = max(1, contract.rms_norm_config(n).block // contract.MIN_SLICE)
            choose = lambda rows, cols, s=min(split, most): s  # noqa: E731
        tmod.column_split = jmod.column_split = choose
        tmod.rstd_asm = jmod.rstd_asm = epilogues[rstd]
        tmod.slices_adjacent = jmod.slices_adjacent = orders[order]
        tmod.early_weight = jmod.early_weight = weights[weight]
        jax.clear_caches()  # a cached trace would keep the previous split
        for fw in args.frameworks.split(","):
            rows = sweep.run_job(sweep.Job(spec, fw, n, "bfloat16"), ms, True, copy, lambda: None)
            bi = [r for r in rows if r.impl == "bi"]
            line = " ".join(f"{r.m}:{r.median_us:.2f}us/{r.ratio_to_default:.2f}x" for r in bi)
            print(f"N={n} {label} rstd={rstd} order={order} weight={weight} {fw}: {line}", flush=True)
    tmod.column_split = jmod.column_split = shipped
    tmod.rstd_asm = jmod.rstd_asm = shipped_rstd
    tmod.slices_adjacent = jmod.slices_adjacent = orders["policy"]
    tmod.early_weight = jmod.early_weight = weights["policy"]


def _ieee_rstd_asm(inv_n: float, eps: float) -> str:
    from bi_core.rms_norm import f32_hex

    return (
        "{ .reg .f32 t; "
        f"mul.rn.f32 t, $1, {f32_hex(inv_n)}; "
        f"add.rn.f32 t, t, {f32_hex(eps)}; "
        "sqrt.rn.f32 t, t; "
        "rcp.rn.f32 $0, t; }"
    )


if __name__ == "__main__":
    main()

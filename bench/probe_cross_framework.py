"""Diagnostic: where do bi_torch and bi_jax differ on the same input?

For several row lengths and dtypes, counts the rows whose bits differ between
the two frameworks, and writes the torch kernel's PTX/TTGIR and the Pallas
kernel's Triton IR under ``--out`` for comparison.

    BI_DEVICE=gpu python -m bench.probe_cross_framework --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("probe-out"))
    p.add_argument("--rows", type=int, default=4096)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import jax
    import numpy as np

    import bi_jax
    from bi_core.rms_norm import rms_norm_config
    from harness import registry
    from harness.frameworks import adapter

    spec, tad, jad = registry.get("rms_norm"), adapter("torch"), adapter("jax")
    lines = []
    for dtype in ("float32", "bfloat16"):
        for n in (128, 1024, 4096, 5120, 8192, 11008, 16384, 20000):
            inputs = spec.make_inputs(np.random.default_rng(n), args.rows, n, dtype)
            a = tad.call(tad.kernel("rms_norm"), spec, tad.natives(inputs))
            b = jad.call(jad.kernel("rms_norm"), spec, jad.natives(inputs))
            diff = (a.view(np.uint8).reshape(args.rows, -1) != b.view(np.uint8).reshape(args.rows, -1)).any(1)
            cfg = rms_norm_config(n)
            lines.append(f"{dtype} N={n} block={cfg.block} warps={cfg.num_warps} chunks={cfg.num_chunks}: {int(diff.sum())}/{args.rows} rows differ")
            print(lines[-1], flush=True)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")

    # IR of both kernels for N=4096 bf16.
    import torch

    from bi_core.rms_norm import early_weight, rstd_asm, sum_tree
    from bi_torch.ops import rms_norm as tmod

    cfg = rms_norm_config(4096)
    tree = sum_tree(cfg.block, cfg.num_warps, 2, 4096)
    xt = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    compiled = tmod._rms_norm_kernel[(8,)](
        xt, wt, torch.empty_like(xt), 4096, RSTD_ASM=rstd_asm(cfg.inv_n, 1e-6), INV_N=cfg.inv_n, EPS=1e-6,
        HAS_WEIGHT=True, BLOCK=cfg.block, NUM_CHUNKS=cfg.num_chunks, **tmod._tree_args(tree), PTX=True,
        SPLIT=1, ADJACENT=False, EARLY_WEIGHT=early_weight(8), num_warps=cfg.num_warps,
    )
    (args.out / "torch_4096_bf16.ptx").write_text(compiled.asm["ptx"])
    (args.out / "torch_4096_bf16.ttgir").write_text(compiled.asm["ttgir"])
    xj = jad.natives(spec.make_inputs(np.random.default_rng(0), 8, 4096, "bfloat16"))
    lowered = jax.jit(lambda x, w: bi_jax.rms_norm(x, w)).lower(xj["x"], xj["weight"])
    (args.out / "jax_4096_bf16.stablehlo.txt").write_text(lowered.as_text())


if __name__ == "__main__":
    main()

"""Tuning probe: compile bi_torch's RMSNorm kernel for Hopper without a GPU and
count what matters in its PTX (vector loads and stores, shuffles, barriers,
shared memory) and its Triton GPU IR (layout conversions).

Pointers are declared 16-byte aligned, as torch's launcher specialises them
for aligned tensors; without that hint every load would be scalar.

    python -m bench.probe_rms_norm_ptx --features 8192 --splits 1,2,4 [--dump DIR]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--features", default="4096,8192")
    p.add_argument("--splits", default="1,2,4")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--dump", type=Path, default=None, help="write the TTGIR and PTX of each variant here")
    args = p.parse_args()

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bi_core.rms_norm import early_weight, rms_norm_config, rstd_asm, slices_adjacent, sum_tree
    from bi_torch.ops.rms_norm import _rms_norm_kernel, _tree_args

    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    aligned = [["tt.divisibility", 16]]
    for n in (int(f) for f in args.features.split(",")):
        cfg = rms_norm_config(n)
        tree = sum_tree(cfg.block, cfg.num_warps, itemsize, n)
        for split in (int(s) for s in args.splits.split(",")):
            consts = dict(
                n_cols=n, RSTD_ASM=rstd_asm(cfg.inv_n, 1e-6), INV_N=cfg.inv_n, EPS=1e-6, HAS_WEIGHT=True,
                BLOCK=cfg.block, NUM_CHUNKS=cfg.num_chunks, **_tree_args(tree), PTX=True, SPLIT=split,
                ADJACENT=slices_adjacent(split), EARLY_WEIGHT=early_weight(1),
            )
            signature = {name: f"*{args.dtype}" for name in ("x_ptr", "w_ptr", "y_ptr")}
            signature.update({name: "constexpr" for name in consts})
            src = ASTSource(fn=_rms_norm_kernel, signature=signature, constexprs=consts,
                            attrs={(i,): aligned for i in range(3)})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            counts = {
                "vector loads": len(re.findall(r"ld\.global\.v\d", ptx)),
                "scalar loads": len(re.findall(r"ld\.global\.(?!v\d)", ptx)),
                "vector stores": len(re.findall(r"st\.global\.v\d", ptx)),
                "scalar stores": len(re.findall(r"st\.global\.(?!v\d)", ptx)),
                "shuffles": ptx.count("shfl.sync"),
                "barriers": len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)),
                "layout conversions": ttgir.count("ttg.convert_layout"),
                "shared bytes": compiled.metadata.shared,
            }
            print(f"N={n} split={split} {args.dtype}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"rms_norm_{n}_split{split}.ttgir").write_text(ttgir)
                (args.dump / f"rms_norm_{n}_split{split}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()

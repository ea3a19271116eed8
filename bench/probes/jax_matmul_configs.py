"""Diagnostic for the JAX matmul on the GPU: bits and speed per config.

For each weight shape, M and Mosaic GPU config, prints whether bi_jax's rows
equal bi_torch's on the same inputs (fp32 output, so no rounding hides an
order change), whether they equal the rows of a large-M launch, and the device
time of bi_jax next to ``jnp.dot`` and ``torch.matmul``.

    BI_DEVICE=gpu python -m bench.probes.jax_matmul_configs [--shapes 4096x4096] [--m 1,16,128] [--all-configs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser(prog="python -m bench.probes.jax_matmul_configs", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    p.add_argument("--m", default="1,16,64,128,256,512,2048,8192")
    p.add_argument("--all-configs", action="store_true", help="time every config of the table at every M")
    p.add_argument("--configs", default="",
                   help="candidate configs to time instead, 'bm,bn,bk,stages,wgs,group;...' (Mosaic GPU), "
                        "or 't:bm,bn,bk,warps,stages,group' for the Triton-lowered kernel")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import bi_torch
    from bench.timing import buffer_sets, time_jax, time_torch
    from bi_core.matmul import wgmma_config, wgmma_configs
    from bi_jax.ops import matmul as jm

    rows = []
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        ms = [int(x) for x in args.m.split(",")]
        big = max(ms)
        rng = np.random.default_rng(k + n)
        a_np = rng.standard_normal((big, k), dtype=np.float32)
        b_np = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        at = torch.tensor(a_np, device="cuda").bfloat16()
        bt = torch.tensor(b_np, device="cuda").bfloat16()
        aj = jnp.asarray(at.float().cpu().numpy()).astype(jnp.bfloat16)
        bj = jnp.asarray(bt.float().cpu().numpy()).astype(jnp.bfloat16)
        # Several weight copies, used in turn, so that timings are not of L2.
        copies = buffer_sets(2 * k * n)
        bjs = [bj] + [bj + 0 for _ in range(copies - 1)]
        bts = [bt] + [bt.clone() for _ in range(copies - 1)]
        ref_t = bi_torch.matmul(at, bt, out_dtype=torch.float32).cpu().numpy()
        ref_j = np.asarray(jm.launch(aj[None], bj[None], None, jnp.float32, "ieee", False)[0])
        for m in ms:
            if args.configs:
                cfgs = tuple(_parse_config(c) for c in args.configs.split(";"))
            else:
                cfgs = wgmma_configs() if args.all_configs else (wgmma_config(m, n),)
            a_m = aj[:m]
            for cfg in cfgs:
                fn = jax.jit(lambda a, b, cfg=cfg: jm.launch(a[None], b[None], None, jnp.float32, "ieee", False, cfg)[0])
                out = np.asarray(fn(a_m, bj))
                vs_torch = int((out.view(np.int32) != ref_t[:m].view(np.int32)).any(1).sum())
                vs_big = int((out.view(np.int32) != ref_j[:m].view(np.int32)).any(1).sum())
                fn16 = jax.jit(lambda a, b, cfg=cfg: jm.launch(a[None], b[None], None, jnp.bfloat16, "ieee", False, cfg)[0])
                t = time_jax({"bi_jax": fn16}, [{"a": a_m, "b": w} for w in bjs])["bi_jax"]
                rows.append({"k": k, "n": n, "m": m, "config": str(cfg), "rows_vs_torch": vs_torch,
                             "rows_vs_big_m": vs_big, "bi_jax_us": t.median_us})
            td = time_jax({"jnp.dot": lambda a, b: jnp.dot(a, b)}, [{"a": a_m, "b": w} for w in bjs])["jnp.dot"]
            torch_sets = [{"a": at[:m], "b": w} for w in bts]
            times = time_torch({"cuBLAS": lambda a, b: torch.matmul(a, b), "bi_torch": lambda a, b: bi_torch.matmul(a, b)},
                               torch_sets)
            tt, tb = times["cuBLAS"], times["bi_torch"]
            for r in rows:
                if r["k"] == k and r["n"] == n and r["m"] == m:
                    r.update(jnp_dot_us=td.median_us, torch_us=tt.median_us, bi_torch_us=tb.median_us)
            for r in rows[-len(cfgs):]:
                print(
                    f"{k}x{n} M={m:5d} {r['config']:28s} jax {r['bi_jax_us']:8.1f} us  jnp.dot {td.median_us:8.1f}"
                    f" ({td.median_us / r['bi_jax_us']:.2f}x)  bi_torch {tb.median_us:8.1f}  cuBLAS {tt.median_us:8.1f}"
                    f"  rows!=torch {r['rows_vs_torch']}  rows!=bigM {r['rows_vs_big_m']}",
                    flush=True,
                )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe_matmul.json").write_text(json.dumps(rows, indent=1))


def _parse_config(text: str):
    """A Mosaic GPU config, or with a ``t:`` prefix a Triton-kernel one."""
    from bi_core.matmul import TileConfig, WgmmaConfig

    if text.startswith("t:"):
        return TileConfig(*map(int, text[2:].split(",")))
    return WgmmaConfig(*map(int, text.split(",")))


if __name__ == "__main__":
    main()

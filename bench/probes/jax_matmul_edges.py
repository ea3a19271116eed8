"""Diagnostic: the JAX Mosaic GPU matmul on small and ragged shapes.

For every config and a grid of (M, K, N), runs the kernel twice and reports
launches whose result is wrong (against a float64 reference) or differs
between the two runs.

    BI_DEVICE=gpu python -m bench.probes.jax_matmul_edges
"""

from __future__ import annotations

import argparse

from harness.devices import configure


def main(argv: list[str] | None = None) -> None:
    configure()
    p = argparse.ArgumentParser(prog="python -m bench.probes.jax_matmul_edges", description=__doc__.splitlines()[0])
    p.parse_args(argv)
    import jax.numpy as jnp
    import numpy as np

    from bi_core.matmul import wgmma_configs
    from bi_jax.ops import matmul as jm

    bad = 0
    total = 0
    for cfg in wgmma_configs():
        for m, k, n, kmajor in [(65, 1, 5, False), (255, 1, 5, False), (392, 42, 42, False), (392, 42, 42, True),
                                 (392, 8, 8, False), (1, 64, 64, False), (300, 77, 77, True), (2000, 64, 200, False)]:
            rng = np.random.default_rng(m * 7 + k * 3 + n)
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            aj = jnp.asarray(a).astype(jnp.bfloat16)
            bj = jnp.asarray(b.T if kmajor else b).astype(jnp.bfloat16)
            b64 = np.asarray(bj, np.float64)
            ref = np.asarray(aj, np.float64) @ (b64.T if kmajor else b64)
            outs = [np.asarray(jm.launch(aj[None], bj[None], None, jnp.dtype(jnp.float32), "ieee", kmajor, cfg))[0]
                    for _ in range(2)]
            err = float(np.abs(outs[0] - ref).max())
            same = bool((outs[0].view(np.int32) == outs[1].view(np.int32)).all())
            total += 1
            print(f"{cfg} M={m} K={k} N={n} kmajor={kmajor} err={err:.3g} deterministic={same}", flush=True)
            if err > 1e-3 * max(1.0, np.abs(ref).max()) or not same:
                bad += 1
                rows = np.nonzero(np.abs(outs[0] - ref).max(1) > 1e-2)[0]
                print(f"BAD {cfg} M={m} K={k} N={n} kmajor={kmajor} err={err:.3g} deterministic={same} "
                      f"bad rows {rows[:3]}..{rows[-3:] if rows.size else ''} ({rows.size})", flush=True)
    print(f"{bad} of {total} launches bad")


if __name__ == "__main__":
    main()

"""Tuning probe: bi_jax.rms_norm next to XLA's fused RMSNorm on the same rows.

Prints the optimised HLO of both jitted calls (XLA's fusion kind and its
launch config, the Pallas custom call) and runs each a few times, so that a
profiler wrapped around the probe (``ncu``) sees both kernels on identical
inputs. Timing is the benchmark's job; this probe is for looking inside.

    BI_DEVICE=gpu python -m bench.probe_rms_norm_xla --m 2,8 --features 8192
    ncu --clock-control none python -m bench.probe_rms_norm_xla --runs 2 --no-hlo
"""

from __future__ import annotations

import argparse

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="2,8")
    p.add_argument("--features", default="8192")
    p.add_argument("--runs", type=int, default=3, help="calls of each kernel per shape")
    p.add_argument("--no-hlo", action="store_true", help="skip printing the compiled HLO")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import bi_jax
    from harness.frameworks.jax_adapter import _default_rms_norm_impl

    fns = {
        "xla": lambda x, w: _default_rms_norm_impl(x, w, 1e-6),
        "bi_jax": jax.jit(lambda x, w: bi_jax.rms_norm(x, w, 1e-6)),
    }
    rng = np.random.default_rng(0)
    for n in (int(f) for f in args.features.split(",")):
        w = jnp.asarray(rng.standard_normal(n, dtype=np.float32), jnp.bfloat16)
        for m in (int(v) for v in args.m.split(",")):
            x = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32), jnp.bfloat16)
            outs = {}
            for name, fn in fns.items():
                if not args.no_hlo:
                    text = jax.jit(fn).lower(x, w).compile().as_text()
                    print(f"===== {name} M={m} N={n}: compiled HLO =====\n{text}", flush=True)
                for _ in range(args.runs):
                    outs[name] = jax.block_until_ready(fn(x, w))
            diff = np.abs(np.asarray(outs["xla"], np.float32) - np.asarray(outs["bi_jax"], np.float32)).max()
            print(f"M={m} N={n}: max |xla - bi_jax| = {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()

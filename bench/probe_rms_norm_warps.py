"""Tuning probe: speed of a one-row-per-program op against the number of warps per row.

Runs the benchmark's own job (bi_ kernel and framework default, same timing)
for rms_norm or a row op (``--op softmax``) with the row config overridden to
each warp count, and checks that bi_torch and bi_jax still give the same bits
with it.

    BI_DEVICE=gpu python -m bench.probe_rms_norm_warps --features 8192 --warps 8,16,32
    BI_DEVICE=gpu python -m bench.probe_rms_norm_warps --op softmax --features 5120,32000 --warps 8,16
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser()
    p.add_argument("--op", default="rms_norm")
    p.add_argument("--features", default="4096,8192")
    p.add_argument("--warps", default="4,8,16,32")
    p.add_argument("--m", default="1,2,4,8,16,32,64,512,4096,8192")
    p.add_argument("--frameworks", default="torch,jax")
    args = p.parse_args()

    import numpy as np

    from bench import sweep, timing
    from harness import registry
    from harness.frameworks import adapter

    module, attr = ("rms_norm", "rms_norm_config") if args.op == "rms_norm" else ("rows", "row_config")
    jmod = importlib.import_module(f"bi_jax.ops.{module}")
    tmod = importlib.import_module(f"bi_torch.ops.{module}")
    spec = registry.get(args.op)
    original = getattr(tmod, attr)
    copy = timing.copy_bandwidth_gbs()
    ms = [int(m) for m in args.m.split(",")]
    for n in (int(f) for f in args.features.split(",")):
        base = original(n)
        for warps in (int(w) for w in args.warps.split(",")):
            cfg = dataclasses.replace(base, num_warps=warps)
            setattr(tmod, attr, lambda _n, cfg=cfg: cfg)
            setattr(jmod, attr, lambda _n, cfg=cfg: cfg)
            inputs = spec.make_inputs(np.random.default_rng(n), 256, n, "bfloat16")
            outs = [adapter(fw).call(adapter(fw).kernel(args.op), spec, adapter(fw).natives(inputs))
                    for fw in ("torch", "jax")]
            same = np.array_equal(outs[0].view(np.uint16), outs[1].view(np.uint16))
            for fw in args.frameworks.split(","):
                rows = sweep.run_job(sweep.Job(spec, fw, n, "bfloat16"), ms, True, copy, lambda: None)
                bi = [r for r in rows if r.impl == "bi"]
                line = " ".join(f"{r.m}:{r.median_us:.2f}us/{r.ratio_to_default:.2f}x" for r in bi)
                print(f"N={n} warps={warps} {fw} (torch==jax bits: {same}): {line}", flush=True)
            setattr(tmod, attr, original)
            setattr(jmod, attr, original)


if __name__ == "__main__":
    main()

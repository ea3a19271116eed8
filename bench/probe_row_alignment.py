"""Probe: row sums at row lengths that are and are not multiples of 16.

For each length, the fp32 ``sum`` of a few rows in both frameworks, launched
alone and in a batch, against the written-out tree of
``bi_core.rms_norm.reduce_tree`` replayed in numpy (with the cross-thread
levels written out as a warp butterfly, so that for aligned rows it also shows
whether the compilers' own cross-thread order is the one documented in
``SumTree``). Then the cost of the written-out levels: the benchmark's job for
rms_norm and softmax at 5120 columns (compiler's levels) and 5128 (written out).

    BI_DEVICE=gpu python -m bench.probe_row_alignment
"""

from __future__ import annotations

import argparse

from harness.devices import configure


def main() -> None:
    configure()
    p = argparse.ArgumentParser()
    p.add_argument("--features", default="100,1000,1869,4100,5128,8190,1024,4096,8192,20000")
    p.add_argument("--speed", default="5120,5128")
    p.add_argument("--m", default="1,16,512,4096")
    args = p.parse_args()

    import numpy as np

    import bi_jax
    import bi_torch
    import jax.numpy as jnp
    import torch
    from bench import sweep, timing
    from bi_core.rms_norm import reduce_tree, sum_tree
    from bi_core.rows import row_config
    from harness import registry

    for n in (int(f) for f in args.features.split(",")):
        cfg = row_config(n)
        tree = sum_tree(cfg.block, cfg.num_warps, 4, n)
        x = np.random.default_rng(n).standard_normal((4, n)).astype(np.float32)
        xt = torch.from_numpy(x).cuda()
        res = {
            "torch1": bi_torch.sum(xt[:1].clone(), dim=-1).cpu().numpy(),
            "torch4": bi_torch.sum(xt, dim=-1).cpu().numpy(),
            "jax1": np.asarray(bi_jax.sum(jnp.asarray(x[:1]), axis=-1)),
            "jax4": np.asarray(bi_jax.sum(jnp.asarray(x), axis=-1)),
        }
        padded = np.zeros((cfg.num_chunks * cfg.block,), np.float32)
        padded[:n] = x[0]
        acc = padded.reshape(cfg.num_chunks, cfg.block)
        acc = acc[0] if cfg.num_chunks == 1 else np.cumsum(acc, axis=0, dtype=np.float32)[-1]
        replay = reduce_tree(acc, tree, np, explicit_threads=True)[0]
        bits = {k: v[0].view(np.int32) for k, v in res.items()}
        same = {k: bool(b == replay.view(np.int32)) for k, b in bits.items()}
        print(f"N={n} explicit_threads={tree.explicit_threads} tree={tree} equals written-out replay: {same}", flush=True)

    copy = timing.copy_bandwidth_gbs()
    ms = [int(m) for m in args.m.split(",")]
    for op in ("rms_norm", "softmax"):
        spec = registry.get(op)
        for n in (int(f) for f in args.speed.split(",")):
            for fw in ("torch", "jax"):
                rows = sweep.run_job(sweep.Job(spec, fw, n, "bfloat16"), ms, True, copy, lambda: None)
                line = " ".join(f"{r.m}:{r.median_us:.2f}us/{r.ratio_to_default:.2f}x" for r in rows if r.impl == "bi")
                print(f"{op} N={n} {fw}: {line}", flush=True)


if __name__ == "__main__":
    main()

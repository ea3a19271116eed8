"""bi_torch against bi_jax attention on the GPU: the same bits on the same
inputs (prefill, split-KV decode, paged decode), and bi_jax's speed against
``jax.nn.dot_product_attention`` (cudnn, xla) with JAX's CUPTI timer::

    python -m bench.probes.attention_cross [--out DIR] [--bits-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import bi_jax
import bi_torch
from bench.probes._log import jsonl_emitter

H, HKV = 32, 8


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_cross", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--bits-only", action="store_true", help="the bit comparisons, not the timings")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_cross")

    rng = np.random.default_rng(0)
    import ml_dtypes

    for d in (64, 128, 256):
        for b, lq, lk in ((1, 1000, 1000), (4, 1, 5000), (64, 1, 700)):
            q = rng.standard_normal((b, lq, H, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            k = rng.standard_normal((b, lk, HKV, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            v = rng.standard_normal((b, lk, HKV, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            rec = {"head_dim": d, "shape": [b, lq, lk]}
            try:
                tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda() for x in (q, k, v))
                ot = bi_torch.attention(tq, tk, tv, causal=True).view(torch.int16).cpu().numpy()
                oj = np.asarray(bi_jax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True)).view(np.int16)
                rec["differing"] = int((ot != oj).sum())
                rec["of"] = int(ot.size)
            except Exception as e:
                rec["error"] = repr(e)[:1500]
            emit({"cross": rec})

    # Boolean masks (the 16-row decode tile and the prefill tiles): both read
    # them as int16, so the same mask gives the same bits.
    for d in (64, 128):
        for b, lq, lk in ((1, 300, 300), (32, 1, 700), (4, 5, 2000)):
            q = rng.standard_normal((b, lq, H, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            k = rng.standard_normal((b, lk, HKV, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            v = rng.standard_normal((b, lk, HKV, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
            mask = rng.random((b, 1, lq, lk)) < 0.8
            rec = {"head_dim": d, "shape": [b, lq, lk], "mask": "random bool, (B, 1, Lq, Lk)"}
            try:
                tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda().transpose(1, 2)
                              for x in (q, k, v))
                ot = bi_torch.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(mask).cuda(),
                                                           enable_gqa=True)
                ot = ot.transpose(1, 2).contiguous().view(torch.int16).cpu().numpy()
                oj = np.asarray(bi_jax.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                                             mask=jnp.asarray(mask))).view(np.int16)
                rec["differing"] = int((ot != oj).sum())
                rec["of"] = int(ot.size)
            except Exception as e:
                rec["error"] = repr(e)[:1500]
            emit({"cross": rec})

    if args.bits_only:
        return
    from jax.experimental.mosaic.gpu import profiler

    def timed(fn, *xs):
        fn(*xs)  # compile
        _, t = profiler.measure(fn, aggregate=True)(*xs)
        return t  # ms

    d = 128
    for seq in (1024, 4096, 16384):
        q = jnp.asarray(rng.standard_normal((1, seq, H, d), dtype=np.float32), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((1, seq, HKV, d), dtype=np.float32), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((1, seq, HKV, d), dtype=np.float32), jnp.bfloat16)
        flops = 4 * seq * seq * d * H / 2
        rec = {"prefill_seq": seq}
        for impl in ("cudnn", "xla"):
            try:
                f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                                    implementation=impl))
                rec[impl] = flops / timed(f, q, k, v) / 1e9
            except Exception as e:
                rec[impl] = repr(e)[:100]
        try:
            f = jax.jit(lambda q, k, v: bi_jax.dot_product_attention(q, k, v, is_causal=True))
            rec["bi"] = flops / timed(f, q, k, v) / 1e9
        except Exception as e:
            rec["bi"] = repr(e)[:1500]
        emit({"jax_tflops": rec})
    for b, n in ((1, 4096), (1, 32768), (32, 4096), (128, 4096)):
        q = jnp.asarray(rng.standard_normal((b, 1, H, d), dtype=np.float32), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, n, HKV, d), dtype=np.float32), jnp.bfloat16)
        v = k + 1
        nbytes = 2 * k.size * 2
        rec = {"decode": [b, n]}
        try:
            f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
            rec["cudnn"] = nbytes / timed(f, q, k, v) / 1e6
        except Exception as e:
            rec["cudnn"] = repr(e)[:100]
        try:
            f = jax.jit(lambda q, k, v: bi_jax.attention(q, k, v, causal=True))
            rec["bi"] = nbytes / timed(f, q, k, v) / 1e6
        except Exception as e:
            rec["bi"] = repr(e)[:1500]
        emit({"jax_gbs": rec})


if __name__ == "__main__":
    main()

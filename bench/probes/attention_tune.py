"""Tuning knobs of the bi_torch attention kernel on the GPU that change no
bits: tile config and pipelining depth, for prefill and decode::

    python -m bench.probes.attention_tune [--out DIR]

bf16, head dim 128, 32 query / 8 KV heads. Device time with
``triton.testing.do_bench_cudagraph``; each point's bits against the default's.
One JSON line per point. (Block, split and loop-structure variants of attention
v1 in bench/NOTES.md were measured with an earlier version of this probe.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton

from bi_core import attention as contract
from bi_torch.ops import attention as ops
from bench.probes._log import jsonl_emitter

H, HKV, D = 32, 8, 128


def run(q, k, v, cfg, bn, split, split_kv=None, **knobs):
    b, lq = q.shape[0], q.shape[1]
    if cfg is None:
        cfg = contract.tile_config(D, lq * H // HKV)
    lk = k.shape[1]
    o = torch.empty_like(q)
    ops.launch(q, k, v, o, q_strides=ops._strides(q), k_strides=ops._strides(k), v_strides=ops._strides(v),
               o_strides=ops._strides(o), batch=b, hkv=HKV, group=H // HKV, q_len=lq, kv_len=lk, max_q_len=lq,
               max_kv_len=lk, scale_log2=contract.qk_scale(None, D), window=contract.window_sides(True, None),
               bottom_right=True, config=cfg, block_n=bn, split_keys=split, split_kv=split_kv, **knobs)
    return o


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_tune", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--parts", default="prefill,decode", help="prefill,decode,paths,splits")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_tune")

    bench = triton.testing.do_bench_cudagraph  # device time: no host launch cost in it
    if "paths" in args.parts:
        paths(emit, bench)
    if "splits" in args.parts:
        splits(emit, bench)
    if "prefill" in args.parts:
        # Each tile config of the dispatch, and candidates (64 rows over 8
        # warps halves the registers per thread of the 128-row tile, which
        # spilled): bits against the default's, speed.
        for seq in (1024, 4096, 16384):
            q = torch.randn(1, seq, H, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, seq, HKV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4 * seq * seq * D * H / 2
            ref = run(q, k, v, None, None, None)
            extra = [contract.TileConfig(*c) for c in ((64, 8, 2), (128, 8, 3), (32, 4, 2))]
            for cfg in (*contract.tile_configs(D)[1:], *extra):
                rec = {"prefill": seq, "config": [cfg.block_m, cfg.num_warps, cfg.num_stages]}
                try:
                    o = run(q, k, v, cfg, None, None)
                    ms = bench(lambda: run(q, k, v, cfg, None, None))
                except triton.runtime.errors.OutOfResources as e:
                    emit({**rec, "error": repr(e)[:300]})
                    continue
                emit({**rec, "differing": int((o.view(torch.int16) != ref.view(torch.int16)).sum()),
                      "tflops": round(flops / ms / 1e9, 1)})
    if "decode" not in args.parts:
        return
    # Decode tiles and depths at the contract's block and split: bits against
    # the dispatch's own choice, and speed.
    configs = [contract.TileConfig(*c) for c in ((64, 4, 2), (64, 4, 1), (64, 4, 3), (16, 4, 1), (16, 4, 2), (16, 4, 3),
                                                (16, 2, 2), (16, 1, 2), (32, 4, 2))]
    for b, n in ((1, 4096), (1, 32768), (8, 4096), (32, 4096), (128, 4096), (32, 16384)):
        q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, n, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        nbytes = 2 * k.numel() * 2
        ref = run(q, k, v, None, None, None)
        points = [(cfg, None) for cfg in configs] + [(configs[0], True), (configs[0], False)]
        for cfg, split_kv in points:
            rec = {"decode": [b, n], "config": [cfg.block_m, cfg.num_warps, cfg.num_stages], "split_kv": split_kv}
            try:
                o = run(q, k, v, cfg, None, None, split_kv)
                rec["differing"] = int((o.view(torch.int16) != ref.view(torch.int16)).sum())
                rec["gbs"] = round(nbytes / bench(lambda: run(q, k, v, cfg, None, None, split_kv)) / 1e6)
            except Exception as e:
                rec["error"] = repr(e)[:300]
                emit(rec)
                return  # a CUDA error is sticky: nothing after it can run
            emit(rec)

def splits(emit, bench) -> None:
    """What the contract's split costs a prefill: the kernel with longer
    splits (fewer folds of a split's partial into the running result, and a
    shorter life for the second accumulator) at the training shapes. Longer
    splits change the bits (reported); speed only, to size the fold's cost."""
    for b, seq in ((64, 1024), (4, 4096)):
        q = torch.randn(b, seq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, seq, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = b * 4 * seq * seq * D * H / 2
        ref = run(q, k, v, None, None, None)
        for split in (contract.SPLIT, 1024, 4096, 1 << 20):
            for cfg in (None, contract.TileConfig(64, 4, 2)):
                o = run(q, k, v, cfg, None, split)
                ms = bench(lambda: run(q, k, v, cfg, None, split))
                emit({"b": b, "seq": seq, "split": split, "config": cfg and [cfg.block_m, cfg.num_warps, cfg.num_stages],
                      "differing": int((o.view(torch.int16) != ref.view(torch.int16)).sum()), "ms": round(ms, 4),
                      "tflops": round(flops / ms / 1e9, 1)})
        del q, k, v, ref
        torch.cuda.empty_cache()


def paths(emit, bench) -> None:
    """The loop structures of the kernel that give the same bits, at the
    dispatch's tile config: with and without ``whole`` (blocks that every row
    sees whole run without the bounds' selects), folded in one program or
    spread (``split_kv``: one program per split), tiles in launch order or
    reversed (``reverse``: the longest causal tiles first). (A third, prefill programs
    that write each split's partial for the merge kernel, was measured at
    4815fd1 and removed: bench/NOTES.md, attention v4.)"""
    variants = {"base": {"whole": False, "reverse": False}, "whole": {"whole": True, "reverse": False},
                "spread": {"whole": False, "split_kv": True}, "whole+spread": {"whole": True, "split_kv": True},
                "reverse": {"whole": False, "reverse": True},
                "whole+reverse": {"whole": True, "reverse": True}}
    for b, lq, lk in ((1, 1024, 1024), (1, 4096, 4096), (1, 16384, 16384), (16, 4096, 4096),
                      (1, 1, 4096), (1, 1, 32768), (64, 1, 4096), (16, 1, 16384)):
        q = torch.randn(b, lq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, lk, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = run(q, k, v, None, None, None)
        flops = b * 4 * lq * lk * D * H / (2 if lq == lk else 1)
        nbytes = 2 * k.numel() * 2
        for name, knobs in variants.items():
            rec = {"b": b, "lq": lq, "lk": lk, "path": name}
            try:
                o = run(q, k, v, None, None, None, **knobs)
                ms = bench(lambda: run(q, k, v, None, None, None, **knobs))
            except triton.runtime.errors.OutOfResources as e:
                emit({**rec, "error": repr(e)[:300]})
                continue
            except Exception as e:  # noqa: BLE001 - a CUDA error is sticky: nothing after it can run
                emit({**rec, "error": repr(e)[:300]})
                return
            emit({**rec, "differing": int((o.view(torch.int16) != ref.view(torch.int16)).sum()), "ms": round(ms, 4),
                  "tflops": round(flops / ms / 1e9, 1), "gbs": round(nbytes / ms / 1e6)})
        del q, k, v, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

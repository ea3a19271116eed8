"""bi_torch attention on the GPU: the same bits across schedules, and a quick
timing against torch's SDPA backends (``triton.testing.do_bench``; the
benchmark command is the measurement of record)::

    python -m bench.probes.attention_schedules [--out DIR]

Checks, bf16, 32 query / 8 KV heads, head dims 64/128/256: causal prefill ==
chunked prefill (random chunks) == token-by-token decode for sampled rows;
split-KV on == off; every tile config of the head dim; paged (random page
size and order) == contiguous; a request alone == inside a batch. Prints
one JSON line per check and per timed point.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton

import bi_torch
from bi_core import attention as contract
from bi_torch.ops import attention as ops

H, HKV = 32, 8


def _same(a, b) -> int:
    """Number of differing elements (bitwise)."""
    return int((a.contiguous().view(torch.int16) != b.contiguous().view(torch.int16)).sum())


def _emit(out, record):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out / "attention_schedules.jsonl", "a") as f:
            f.write(line + "\n")


def checks(out, d: int, seq: int, gen: torch.Generator):
    dev = "cuda"
    q = torch.randn(1, seq, H, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, seq, HKV, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, seq, HKV, d, device=dev, dtype=torch.bfloat16, generator=gen)
    full = bi_torch.attention(q, k, v, causal=True)
    res = {"head_dim": d, "seq": seq}
    res["split_on_vs_off"] = _same(bi_torch.attention(q, k, v, causal=True, split_kv=True),
                                   bi_torch.attention(q, k, v, causal=True, split_kv=False))
    for cfg in contract.tile_configs(d):
        o = torch.empty_like(full)
        ops.launch(q, k, v, o, q_strides=ops._strides(q), k_strides=ops._strides(k), v_strides=ops._strides(v),
                   o_strides=ops._strides(o), batch=1, hkv=HKV, group=H // HKV, q_len=seq, kv_len=seq,
                   max_q_len=seq, max_kv_len=seq, scale_log2=contract.qk_scale(None, d),
                   window=contract.window_sides(True, None), bottom_right=True, config=cfg)
        res[f"config_{cfg.block_m}x{cfg.num_warps}"] = _same(o, full)
    # chunked prefill with random chunk boundaries
    cuts = sorted(torch.randint(1, seq, (5,), generator=torch.Generator().manual_seed(seq)).tolist())
    bounds = [0] + cuts + [seq]
    chunks = [bi_torch.attention(q[:, a:b], k[:, :b], v[:, :b], causal=True) for a, b in zip(bounds, bounds[1:]) if b > a]
    res["chunked_vs_prefill"] = _same(torch.cat(chunks, 1), full)
    # decode of sampled positions, alone and inside a batch of 32 with other lengths
    pos = [0, 63, 64, 255, 256, seq // 2, seq - 1]
    dec = [bi_torch.attention(q[:, p : p + 1], k[:, : p + 1], v[:, : p + 1], causal=True) for p in pos]
    res["decode_vs_prefill"] = sum(_same(o, full[:, p : p + 1]) for o, p in zip(dec, pos))
    # paged, random page size and order, 32 sequences of random lengths, the probe row in the middle
    page = (1, 16, 48, 100, 256)[seq % 5]
    lens = torch.randint(1, seq + 1, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    lens[13] = seq
    pages_per = [math.ceil(n / page) for n in lens]
    total_pages = sum(pages_per) + 3
    perm = torch.randperm(total_pages, generator=torch.Generator().manual_seed(2)).tolist()
    kc = torch.zeros(total_pages, page, HKV, d, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    width = max(pages_per)
    bt = torch.zeros(32, width, dtype=torch.int32)
    nxt = 0
    ks = [k[0] if b == 13 else torch.randn(n, HKV, d, device=dev, dtype=torch.bfloat16, generator=gen) for b, n in enumerate(lens)]
    vs = [v[0] if b == 13 else torch.randn(n, HKV, d, device=dev, dtype=torch.bfloat16, generator=gen) for b, n in enumerate(lens)]
    for b, n in enumerate(lens):
        for j in range(pages_per[b]):
            p = perm[nxt]
            nxt += 1
            bt[b, j] = p
            seg = slice(j * page, min(n, (j + 1) * page))
            kc[p, : seg.stop - seg.start] = ks[b][seg]
            vc[p, : seg.stop - seg.start] = vs[b][seg]
    qd = torch.randn(32, 1, H, d, device=dev, dtype=torch.bfloat16, generator=gen)
    qd[13, 0] = q[0, -1]
    od = bi_torch.paged_attention(qd, kc, vc, bt.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev))
    res["paged_batch32_vs_prefill"] = _same(od[13:14], full[:, -1:])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True,
        enable_gqa=True).transpose(1, 2)
    res["max_abs_err_vs_fp32_sdpa"] = float((full.float() - ref).abs().max())
    _emit(out, {"check": res})


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run


def timings(out):
    from torch.nn.attention import SDPBackend

    backends = {"cudnn": _sdpa([SDPBackend.CUDNN_ATTENTION]), "flash": _sdpa([SDPBackend.FLASH_ATTENTION])}
    d = 128
    for seq in (1024, 4096, 16384):
        q = torch.randn(1, H, seq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, seq, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * seq * seq * d * H / 2
        rec = {"prefill_seq": seq}
        for name, fn in backends.items():
            try:
                rec[name] = flops / triton.testing.do_bench(lambda: fn(q, k, v, True)) / 1e9
            except RuntimeError as e:
                rec[name] = f"error: {str(e)[:80]}"
        rec["bi"] = flops / triton.testing.do_bench(
            lambda: bi_torch.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) / 1e9
        _emit(out, {"tflops": rec})
    for b, n in ((1, 4096), (1, 32768), (8, 4096), (32, 4096), (128, 4096), (32, 16384)):
        q = torch.randn(b, H, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, HKV, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        nbytes = 2 * k.numel() * 2
        rec = {"decode_batch": b, "len": n}
        for name, fn in backends.items():
            try:
                rec[name] = nbytes / triton.testing.do_bench(lambda: fn(q, k, v, False)) / 1e6
            except RuntimeError as e:
                rec[name] = f"error: {str(e)[:80]}"
        for split in (None, False):
            rec[f"bi_split_{split}"] = nbytes / triton.testing.do_bench(
                lambda: bi_torch.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                           split_kv=split)) / 1e6
        _emit(out, {"gbs": rec})


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_schedules", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    for d in contract.HEAD_DIMS:
        for seq in (700, 4096):
            try:
                checks(args.out, d, seq, gen)
            except Exception as e:  # report and go on: one failing head dim must not hide the others
                _emit(args.out, {"check_error": {"head_dim": d, "seq": seq, "error": repr(e)[:2000]}})
    if not args.skip_timing:
        timings(args.out)
    _emit(args.out, {"seconds": time.time() - t0})


if __name__ == "__main__":
    main()

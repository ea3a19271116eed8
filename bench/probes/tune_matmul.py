"""Tile-config sweep for ``bi_torch.matmul`` on the GPU (bf16).

For each weight shape and M it times every candidate config and
``torch.matmul`` (CUDA graph + events, rotating weights larger than L2), and
checks that every config gives the bits of the M=8192 reference launch.

    python -m bench.probes.tune_matmul --out DIR [--shapes 4096x4096,...] [--m 1,16,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bi_core.matmul import TileConfig
from harness.devices import configure

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def candidates(m: int) -> list[TileConfig]:
    T = TileConfig
    if m <= 16:
        return [T(16, 64, 256, 4, 4, 1), T(16, 64, 128, 4, 6, 1), T(16, 32, 128, 4, 6, 1),
                T(16, 64, 128, 4, 6, 1, tma=True), T(16, 32, 256, 4, 5, 1, tma=True), T(64, 64, 128, 4, 6, 1, tma=True)]
    if m <= 64:
        return [T(64, 64, 256, 4, 3, 1), T(64, 64, 128, 4, 4, 1), T(64, 32, 256, 4, 4, 1),
                T(64, 64, 128, 4, 6, 1, tma=True), T(64, 32, 256, 4, 4, 1, tma=True), T(64, 128, 128, 4, 4, 1, tma=True),
                T(64, 64, 128, 4, 6, 1, tma=True, warp_specialize=True)]
    if m <= 512:
        return [T(64, 64, 128, 4, 4, 8), T(128, 64, 64, 4, 4, 8), T(64, 256, 64, 8, 4, 8),
                T(64, 128, 64, 4, 4, 8, tma=True), T(128, 128, 64, 8, 4, 8, tma=True), T(64, 256, 64, 4, 4, 8, tma=True),
                T(128, 64, 64, 4, 4, 8, tma=True), T(128, 128, 64, 8, 4, 8, tma=True, warp_specialize=True),
                T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True), T(64, 128, 128, 4, 4, 8, tma=True)]
    return [T(128, 256, 64, 8, 4, 8), T(128, 256, 64, 8, 3, 8, tma=True), T(128, 256, 64, 8, 4, 8, tma=True),
            T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True), T(128, 128, 64, 8, 4, 8, tma=True, warp_specialize=True),
            T(128, 256, 64, 4, 3, 8, tma=True, warp_specialize=True), T(128, 128, 64, 4, 4, 8, tma=True, warp_specialize=True),
            T(256, 128, 64, 8, 3, 8, tma=True)]


def main(argv=None) -> int:
    configure()
    p = argparse.ArgumentParser(prog="python -m bench.probes.tune_matmul", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--m", default=",".join(map(str, MS)))
    p.add_argument("--configs", default="",
                   help="candidates instead of the built-in lists: 'bm,bn,bk,warps,stages,group[,tma][,ws];...'")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]

    import torch

    from bench.timing import buffer_sets, time_torch
    from bi_torch.ops.matmul import launch

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    torch.manual_seed(0)
    for k, n in shapes:
        wbytes = 2 * k * n
        sets = buffer_sets(wbytes, l2_bytes=50 * 2**20, cap=8)
        weights = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(sets)]
        a_full = torch.randn(max(ms), k, device="cuda", dtype=torch.bfloat16)
        ref = torch.empty(max(ms), n, device="cuda", dtype=torch.bfloat16)
        launch(a_full[None], weights[0][None], None, ref[None], TileConfig(128, 256, 64, 8, 3, 8))
        for m in ms:
            a = a_full[:m]
            arg_sets = [{"a": a, "b": w} for w in weights]
            t = time_torch({"cuBLAS": lambda a, b: torch.matmul(a, b)}, arg_sets, target_ms=1.0, rounds=10)["cuBLAS"]
            tflops = 2 * m * k * n / t.median_us / 1e6
            rows.append({"k": k, "n": n, "m": m, "config": "torch.matmul", "us": t.median_us, "tflops": tflops,
                         "gbs": wbytes / t.median_us / 1e3, "same_bits": None})
            print(f"K={k} N={n} M={m:5d} torch.matmul {t.median_us:9.2f} us {tflops:7.1f} TF/s", flush=True)
            best = None
            for cfg in (_parse_configs(args.configs) if args.configs else candidates(m)):
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                try:
                    launch(a[None], weights[0][None], None, out[None], cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # a config that does not compile (shared memory): record it
                    rows.append({"k": k, "n": n, "m": m, "config": str(cfg), "error": repr(e)[:300]})
                    print(f"   {cfg}: {repr(e)[:120]}", flush=True)
                    continue
                same = bool(torch.equal(out.view(torch.int16), ref[:m].view(torch.int16)))

                def fn(a, b, out=out, cfg=cfg):
                    launch(a[None], b[None], None, out[None], cfg)

                tc = time_torch({"config": fn}, arg_sets, target_ms=1.0, rounds=10)["config"]
                tf = 2 * m * k * n / tc.median_us / 1e6
                rows.append({"k": k, "n": n, "m": m, "config": str(cfg), "us": tc.median_us, "tflops": tf,
                             "gbs": wbytes / tc.median_us / 1e3, "same_bits": same,
                             "vs_torch": t.median_us / tc.median_us})
                if best is None or tc.median_us < best[1]:
                    best = (str(cfg), tc.median_us)
                print(f"   {str(cfg):28s} {tc.median_us:9.2f} us {tf:7.1f} TF/s x{t.median_us / tc.median_us:5.2f} "
                      f"bits {'same' if same else 'DIFFER'}", flush=True)
            print(f"   best {best}", flush=True)
        del weights, a_full, ref
        torch.cuda.empty_cache()
        (args.out / "tune_matmul.json").write_text(json.dumps(rows, indent=1))
    (args.out / "tune_matmul.json").write_text(json.dumps({"time": time.time(), "rows": rows}, indent=1))
    return 0


def _parse_configs(text: str) -> list[TileConfig]:
    out = []
    for item in text.split(";"):
        fields = item.split(",")
        nums = [int(f) for f in fields if f not in ("tma", "ws")]
        out.append(TileConfig(*nums, tma="tma" in fields, warp_specialize="ws" in fields))
    return out


if __name__ == "__main__":
    raise SystemExit(main())

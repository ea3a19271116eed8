"""Where attention's composed backward (``bi_torch.ops.grad._Attention``)
first depends on the batch: each intermediate of a sequence's backward,
computed in a batch of several sequences and alone, compared bitwise::

    python -m bench.probes.attention_grad_bits [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import bi_torch


def stages(q, k, v, g, causal=True):
    """The backward's intermediates, as ``_Attention.backward`` computes them."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)

    def heads(t, repeat=1):
        t = t.float().permute(0, 2, 1, 3)
        return t.repeat_interleave(repeat, dim=1) if repeat > 1 else t

    out = {}
    with torch.no_grad():
        o = bi_torch.attention(q, k, v, causal=causal)
        out["forward"] = o
        qh, kh, vh, oh, gh = heads(q), heads(k, group), heads(v, group), heads(o), heads(g)
        out["scores"] = bi_torch.matmul(qh, kh.transpose(-1, -2))
        scores = out["scores"] * scale
        visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        scores = scores.masked_fill(~visible, float("-inf"))
        out["p"] = p = bi_torch.softmax(scores, -1)
        out["delta"] = delta = bi_torch.sum(gh * oh, -1, keepdim=True)
        out["dp"] = dp = bi_torch.matmul(gh, vh.transpose(-1, -2))
        out["ds"] = ds = p * (dp - delta) * scale
        out["dq"] = bi_torch.matmul(ds, kh)
        out["dk_heads"] = bi_torch.matmul(ds.transpose(-1, -2), qh)
        out["dv_heads"] = bi_torch.matmul(p.transpose(-1, -2), gh)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_grad_bits", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    lines = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for length in (37, 128, 300, 1000):
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(5, length, 4, 64, device="cuda", dtype=dtype, generator=gen)
            k, v = (torch.randn(5, length, 1, 64, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
            g = torch.randn(5, length, 4, 64, device="cuda", dtype=dtype, generator=gen)
            full = stages(q, k, v, g)
            alone = stages(q[2:3], k[2:3], v[2:3], g[2:3])
            diff = [name for name in full if not torch.equal(full[name][2:3], alone[name])]
            lines.append(f"L={length} {str(dtype).removeprefix('torch.')}: differ: {', '.join(diff) or 'none'}")
            print(lines[-1], flush=True)
    # The product alone: a 4-D fp32 batch against one of its matrices.
    a = torch.randn(5, 4, 300, 64, device="cuda", generator=gen)
    b = torch.randn(5, 4, 64, 300, device="cuda", generator=gen)
    lines.append(f"fp32 4-D matmul batch vs alone: {torch.equal(bi_torch.matmul(a, b)[2:3], bi_torch.matmul(a[2:3], b[2:3]))}")
    print(lines[-1])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_grad_bits.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

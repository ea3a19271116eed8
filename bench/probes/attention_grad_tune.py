"""Tiles and launch settings of the fused torch attention backward
(``bi_torch.ops.attention_grad``) on the GPU::

    python -m bench.probes.attention_grad_tune [--out DIR]

bf16, causal, 32 query / 8 KV heads, head dim 128. For each candidate launch
of the dK/dV kernel and of the dQ kernel (the other kernels at their
defaults): the backward's time (``triton.testing.do_bench``) and how many
elements of dQ, dK, dV differ from the default launches' bits. Beside them,
PyTorch's SDPA forward + backward and bi_'s forward, for scale. One JSON line
per point.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton
import triton.testing

from bench.probes._log import jsonl_emitter
from bi_torch.ops.attention_grad import Launch, attention_backward, launches

H, HKV, D = 32, 8, 128
SHAPES = ((64, 1024), (4, 4096))  # (sequences, length): the benchmark's shape, and a long one
CANDIDATES = {
    "dkdv": [Launch(m, n, w, s) for (m, n), w, s in
             itertools.product(((64, 64), (32, 64), (32, 128), (64, 128), (16, 128)), (4, 8), (2, 3, 4))],
    "dq": [Launch(m, n, w, s) for (m, n), w, s in
           itertools.product(((64, 64), (128, 32), (128, 64), (64, 32)), (4, 8), (2, 3, 4))],
}


def _differing(a, b) -> int:
    return sum(int((x.view(torch.int16) != y.view(torch.int16)).sum()) for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_grad_tune",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--kernels", default="dkdv,dq")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_grad_tune")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40)  # noqa: E731

    from bi_torch import attention

    torch.manual_seed(0)
    for b, seq in SHAPES:
        q = torch.randn(b, seq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, seq, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = attention(q, k, v, causal=True)
        g = torch.randn_like(out)
        flops = b * H * 7 * 2 * seq * seq * D / 2  # the seven recomputed or gradient products, causal half
        shape = {"b": b, "seq": seq}

        def sdpa():
            qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, (qt, kt, vt), g.transpose(1, 2))

        emit({**shape, "what": "sdpa forward+backward", "ms": bench(sdpa)})
        emit({**shape, "what": "bi_ forward", "ms": bench(lambda: attention(q, k, v, causal=True))})
        ref = attention_backward(q, k, v, out, g, True)
        ms = bench(lambda: attention_backward(q, k, v, out, g, True))
        emit({**shape, "what": "bi_ backward (default launches)", "launches": {n: list(c) for n, c in
                                                                              launches(D).items()},
              "ms": ms, "tflops": round(flops / ms / 1e9, 1)})
        for kernel in args.kernels.split(","):
            for cand in CANDIDATES[kernel]:
                rec = {**shape, "kernel": kernel, "launch": list(cand)}
                try:
                    got = attention_backward(q, k, v, out, g, True, config={kernel: cand})
                    rec["differing"] = _differing(got, ref)
                    rec["ms"] = bench(lambda: attention_backward(q, k, v, out, g, True, config={kernel: cand}))
                    rec["tflops"] = round(flops / rec["ms"] / 1e9, 1)
                except triton.runtime.errors.OutOfResources as e:
                    rec["error"] = repr(e)[:200]
                emit(rec)


if __name__ == "__main__":
    main()

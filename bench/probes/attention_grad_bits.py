"""Whether attention's gradients (``bi_torch.ops.attention_grad``, through
autograd) of a sequence depend on the batch: computed in a batch of several
sequences and alone (a view of the batch, as the property's "slice" plans
take it, and a copy), compared bitwise. Lengths and dtypes of the gradient
properties, plans on and off::

    python -m bench.probes.attention_grad_bits [--out DIR] [--lengths 1,37,...]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

import bi_torch
from bi_torch import _plan
from bench.probes._log import jsonl_emitter


def gradients(q, k, v):
    """The autograd gradients of ``sum(attention(q, k, v)**2) / 2`` (the
    properties' loss: the cotangent is the output)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = bi_torch.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), out.detach())
    return dict(zip(("grad_q", "grad_k", "grad_v"), grads))


def _first_diff(full, alone, row):
    return [name for name in full if not torch.equal(full[name][row:row + 1], alone[name])]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_grad_bits", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--lengths", default="1,37,64,100,300,1000,2048")
    p.add_argument("--batch", type=int, default=5)
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_grad_bits")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = [int(s) for s in args.lengths.split(",")]
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    row = 2
    for plans, length, dtype in itertools.product((True, False), lengths, dtypes):
        _plan.ENABLED = plans
        shape = (args.batch, length)
        q = torch.randn(*shape, 4, 64, device=device, generator=gen).to(dtype)
        k, v = (torch.randn(*shape, 1, 64, device=device, generator=gen).to(dtype) for _ in range(2))
        full_grads = gradients(q, k, v)
        for layout in ("view", "copy"):
            pick = (lambda t: t[row:row + 1]) if layout == "view" else (lambda t: t[row:row + 1].clone())
            alone_grads = gradients(pick(q), pick(k), pick(v))
            emit({"plans": plans, "length": length, "dtype": str(dtype).removeprefix("torch."), "alone": layout,
                  "gradients_differ": _first_diff(full_grads, alone_grads, row)})
    _plan.ENABLED = True
    # The product alone: a 4-D fp32 batch against one of its matrices.
    a = torch.randn(5, 4, 300, 64, device=device, generator=gen)
    b = torch.randn(5, 4, 64, 300, device=device, generator=gen)
    emit({"fp32 4-D matmul batch vs alone equal": torch.equal(bi_torch.matmul(a, b)[2:3], bi_torch.matmul(a[2:3], b[2:3]))})


if __name__ == "__main__":
    main()

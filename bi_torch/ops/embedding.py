"""Embedding lookup whose weight gradient is summed in a fixed order.

The forward is a gather (``torch.nn.functional.embedding``): exact, so every row's bits are
its own. The backward sums, for each row of the table, the output gradients
of the tokens that looked it up: a scatter-add, which the frameworks' GPU
kernels do with atomics or a schedule-dependent sort. Here the token
positions are sorted stably by id (``torch.sort(stable=True)``: a fixed
permutation of the positions), and one program per (run of equal ids, block
of columns) adds that id's gradients in increasing token position, in fp32,
rounding once into the table's dtype. A given batch of ids and gradients
always gives the same bits; another batch, other sums (as it must).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bi_torch import direct as _direct
from bi_torch._checks import canonical, check_launchable
from bi_torch._launch import fast


@fast
@triton.jit
def _embedding_grad_kernel(SORTED_IDS, ORDER, G, OUT, n, h, num_rows, BLOCK: tl.constexpr):
    """Program (j, c): if sorted position j starts a run of equal ids, the
    sum of that run's gradient rows over columns block c, in position order."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < h
    row = tl.load(SORTED_IDS + j)
    prev = tl.load(SORTED_IDS + tl.maximum(j - 1, 0))
    if ((j == 0) | (prev != row)) & (row >= 0) & (row < num_rows):  # ids outside the table: no gradient
        acc = tl.zeros((BLOCK,), tl.float32)
        k = j
        while (k < n) & (tl.load(SORTED_IDS + tl.minimum(k, n - 1)) == row):
            pos = tl.load(ORDER + k).to(tl.int64)
            acc += tl.load(G + pos * h + cols, mask=ok, other=0.0).to(tl.float32)
            k += 1
        tl.store(OUT + row.to(tl.int64) * h + cols, acc.to(OUT.dtype.element_ty), mask=ok)


def embedding_backward(ids: torch.Tensor, g: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``weight[ids]`` with respect to a ``(num_rows, h)``
    weight, for the output gradient ``g`` (``ids.shape + (h,)``). Ids outside
    ``[0, num_rows)`` contribute nothing (the drop-in mode marks
    ``padding_idx``'s tokens -1), and nothing is written for them."""
    h = g.shape[-1]
    out = torch.zeros((num_rows, h), dtype=dtype, device=g.device)
    flat = ids.reshape(-1)
    n = flat.numel()
    if n == 0 or h == 0:
        return out
    sorted_ids, order = torch.sort(flat, stable=True)
    g2d = canonical(g.reshape(n, h))
    block = min(1024, triton.next_power_of_2(h))
    _embedding_grad_kernel[(n, triton.cdiv(h, block))](sorted_ids, order, g2d, out, n, h, num_rows, BLOCK=block)
    return out


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.num_rows, ctx.dtype = weight.shape[0], weight.dtype
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(ids, g, ctx.num_rows, ctx.dtype)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.embedding(ids, weight)`` without its options:
    rows of a ``(num_embeddings, dim)`` floating-point table for integer
    ``ids`` of any shape (out-of-range ids fail as they do there). Its weight
    gradient is summed in a fixed order (module docstring), so a training
    step gives the same bits on every run. A table that requires grad must be
    where the backward's kernel can run: a CUDA tensor, or a CPU tensor under
    the Triton interpreter."""
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.embedding(embedding, ids, weight)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding: ids must be an int32 or int64 tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"embedding: weight must be a 2-D floating-point tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)} "
                         f"{getattr(weight, 'dtype', '')}")
    if ids.device != weight.device:
        raise ValueError(f"embedding: ids and weight must be on the same device; ids on {ids.device}, "
                         f"weight on {weight.device}")
    if torch.is_grad_enabled() and weight.requires_grad:
        check_launchable("embedding", weight)  # the backward's kernel
        return _Embedding.apply(ids, weight)
    return torch.nn.functional.embedding(ids, weight)

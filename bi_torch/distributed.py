"""Tensor parallelism whose bits do not depend on the batch
(``bi_core.tensor_parallel``): a fixed-order all-reduce over
``torch.distributed`` and the row- and column-parallel linear layers on it.

Every function is called by every rank of ``group`` (default: the world),
collectively, as ``torch.distributed``'s own collectives are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bi_torch._checks import check_float_tensor

__all__ = ["all_reduce", "all_gather", "row_parallel_linear", "column_parallel_linear"]


def _world(op: str, group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised (call torch.distributed.init_process_group)")
    return dist.get_world_size(group)


def _gathered(x: torch.Tensor, group) -> list[torch.Tensor]:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks, as a new tensor on every rank: the
    ranks' tensors gathered, then added elementwise in rank order in fp32 and
    rounded once to ``x.dtype``. Unlike ``torch.distributed.all_reduce`` (in
    place, its order chosen by NCCL from the message size), an element's bits
    depend only on that element's values on the ranks."""
    check_float_tensor("x", x, "all_reduce")
    if _world("all_reduce", group) == 1:
        return x.clone()
    parts = _gathered(x, group)
    total = parts[0].float()  # the gathered buffers are this call's own: added into in place
    for p in parts[1:]:
        total.add_(p.float())
    return total.to(x.dtype)


def all_gather(x: torch.Tensor, dim: int = -1, group=None) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim`` in rank order (a copy: no
    arithmetic, the same bits on every rank)."""
    check_float_tensor("x", x, "all_gather")
    if _world("all_gather", group) == 1:
        return x.clone()
    return torch.cat(_gathered(x, group), dim=dim)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        group=None) -> torch.Tensor:
    """``F.linear`` with the input features split over the ranks: ``x``
    (..., K_r) and ``weight`` (N, K_r) are this rank's slices (rank order
    along K). Each rank's partial is a bi_ product kept in fp32, the partials
    are summed by :func:`all_reduce`'s rank order, ``bias`` (N,) is added
    once, and the result is rounded once to ``x.dtype``, on every rank."""
    from bi_torch.ops.matmul import matmul

    check_float_tensor("x", x, "row_parallel_linear")
    check_float_tensor("weight", weight, "row_parallel_linear")
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"row_parallel_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)}: the weight must "
                         "be (out_features, this rank's in_features) and x's last dimension its in_features")
    _world("row_parallel_linear", group)
    partial = matmul(x, weight.t(), out_dtype=torch.float32)
    total = all_reduce(partial, group)
    if bias is not None:
        check_float_tensor("bias", bias, "row_parallel_linear")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"row_parallel_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        total = total + bias.float()
    return total.to(x.dtype)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           gather: bool = False, group=None) -> torch.Tensor:
    """``F.linear`` with the output features split over the ranks: ``weight``
    (N_r, K) and ``bias`` (N_r,) are this rank's rows. Returns this rank's
    output columns (..., N_r), a bi_ linear (no reduction across ranks), or
    with ``gather`` every rank's, concatenated in rank order (..., N)."""
    from bi_torch.ops.matmul import linear

    _world("column_parallel_linear", group)
    out = linear(x, weight, bias)
    return all_gather(out, -1, group) if gather else out

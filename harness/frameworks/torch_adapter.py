"""PyTorch adapter."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from bi_torch._checks import interpreting
from harness.frameworks.base import Adapter, Fn

_BF16 = np.dtype(ml_dtypes.bfloat16)


class TorchAdapter(Adapter):
    name = "torch"
    package = "bi_torch"

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")

    def to_native(self, a: np.ndarray) -> torch.Tensor:
        a = np.require(a, requirements='C')
        if a.dtype == _BF16:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return t.to(self.device)

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_BF16)
        return t.numpy()

    def take_rows(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return t[start:stop]

    def bitwise_equal(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return bool(torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))

    def count_differing_rows(self, a: torch.Tensor, b: torch.Tensor) -> int:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        diff = a.contiguous().view(ints) != b.contiguous().view(ints)
        return int(diff.reshape(diff.shape[0], -1).any(dim=1).sum())

    def synchronize(self, t) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def default(self, op: str) -> Fn | None:
        return _DEFAULTS.get(op)



def _default_rms_norm(x, weight=None, eps=1e-6):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


def _default_matmul(a, b):
    return torch.matmul(a, b)


def _default_linear(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def _split_by_batch_matmul(a, b):
    """Control: K split into a batch-dependent number of fp32 partial products,
    as a split-K heuristic tuned per shape would."""
    splits = 1 + a.shape[0] % 4
    acc = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float32, device=a.device)
    for a_part, b_part in zip(torch.tensor_split(a, splits, dim=-1), torch.tensor_split(b, splits, dim=0)):
        acc = acc + a_part.float() @ b_part.float()
    return acc.to(a.dtype)


def _split_by_batch_rms_norm(x, weight=None, eps=1e-6):
    """Control: the row's sum of squares is split into a number of chunks that
    depends on the batch size, as a split-K reduction tuned per shape would."""
    rows = x.reshape(-1, x.shape[-1]).float()
    splits = 1 + rows.shape[0] % 4
    sumsq = torch.zeros(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    for chunk in torch.tensor_split(rows, splits, dim=-1):
        sumsq = sumsq + (chunk * chunk).sum(dim=-1, keepdim=True)
    y = rows * torch.rsqrt(sumsq / rows.shape[-1] + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype).reshape(x.shape)


def _split_by_batch_sum(x, dim=-1):
    """Control: the row split into a batch-dependent number of fp32 partial sums."""
    rows = x.float()
    splits = 1 + rows.shape[0] % 4
    total = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    for chunk in torch.tensor_split(rows, splits, dim=dim):
        total = total + chunk.sum(dim=dim)
    return total.to(x.dtype)


def _split_by_batch_softmax(x, dim=-1):
    """Control: softmax whose sum of exponentials is split by batch size."""
    rows = x.float()
    shifted = rows - rows.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return (e / _split_by_batch_sum(e, dim).unsqueeze(dim)).to(x.dtype)


_DEFAULTS: dict[str, Fn] = {
    "sum": lambda x, dim=-1: torch.sum(x, dim),
    "mean": lambda x, dim=-1: torch.mean(x, dim),
    "softmax": lambda x, dim=-1: torch.softmax(x, dim),
    "log_softmax": lambda x, dim=-1: torch.log_softmax(x, dim),
    "rms_norm": _default_rms_norm,
    "matmul": _default_matmul,
    "linear": _default_linear,
    "bmm": _default_matmul,
}
CONTROLS: dict[tuple[str, str], Fn] = {
    ("rms_norm", "split_by_batch"): _split_by_batch_rms_norm,
    ("matmul", "split_by_batch"): _split_by_batch_matmul,
    ("sum", "split_by_batch"): _split_by_batch_sum,
    ("softmax", "split_by_batch"): _split_by_batch_softmax,
}
TorchAdapter.controls = CONTROLS

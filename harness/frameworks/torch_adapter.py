"""PyTorch adapter."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from bi_torch._checks import interpreting
from harness.frameworks.base import Adapter, ArrayOps

_BF16 = np.dtype(ml_dtypes.bfloat16)
_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class TorchOps(ArrayOps):
    def f32(self, x):
        return x.float()

    def cast(self, y, like):
        return y.to(like.dtype)

    def split(self, x, sections, axis):
        return list(torch.tensor_split(x, sections, dim=axis))

    def sum(self, x, axis, keepdims=False):
        return torch.sum(x, dim=axis, keepdim=keepdims)

    def amax(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def exp(self, x):
        return torch.exp(x)

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def matmul_f32(self, a, b):
        # Full fp32 unless the user allowed tf32 (torch's default: not allowed).
        return torch.matmul(a, b)


class TorchAdapter(Adapter):
    name = "torch"
    package = "bi_torch"
    xp = TorchOps()

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")

    def to_native(self, a: np.ndarray) -> torch.Tensor:
        a = np.require(a, requirements="C")
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
        ints = _INTS[a.element_size()]
        return bool(torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))

    def count_differing_rows(self, a: torch.Tensor, b: torch.Tensor) -> int:
        ints = _INTS[a.element_size()]
        diff = a.contiguous().view(ints) != b.contiguous().view(ints)
        return int(diff.reshape(diff.shape[0], -1).any(dim=1).sum())

    def synchronize(self, t) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def grad(self, fn, wrt):
        def of(**kwargs):
            x = kwargs[wrt].detach().requires_grad_()
            with torch.enable_grad():
                out = fn(**{**kwargs, wrt: x})
                (g,) = torch.autograd.grad(out, x, out.detach())
            return g

        return of

    def primal(self, fn, wrt):
        def forward(**kwargs):
            with torch.enable_grad():
                out = fn(**{**kwargs, wrt: kwargs[wrt].detach().requires_grad_()})
            if out.grad_fn is None:
                raise AssertionError(f"{getattr(fn, '__name__', fn)}: no graph was recorded for {wrt}")
            return out.detach()

        return forward

"""Drop-in mode: run an unmodified PyTorch model through the bi_ kernels.

``set_batch_invariant_mode()`` is a ``TorchDispatchMode``: while it is active,
every aten op that PyTorch dispatches passes through it, after autograd and
after composite ops (``F.linear``, ``torch.matmul``, ``F.rms_norm`` on CPU) have
been decomposed. The ops that the bi_ kernels implement are answered by them
when their tensors are floating point (fp32, bf16, fp16) and on the GPU (or on
the CPU under the Triton interpreter):

    mm, addmm, bmm             -> bi_torch.matmul
    _softmax, _log_softmax     -> bi_torch.softmax, log_softmax
    sum, sum.dim_IntList       -> bi_torch.sum
    mean.dim                   -> bi_torch.mean
    _fused_rms_norm            -> bi_torch.rms_norm

A dispatch mode rather than ``torch.library`` kernel overrides: an override
replaces the CUDA kernel of an op for every dtype, so integer sums (exact, and
so invariant already) or float64 products would need a second implementation,
while the mode can hand anything it does not take back to PyTorch's own
kernel. Leaving the mode (also through an exception) restores PyTorch's
dispatch exactly, because nothing was registered.

Everything else runs PyTorch's kernel. With ``strict=True`` the mode raises
``BatchVarianceRisk`` instead when a floating-point op that reduces with an
order PyTorch may change with the batch (attention, layer norm, norms,
variance, matrix-vector products, convolution, or one of the ops above with an
unsupported dtype or layout) would run on a target device; otherwise such ops
run and are recorded in ``mode.unhandled``.

Under the Triton interpreter (a CPU run), unary transcendental functions
(``exp``, ``log``, ``sigmoid``, ``silu``, ``tanh``, ``gelu``, ...) on CPU tensors
are computed one element at a time: ATen's CPU kernels for them have a
vectorised and a scalar loop that can round differently, which would tie an
element's bits to its position in the tensor, and so to the batch. GPU runs
are not affected.

``torch.compile`` directives are ignored inside the mode (the compiler stance
``force_eager``): a compiled graph would run Inductor's own kernels, which the
mode cannot route, so compiled functions run eagerly through the mode and give
the eager bits. The stance is restored on leaving.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bi_torch._checks import SUPPORTED_DTYPES, interpreting
from bi_torch.ops import matmul as _mm
from bi_torch.ops import rms_norm as _rms
from bi_torch.ops import rows as _rows

__all__ = ["BatchVarianceRisk", "BatchInvariantMode", "is_batch_invariant_mode_enabled", "set_batch_invariant_mode"]

aten = torch.ops.aten


class BatchVarianceRisk(RuntimeError):
    """A strict batch-invariant mode met an op that has no invariant kernel."""


def _mm_impl(a, b):
    return _mm.matmul(a, b)


def _bmm_impl(a, b):
    return _mm.matmul(a, b)


def _addmm_impl(bias, a, b, *, beta=1, alpha=1):
    n = b.shape[-1]
    if beta == 1 and alpha == 1 and bias.dtype == a.dtype and bias.numel() == n and bias.shape[-1] == n:
        # F.linear's form: a bias row, added in fp32 before the one rounding.
        return _mm.matmul(a, b, bias=bias.reshape(n))
    # General form: the product is invariant; the elementwise rest is too.
    return beta * bias + alpha * _mm.matmul(a, b)


def _softmax_impl(x, dim, half_to_float):
    return _rows.softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _log_softmax_impl(x, dim, half_to_float):
    return _rows.log_softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _sum_impl(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.sum(x, dim, keepdim, dtype=dtype)


def _sum_all_impl(x, *, dtype=None):
    return _rows.sum(x, None, False, dtype=dtype)


def _mean_impl(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.mean(x, dim, keepdim, dtype=dtype)


def _fused_rms_norm_impl(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        raise _Unsupported("rms_norm over more than one trailing dim")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y = _rms.rms_norm(x, weight, eps)
    # The second output (1/rms per row, for the backward pass), in fp32.
    x32 = x.float()
    sq = x32 * x32
    rstd = torch.rsqrt(_rows.mean(sq, -1, keepdim=True) + eps)
    return y, rstd


class _Unsupported(Exception):
    """This call of a handled op needs the default kernel (dtype, layout)."""


_HANDLED = {
    aten.mm.default: _mm_impl,
    aten.bmm.default: _bmm_impl,
    aten.addmm.default: _addmm_impl,
    aten._softmax.default: _softmax_impl,
    aten._log_softmax.default: _log_softmax_impl,
    aten.sum.dim_IntList: _sum_impl,
    aten.sum.default: _sum_all_impl,
    aten.mean.dim: _mean_impl,
    aten._fused_rms_norm.default: _fused_rms_norm_impl,
}

# Floating-point reductions with no invariant kernel here: the strict mode
# refuses them on a target device. Op packet names, and name prefixes for the
# attention and convolution families.
_RISKY_NAMES = frozenset({
    "native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm",
    "_fused_rms_norm", "mv", "addmv", "dot", "vdot", "baddbmm", "addbmm", "addr", "logsumexp", "prod",
    "cumsum", "cumprod", "_embedding_bag", "nll_loss_forward", "nll_loss2d_forward", "mse_loss",
    "mm", "addmm", "bmm", "_softmax", "_log_softmax", "sum", "mean", "nansum", "_int_mm",
})
_RISKY_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention",
                   "convolution", "_convolution", "cudnn_convolution", "miopen_convolution", "_slow_conv",
                   "slow_conv", "_conv_depthwise")


# Under the Triton interpreter (a CPU run), unary functions whose ATen CPU
# kernels have a vectorised loop and a scalar loop that need not agree bit for
# bit (measured with torch 2.11: silu and sigmoid of a row alone and inside a
# batch of 6 differed in the last bit; pytorch/pytorch#48641 is the same split
# for sinh). The element's position in the tensor, and so the batch, would
# pick its code path. GPU kernels compute every element with the same code.
_CPU_TRANSCENDENTAL = frozenset({
    aten.exp.default, aten.exp2.default, aten.expm1.default, aten.log.default, aten.log1p.default,
    aten.log2.default, aten.sigmoid.default, aten.silu.default, aten.tanh.default, aten.gelu.default,
    aten.erf.default, aten.rsqrt.default, aten.sin.default, aten.cos.default, aten.tan.default,
    aten.sinh.default, aten.cosh.default, aten.softplus.default, aten.mish.default, aten.elu.default,
})


# Their in-place forms (``F.silu(x, inplace=True)``): computed as above, then
# written back.
_CPU_TRANSCENDENTAL_INPLACE = {
    getattr(aten, f"{op.overloadpacket.__name__}_").default: op
    for op in _CPU_TRANSCENDENTAL
    if hasattr(aten, f"{op.overloadpacket.__name__}_")
}


def _one_element_at_a_time(func, args, kwargs):
    """``func`` on a strided copy of its input: ATen's CPU kernels take the
    scalar loop for every element of a non-contiguous input, whatever its
    position, so no element takes the vector path."""
    x = args[0]
    spread = torch.empty((x.numel(), 2), dtype=x.dtype, device=x.device)[:, 0]
    spread.copy_(x.reshape(-1))
    inplace = _CPU_TRANSCENDENTAL_INPLACE.get(func)
    out = (inplace or func)(spread, *args[1:], **kwargs).reshape(x.shape)
    return x.copy_(out) if inplace else out


def _tensors(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _on_target(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


class BatchInvariantMode(TorchDispatchMode):
    """The dispatch mode behind :func:`set_batch_invariant_mode`."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        # Ops that ran PyTorch's kernel on a target device although they may
        # reduce in a batch-dependent order (lenient mode), with counts.
        self.unhandled: Counter[str] = Counter()
        # Ops that the bi_ kernels answered, with counts.
        self.handled: Counter[str] = Counter()

    def __enter__(self):
        self._stance = torch.compiler.set_stance("force_eager")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stance.__exit__(None, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors(args, kwargs))
        floating = [t for t in tensors if t.is_floating_point()]
        target = bool(floating) and all(_on_target(t) for t in tensors)
        impl = _HANDLED.get(func)
        if impl is not None and target and all(t.dtype in SUPPORTED_DTYPES for t in floating):
            try:
                out = impl(*args, **kwargs)
            except _Unsupported as why:
                self._risky(func, str(why))
            else:
                self.handled[str(func)] += 1
                return out
        elif target and (func.overloadpacket.__name__ in _RISKY_NAMES
                         or func.overloadpacket.__name__.startswith(_RISKY_PREFIXES)):
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in floating})
            self._risky(func, f"dtypes {', '.join(dtypes)}" if impl is not None else "no invariant kernel")
        elif (func in _CPU_TRANSCENDENTAL or func in _CPU_TRANSCENDENTAL_INPLACE) and interpreting() and args \
                and isinstance(args[0], torch.Tensor) \
                and args[0].device.type == "cpu" and args[0].is_floating_point():
            return _one_element_at_a_time(func, args, kwargs)
        return func(*args, **kwargs)

    def _risky(self, func, why: str) -> None:
        if self.strict:
            raise BatchVarianceRisk(
                f"{func} has no batch-invariant kernel here ({why}); PyTorch's kernel may change its "
                "reduction order with the batch size. Leave strict mode to run it anyway (it is then "
                "listed in mode.unhandled)."
            )
        self.unhandled[str(func)] += 1


# Modes switched on by set_batch_invariant_mode, innermost last.
_ACTIVE: list[BatchInvariantMode] = []


class set_batch_invariant_mode:  # noqa: N801  (named like torch.set_grad_enabled, and used alike)
    """Run PyTorch ops through the batch-invariant kernels.

    Like ``torch.set_grad_enabled``, it acts when called and, used in a
    ``with`` statement, restores the previous state on exit (also through an
    exception)::

        with bi_torch.set_batch_invariant_mode(strict=True) as mode:
            logits = model(tokens)        # mode.handled: what the bi_ kernels ran

        bi_torch.set_batch_invariant_mode(True)    # on for what follows
        bi_torch.set_batch_invariant_mode(False)   # off again, PyTorch's dispatch as before

    ``strict=True``: raise :class:`BatchVarianceRisk` on ops without an
    invariant kernel instead of running them (see the module docstring).
    """

    def __init__(self, enabled: bool = True, *, strict: bool = False) -> None:
        self._previous = list(_ACTIVE)
        if enabled:
            self.mode: BatchInvariantMode | None = BatchInvariantMode(strict=strict)
            self.mode.__enter__()
            _ACTIVE.append(self.mode)
        else:
            self.mode = None
            _switch_off()

    def __enter__(self) -> BatchInvariantMode | None:
        return self.mode

    def __exit__(self, *exc) -> None:
        _switch_off(keep=len(self._previous))
        for mode in self._previous[len(_ACTIVE):]:
            mode.__enter__()
            _ACTIVE.append(mode)


def _switch_off(keep: int = 0) -> None:
    """Leave the modes that this module entered, innermost first, down to ``keep``."""
    while len(_ACTIVE) > keep:
        _ACTIVE.pop().__exit__(None, None, None)


def is_batch_invariant_mode_enabled() -> bool:
    return bool(_ACTIVE)

"""Drop-in mode: run an unmodified PyTorch model through the bi_ kernels.

``set_batch_invariant_mode()`` is a ``TorchDispatchMode``: while it is active,
every aten op that PyTorch dispatches passes through it, after autograd and
after composite ops (``F.linear``, ``torch.matmul``, ``F.rms_norm`` on CPU) have
been decomposed. The ops that the bi_ kernels implement are answered by them
when their tensors are floating point (fp32, bf16, fp16) and on the GPU (or on
the CPU under the Triton interpreter):

    mm, addmm, bmm             -> bi_torch.matmul
    _softmax, _log_softmax     -> bi_torch.softmax, log_softmax
    _safe_softmax              -> bi_torch.softmax, zeros where a row is all -inf
    sum, sum.dim_IntList       -> bi_torch.sum
    mean.dim, mean             -> bi_torch.mean
    _fused_rms_norm            -> bi_torch.rms_norm
    _softmax_backward_data, _log_softmax_backward_data, _fused_rms_norm_backward
                               -> bi_torch.ops.rows_grad (autograd's backward)
    embedding_dense_backward   -> bi_torch.ops.embedding (token order)
    nll_loss_forward, nll_loss_backward (no class weights, (N, C) or (C,) inputs)
                               -> the picked log-probabilities summed by bi_torch.sum

and, one level up (a ``TorchFunctionMode`` entered with it),
``F.scaled_dot_product_attention`` -> ``bi_torch.scaled_dot_product_attention``,
before torch picks a backend. The function mode also keeps
``nn.MultiheadAttention`` and ``TransformerEncoderLayer`` off their fused
inference fast paths (which test for torch-function modes). An SDPA call made
inside another function's ``__torch_function__`` handling (as
``F.multi_head_attention_forward`` does) is not seen at that level; its
backend op is refused in strict mode.

A dispatch mode, beside the ``torch.library`` kernel overrides of the
process-wide switch (``bi_torch.switch``): the mode sees every op, so it can
be strict, route ``F.scaled_dot_product_attention`` and hand anything it does
not take back to PyTorch's own kernel, at the price of host time on every op
(measured in ``python -m bench --host-cost``). Leaving the mode (also through
an exception) restores PyTorch's dispatch exactly, because nothing was
registered.

Everything else runs PyTorch's kernel. With ``strict=True`` the mode raises
``BatchVarianceRisk`` instead when a floating-point op that is not routed may
combine several input elements into one output element (attention, norms,
convolution, cumulative sums, ``index_add_``, ``scatter_add_``, FFTs, pooling
by averages, one of the ops above with an unsupported dtype or layout, or on
CPU tensors without the Triton interpreter); otherwise such ops run and are
recorded in ``mode.unhandled``. What may combine elements is decided from the
op, not from a list of risky ops: every floating-point op may, except those
tagged pointwise, views, and a list of ops that only move, select or compare
elements (``_EXACT_NAMES``), so an op missing from both is refused rather
than passed.

Under the Triton interpreter (a CPU run), unary transcendental functions
(``exp``, ``log``, ``sigmoid``, ``silu``, ``tanh``, ``gelu``, ...) on CPU tensors
are computed one element at a time: ATen's CPU kernels for them have a
vectorised and a scalar loop that can round differently, which would tie an
element's bits to its position in the tensor, and so to the batch. GPU runs
are not affected.

``torch.compile`` directives are ignored inside the mode (the compiler stance
``force_eager``): a compiled graph would run Inductor's own kernels, which the
mode cannot route, so compiled functions run eagerly through the mode and give
the eager bits. The stance is process-wide: it holds from the first mode
entered in any thread until the last one is left, then is restored.

The mode is per thread, as torch's dispatch modes are: a thread that did not
enter it runs PyTorch's dispatch (``is_batch_invariant_mode_enabled()`` is
false there).
"""

from __future__ import annotations

import functools
import threading
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bi_torch._checks import SUPPORTED_DTYPES, interpreting
from bi_torch.ops import attention as _attn
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
    if beta == 0:
        # torch ignores the bias when beta is 0 (NaN and inf in it included).
        product = _mm.matmul(a, b)
        return product if alpha == 1 else alpha * product
    if beta == 1 and alpha == 1 and bias.dtype == a.dtype and bias.dim() >= 1 and bias.numel() == n \
            and bias.shape[-1] == n:
        # F.linear's form: a bias row, added in fp32 before the one rounding.
        return _mm.matmul(a, b, bias=bias.reshape(n))
    # General form: the product is invariant; the elementwise rest is too.
    return beta * bias + alpha * _mm.matmul(a, b)


def _softmax_impl(x, dim, half_to_float):
    return _rows.softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _safe_softmax_impl(x, dim, dtype=None):
    # softmax, with zeros for a row whose every entry is -inf (SDPA's math
    # backend masks with it): elementwise after the invariant softmax.
    out = _rows.softmax(x, dim, dtype=_out_dtype(dtype))
    return torch.where(torch.isneginf(x).all(dim, keepdim=True), 0.0, out)


def _log_softmax_impl(x, dim, half_to_float):
    return _rows.log_softmax(x, dim, dtype=torch.float32 if half_to_float else None)


def _out_dtype(dtype):
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise _Unsupported(f"dtype={str(dtype).removeprefix('torch.')}")
    return dtype


def _sum_impl(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.sum(x, dim, keepdim, dtype=_out_dtype(dtype))


def _sum_all_impl(x, *, dtype=None):
    return _rows.sum(x, None, False, dtype=_out_dtype(dtype))


def _mean_impl(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.mean(x, dim, keepdim, dtype=_out_dtype(dtype))


def _mean_all_impl(x, *, dtype=None):
    return _rows.mean(x, None, False, dtype=_out_dtype(dtype))


def _fused_rms_norm_impl(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        raise _Unsupported("rms_norm over more than one trailing dim")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    # The second output (1/rms per row, for the backward pass) in fp32, from the same kernel.
    return _rms.rms_norm_with_rstd(x, weight, eps)


def _softmax_backward_impl(g, out, dim, input_dtype):
    from bi_torch.ops.rows_grad import normalise_backward

    return normalise_backward("softmax", out, g, dim, input_dtype)


def _log_softmax_backward_impl(g, out, dim, input_dtype):
    from bi_torch.ops.rows_grad import normalise_backward

    return normalise_backward("log_softmax", out, g, dim, input_dtype)


def _fused_rms_norm_backward_impl(g, x, normalized_shape, rstd, weight, output_mask):
    from bi_torch.ops.rows_grad import rms_norm_backward

    if len(normalized_shape) != 1:
        raise _Unsupported("rms_norm over more than one trailing dim")
    need_x, need_w = output_mask
    grad_x, grad_w = rms_norm_backward(x, weight, rstd, g, need_x, bool(need_w))
    return grad_x if need_x else None, grad_w


def _embedding_dense_backward_impl(g, indices, num_weights, padding_idx, scale_grad_by_freq):
    from bi_torch.ops.embedding import embedding_backward

    if scale_grad_by_freq:
        raise _Unsupported("scale_grad_by_freq")
    if indices.is_floating_point() or indices.is_complex():
        raise _Unsupported(f"indices of dtype {indices.dtype}")
    if padding_idx >= 0:  # the padding row's tokens give no gradient
        indices = torch.where(indices == padding_idx, -1, indices)
    return embedding_backward(indices, g, num_weights, g.dtype)


def _nll_picked(x, target, weight, ignore_index):
    """(-x[i, target[i]] where target[i] is not ignored, else 0; the
    non-ignored mask), of a (N, C) or (C,) input."""
    if weight is not None:
        raise _Unsupported("class weights")
    x2, t = (x, target) if x.ndim == 2 else (x.unsqueeze(0), target.reshape(1))
    if x2.ndim != 2 or t.ndim != 1:
        raise _Unsupported(f"input of {x.ndim} dims")
    valid = t != ignore_index
    picked = x2.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, -picked, torch.zeros((), dtype=x.dtype, device=x.device)), valid


def _nll_loss_forward_impl(x, target, weight, reduction, ignore_index):
    """``F.nll_loss`` without class weights: the picked log-probabilities
    (exact), summed over the tokens in fp32 by ``bi_torch.sum`` in its fixed
    order (then one IEEE division by the kept-token count for the mean),
    rounded to x's dtype."""
    picked, valid = _nll_picked(x, target, weight, ignore_index)
    count = valid.sum().to(torch.float32)  # exact in fp32 (a bf16 count rounds past 256)
    if reduction == 0:  # none
        return (picked if x.ndim == 2 else picked[0]), torch.zeros((), dtype=x.dtype, device=x.device)
    total = _rows.sum(picked, 0, False, dtype=torch.float32)
    return (total / count if reduction == 1 else total).to(x.dtype), count.to(x.dtype)


def _nll_loss_backward_impl(g, x, target, weight, reduction, ignore_index, total_weight):
    """Its gradient: ``-g`` (over the token count for the mean) at each
    non-ignored target, zeros elsewhere; one rounding per element."""
    _, valid = _nll_picked(x.detach(), target, weight, ignore_index)
    x2, t = (x, target) if x.ndim == 2 else (x.unsqueeze(0), target.reshape(1))
    # The mean's divisor: the kept targets counted in fp32 where ``total_weight``
    # (in x's dtype, so rounded past bf16's 256) is that count, else ``total_weight``.
    count = valid.sum().to(torch.float32)
    divisor = torch.where(count.to(total_weight.dtype) == total_weight, count, total_weight.float())
    scale = -g.float() / divisor if reduction == 1 else -g
    value = scale.reshape(-1) if reduction == 0 else scale.expand(t.shape)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    grad = torch.zeros_like(x2).scatter_(1, torch.where(valid, t, 0).unsqueeze(1),
                                         torch.where(valid, value.to(x.dtype), zero).unsqueeze(1))
    return grad if x.ndim == 2 else grad[0]


class _Unsupported(Exception):
    """This call of a handled op needs the default kernel (dtype, layout)."""


# The same calls by a plan made before (``bi_torch._plan``), without the
# checks; None where no plan fits, and the implementations above run.
def _mm_planned(a, b):
    return _mm.planned(a, b)


def _bmm_planned(a, b):
    return _mm.planned(a, b)


def _addmm_planned(bias, a, b, *, beta=1, alpha=1):
    if beta == 1 and alpha == 1 and bias.ndim == 1:  # F.linear's form
        return _mm.planned(a, b, bias)
    return None


def _softmax_planned(x, dim, half_to_float):
    return None if half_to_float else _rows.planned("softmax", x, dim)


def _log_softmax_planned(x, dim, half_to_float):
    return None if half_to_float else _rows.planned("log_softmax", x, dim)


def _sum_planned(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.planned("sum", x, dim, dtype, keepdim)


def _mean_planned(x, dim=None, keepdim=False, *, dtype=None):
    return _rows.planned("mean", x, dim, dtype, keepdim)


def _fused_rms_norm_planned(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        return None
    return _rms.planned(x, weight, torch.finfo(x.dtype).eps if eps is None else eps, with_rstd=True)


_PLANNED = {
    aten.mm.default: _mm_planned,
    aten.bmm.default: _bmm_planned,
    aten.addmm.default: _addmm_planned,
    aten._softmax.default: _softmax_planned,
    aten._log_softmax.default: _log_softmax_planned,
    aten.sum.dim_IntList: _sum_planned,
    aten.mean.dim: _mean_planned,
    aten._fused_rms_norm.default: _fused_rms_norm_planned,
}


_HANDLED = {
    aten.mm.default: _mm_impl,
    aten.bmm.default: _bmm_impl,
    aten.addmm.default: _addmm_impl,
    aten._softmax.default: _softmax_impl,
    aten._log_softmax.default: _log_softmax_impl,
    aten._safe_softmax.default: _safe_softmax_impl,
    aten.sum.dim_IntList: _sum_impl,
    aten.sum.default: _sum_all_impl,
    aten.mean.dim: _mean_impl,
    aten.mean.default: _mean_all_impl,
    aten._fused_rms_norm.default: _fused_rms_norm_impl,
    # Backward formulas (autograd above the mode)
    aten._softmax_backward_data.default: _softmax_backward_impl,
    aten._log_softmax_backward_data.default: _log_softmax_backward_impl,
    aten._fused_rms_norm_backward.default: _fused_rms_norm_backward_impl,
    aten.embedding_dense_backward.default: _embedding_dense_backward_impl,
    # The loss of a training step (cross_entropy = log_softmax + nll_loss)
    aten.nll_loss_forward.default: _nll_loss_forward_impl,
    aten.nll_loss_backward.default: _nll_loss_backward_impl,
}

# Strictness follows what an op does, not a list of risky ops: a
# floating-point op that is not routed is refused (strict) or counted
# (lenient) unless it cannot combine several input elements into one output
# element with rounding. Those are the ops tagged pointwise, views (an aliased
# result of an op that mutates nothing), and the ops below, which move or
# select elements (or compare them: max, sort, a max pool) and so give the
# same bits in any batch. An op that PyTorch adds later is refused until it
# is listed here.
_EXACT_NAMES = frozenset({
    # copies, casts and layout
    "clone", "copy", "copy_", "_to_copy", "_unsafe_view", "_reshape_copy", "_reshape_alias_copy", "contiguous",
    "view_copy", "permute_copy", "transpose_copy", "t_copy", "expand_copy", "slice_copy", "select_copy",
    "unsqueeze_copy", "squeeze_copy", "split_copy", "split_with_sizes_copy", "unbind_copy", "narrow_copy",
    "unfold_copy", "alias_copy", "detach_copy", "lift_fresh_copy", "_pin_memory", "resize_", "set_",
    "record_stream", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "fill", "fill_", "zero_",
    # gathers, scatters without accumulation, concatenation, padding, repeats
    "embedding", "index", "index_select", "gather", "take", "take_along_dim", "masked_select", "cat", "stack",
    "hstack", "vstack", "tril", "triu", "flip", "roll", "rot90", "repeat", "repeat_interleave", "tile",
    "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
    "replication_pad2d", "replication_pad3d", "_pad_circular", "index_copy", "index_copy_", "index_fill",
    "index_fill_", "masked_scatter", "masked_scatter_", "slice_scatter", "select_scatter", "diagonal_scatter",
    "as_strided_scatter", "diag", "diag_embed", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "one_hot",
    # comparisons and selections (exact in any order)
    "max", "min", "amax", "amin", "aminmax", "argmax", "argmin", "sort", "argsort", "topk", "kthvalue", "median",
    "nanmedian", "mode", "cummax", "cummin", "_cummax_helper", "_cummin_helper", "max_pool1d", "max_pool2d",
    "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "equal", "allclose", "isin", "searchsorted", "bucketize", "nonzero", "nonzero_static",
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "any", "all", "count_nonzero",
    "_local_scalar_dense", "is_nonzero", "is_same_size", "_assert_async", "_assert_scalar",
    # random fills (no arithmetic on other elements)
    "bernoulli", "bernoulli_", "uniform_", "normal", "normal_", "exponential_", "random_", "native_dropout",
    "rand", "randn", "randint", "randperm", "multinomial",
})

# Ops that move elements, unless told to accumulate them.
_ACCUMULATE_FLAG = {"index_put": "accumulate", "index_put_": "accumulate", "_index_put_impl": "accumulate",
                    "_index_put_impl_": "accumulate"}


def _argument(func, args, kwargs, name, default=None):
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else default
    return default


@functools.lru_cache(maxsize=None)
def _kind(func) -> bool | str:
    """What ``func`` does, once per op: False (cannot combine elements), True
    (may), or the name of the argument that decides it."""
    if torch.Tag.pointwise in func.tags:
        return False
    schema = func._schema
    if not schema.is_mutable and schema.returns and all(r.alias_info is not None for r in schema.returns):
        return False  # a view
    name = func.overloadpacket.__name__
    if name in _ACCUMULATE_FLAG:
        return _ACCUMULATE_FLAG[name]
    if name in ("scatter", "scatter_"):
        return "reduce" in func._overloadname  # scatter.reduce, scatter.value_reduce: accumulate
    return name not in _EXACT_NAMES


def _may_reduce(func, args, kwargs) -> bool:
    """Whether ``func`` may combine several input elements into one output
    element with rounding (an order that may follow the batch)."""
    kind = _kind(func)
    if isinstance(kind, str):
        return bool(_argument(func, args, kwargs, kind, False))
    return kind


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


@functools.lru_cache(maxsize=None)
def _passes(func) -> bool:
    """Whether the mode runs every call of ``func`` as it is, whatever its
    arguments: not routed, unable to combine elements, and not one that the
    interpreter computes one element at a time (decided once per op)."""
    if func in _HANDLED or _kind(func) is not False:
        return False
    return not (interpreting() and (func in _CPU_TRANSCENDENTAL or func in _CPU_TRANSCENDENTAL_INPLACE))


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
        # Why a call the mode would route ran torch's function instead (the
        # last reason per function).
        self.declined: dict[str, str] = {}
        self._functions = _AttentionRouting(self)

    def __enter__(self):
        _force_eager()
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._functions.__exit__(None, None, None)
            _restore_stance()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        planned = _PLANNED.get(func)
        if planned is not None:
            out = planned(*args, **kwargs)
            if out is not None:
                self.handled[str(func)] += 1
                return out
        elif _passes(func):
            return func(*args, **kwargs)
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
        elif floating and (impl is not None or _may_reduce(func, args, kwargs)):
            self._risky(func, _why(impl is not None, target, tensors, floating))
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


_SDPA = torch.nn.functional.scaled_dot_product_attention


class _AttentionRouting(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` (whatever backend torch would pick)
    to ``bi_torch.scaled_dot_product_attention``, entered with the dispatch
    mode: below this level the call is already one backend's aten op. A call
    the kernel does not take (dropout, a head dim or dtype it lacks, inputs
    that require grad) runs torch's function, whose backend op the dispatch
    mode then refuses (strict) or lists (lenient)."""

    def __init__(self, mode: BatchInvariantMode) -> None:
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            tensors = list(_tensors(args, kwargs))
            if tensors and all(_on_target(t) for t in tensors) and all(
                    t.dtype in SUPPORTED_DTYPES for t in tensors[:3]):
                try:
                    out = _attn.scaled_dot_product_attention(*args, **kwargs)
                except (ValueError, NotImplementedError, TypeError) as why:
                    self.mode.declined["scaled_dot_product_attention"] = str(why)
                else:
                    self.mode.handled["scaled_dot_product_attention"] += 1
                    return out
        return func(*args, **kwargs)


def _why(routed: bool, target: bool, tensors, floating) -> str:
    if not target:
        devices = sorted({str(t.device) for t in tensors})
        return (f"its tensors are on {', '.join(devices)}: the bi_ kernels run on CUDA tensors, and on CPU "
                "tensors only under the Triton interpreter (TRITON_INTERPRET=1 before importing bi_torch)")
    if routed:
        return "dtypes " + ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in floating}))
    return "no invariant kernel, and it may combine several elements into one"


# Modes switched on by set_batch_invariant_mode, innermost last.
# Dispatch modes are per thread (torch keeps a mode stack per thread), and so
# is this record of them.
_LOCAL = threading.local()


def _active() -> list[BatchInvariantMode]:
    if not hasattr(_LOCAL, "modes"):
        _LOCAL.modes = []
    return _LOCAL.modes


# The compiler stance is process-wide: force_eager from the first mode
# entered in any thread until the last one is left; otherwise, while the
# process-wide switch is on, the default stance with its backend forced
# (``bi_torch.compile``); otherwise whatever it was before.
_STANCE_LOCK = threading.Lock()
_STANCE: dict = {"depth": 0, "backend": None, "context": None}


def _apply_stance() -> None:
    # Called with _STANCE_LOCK held: leave our stance (which restores the one
    # we found), then enter the one the state asks for.
    if _STANCE["context"] is not None:
        context, _STANCE["context"] = _STANCE["context"], None
        context.__exit__(None, None, None)
    if _STANCE["depth"]:
        _STANCE["context"] = torch.compiler.set_stance("force_eager")
    elif _STANCE["backend"] is not None:
        _STANCE["context"] = torch.compiler.set_stance("default", force_backend=_STANCE["backend"])


def _force_eager() -> None:
    with _STANCE_LOCK:
        _STANCE["depth"] += 1
        if _STANCE["depth"] == 1:
            _apply_stance()


def _restore_stance() -> None:
    with _STANCE_LOCK:
        _STANCE["depth"] -= 1
        if _STANCE["depth"] == 0:
            _apply_stance()


def _force_backend(backend) -> None:
    """``torch.compile`` calls use ``backend`` (None: their own again)."""
    with _STANCE_LOCK:
        _STANCE["backend"] = backend
        _apply_stance()


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
        self._previous = list(_active())
        if enabled:
            self.mode: BatchInvariantMode | None = BatchInvariantMode(strict=strict)
            self.mode.__enter__()
            _active().append(self.mode)
        else:
            self.mode = None
            _switch_off()

    def __enter__(self) -> BatchInvariantMode | None:
        return self.mode

    def __exit__(self, *exc) -> None:
        _switch_off(keep=len(self._previous))
        for mode in self._previous[len(_active()):]:
            mode.__enter__()
            _active().append(mode)


def _switch_off(keep: int = 0) -> None:
    """Leave the modes that this module entered, innermost first, down to ``keep``."""
    active = _active()
    while len(active) > keep:
        active.pop().__exit__(None, None, None)


def is_batch_invariant_mode_enabled() -> bool:
    return bool(_active())

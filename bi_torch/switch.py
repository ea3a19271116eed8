"""The process-wide switch: the bi_ kernels as the CUDA kernels of aten ops.

``enable_batch_invariant_mode()`` registers, with ``torch.library``, new CUDA
kernels (CPU kernels when bi_torch runs under the Triton interpreter) for the
aten ops that the bi_ kernels implement::

    aten::mm, aten::bmm, aten::addmm   -> bi_torch.matmul
    aten::_softmax, aten::_log_softmax -> bi_torch.softmax, log_softmax
    aten::sum.dim_IntList              -> bi_torch.sum
    aten::mean.dim                     -> bi_torch.mean
    aten::_fused_rms_norm              -> bi_torch.rms_norm

and the backward formulas of these under autograd::

    aten::_softmax_backward_data, _log_softmax_backward_data,
    aten::_fused_rms_norm_backward     -> bi_torch.ops.rows_grad
    aten::embedding_dense_backward     -> bi_torch.ops.embedding (token order)
    aten::nll_loss_forward, _backward  -> picked log-probabilities, bi_torch.sum
                                          (``F.cross_entropy``, ``F.nll_loss`` of (N, C) or (C,)
                                          inputs; no class weights)

and, through them, the ops that PyTorch builds from these (``F.linear``,
``torch.matmul``, ``torch.sum(x)``, ``torch.mean(x)``, ``F.rms_norm``,
``aten::_safe_softmax``, SDPA's math backend). It holds in every thread, as
``torch.library`` registrations do, and costs nothing for the ops it does not
override: they never reach Python. ``disable_batch_invariant_mode()`` removes
the registrations, which restores PyTorch's kernels exactly. Both act when
called and, in a ``with`` statement, restore the previous state on exit;
``is_batch_invariant_mode()`` says whether the switch is on. ``with``
blocks nest, and they may overlap in several threads: the newest call still
in force decides the state, so one thread's exit does not switch the kernels
off under another thread's open block. ``BI_BATCH_INVARIANT=1`` in the
environment turns it on when bi_torch is imported (for servers).

A call that the bi_ kernels do not take runs PyTorch's own kernel (through
the op's ``out=`` form, which is not overridden): integer and boolean sums
(exact, so invariant already) silently, float64 and complex tensors, or a
call the kernels refuse (a layout or argument they lack), with a
``BatchVarianceWarning`` once per op and reason; :func:`fallbacks` counts
them. For a refusal instead, use the strict dispatch mode,
``set_batch_invariant_mode(strict=True)``, which also sees the ops the switch
does not cover (attention backends, convolutions, cumulative sums, ...).

``F.scaled_dot_product_attention`` is not overridden (its backends' aten ops
return softmax statistics and RNG state that the bi_ kernel does not
produce): route attention with ``set_batch_invariant_mode()``, with
``bi_torch.scaled_dot_product_attention`` or, in transformers models, with
``attn_implementation="batch_invariant"`` (``bi_torch.hf``).

While the switch is on, ``torch.compile`` calls use the batch-invariant
Inductor backend (``bi_torch.compile``; the compiler stance
``force_backend``): Inductor would lower ``aten::mm`` and reductions to its own
kernels, which the overrides cannot reach, so compiled graphs take the same
ops as custom ops instead, and a graph with a reduction that has no bi_ kernel
is refused (``BatchVarianceRisk``). CUDA graphs capture and replay the bi_
kernels (``torch.cuda.graph``, or ``compile_backend(mode="reduce-overhead")``).

Autograd runs above the overrides: under ``torch.autograd`` a forward
product is computed by the bi_ kernel and its gradient products by the bi_
kernel too (they are ``aten::mm`` calls); softmax's, log_softmax's,
RMSNorm's and the embedding's backward ops are overridden as above, so a
training step gives the bits of the bi_ ops' own gradients. Attention's
backward is not (SDPA is not overridden).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections import Counter

import torch

from bi_torch import mode as _mode
from bi_torch._checks import SUPPORTED_DTYPES, interpreting

__all__ = ["BatchVarianceWarning", "disable_batch_invariant_mode", "enable_batch_invariant_mode", "fallbacks",
           "is_batch_invariant_mode"]

aten = torch.ops.aten


class BatchVarianceWarning(UserWarning):
    """A call under the process-wide switch ran PyTorch's kernel for a float tensor."""


def _empty(x, dtype=None):
    return x.new_empty(0, dtype=dtype or x.dtype)


def _sum_dtype(x, dtype):
    if dtype is not None:
        return dtype
    return torch.int64 if not (x.is_floating_point() or x.is_complex()) else x.dtype


def _rms_fallback(x, normalized_shape, weight=None, eps=None):
    # No out= form: the composite, in x's dtype (float64 here), whose mean is
    # itself overridden and so falls back to PyTorch's kernel.
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    y = x * rstd
    return (y * weight if weight is not None else y), rstd


def _rms_backward_fallback(g, x, normalized_shape, rstd, weight, output_mask):
    # No out= form: the composite, in fp32 at least (float64 stays float64),
    # rounded once to the inputs' dtypes.
    work = torch.promote_types(x.dtype, torch.float32)
    x32, g32, r32 = x.to(work), g.to(work), rstd.to(work)
    w32 = weight.to(work) if weight is not None else None
    dims = list(range(x.ndim - len(normalized_shape), x.ndim))
    xhat = x32 * r32
    gw = g32 * w32 if w32 is not None else g32
    grad_x = (r32 * (gw - xhat * (gw * xhat).mean(dims, keepdim=True))).to(x.dtype) if output_mask[0] else None
    grad_w = None
    if weight is not None and output_mask[1]:
        grad_w = (g32 * xhat).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
    return grad_x, grad_w


# op name (overload) -> (bi_ implementation, PyTorch's kernel through out=).
_OVERRIDES = {
    "mm": (_mode._mm_impl, lambda a, b: aten.mm.out(a, b, out=_empty(a))),
    "bmm": (_mode._bmm_impl, lambda a, b: aten.bmm.out(a, b, out=_empty(a))),
    "addmm": (_mode._addmm_impl,
              lambda c, a, b, *, beta=1, alpha=1: aten.addmm.out(c, a, b, beta=beta, alpha=alpha, out=_empty(a))),
    "_softmax": (_mode._softmax_impl,
                 lambda x, dim, half: aten._softmax.out(x, dim, half, out=_empty(x, torch.float32 if half else None))),
    "_log_softmax": (_mode._log_softmax_impl,
                     lambda x, dim, half: aten._log_softmax.out(
                         x, dim, half, out=_empty(x, torch.float32 if half else None))),
    "sum.dim_IntList": (_mode._sum_impl,
                        lambda x, dim=None, keepdim=False, *, dtype=None: aten.sum.IntList_out(
                            x, dim, keepdim, dtype=dtype, out=_empty(x, _sum_dtype(x, dtype)))),
    "mean.dim": (_mode._mean_impl,
                 lambda x, dim=None, keepdim=False, *, dtype=None: aten.mean.out(
                     x, dim, keepdim, dtype=dtype, out=_empty(x, dtype))),
    "_fused_rms_norm": (_mode._fused_rms_norm_impl, _rms_fallback),
    # Backward formulas (autograd runs above the overrides)
    "_softmax_backward_data": (_mode._softmax_backward_impl,
                               lambda g, y, dim, dt: aten._softmax_backward_data.out(
                                   g, y, dim, dt, grad_input=_empty(g, dt))),
    "_log_softmax_backward_data": (_mode._log_softmax_backward_impl,
                                   lambda g, y, dim, dt: aten._log_softmax_backward_data.out(
                                       g, y, dim, dt, out=_empty(g, dt))),
    "_fused_rms_norm_backward": (_mode._fused_rms_norm_backward_impl, _rms_backward_fallback),
    "nll_loss_forward": (_mode._nll_loss_forward_impl,
                         lambda x, t, w, red, ign: aten.nll_loss_forward.output(
                             x, t, w, red, ign, output=_empty(x), total_weight=_empty(x))),
    "nll_loss_backward": (_mode._nll_loss_backward_impl,
                          lambda g, x, t, w, red, ign, tw: aten.nll_loss_backward.grad_input(
                              g, x, t, w, red, ign, tw, grad_input=_empty(x))),
    "embedding_dense_backward": (_mode._embedding_dense_backward_impl,
                                 lambda g, i, n, pad, freq: aten.embedding_dense_backward.out(
                                     g, i, n, pad, freq, out=_empty(g))),
}

_FALLBACKS: Counter[str] = Counter()
_WARNED: set[tuple[str, str]] = set()
# An override that runs inside another one (a bi_ wrapper calling an
# overridden op) goes straight to PyTorch's kernel.
_INSIDE = threading.local()


def _floats_supported(args, kwargs) -> tuple[bool, bool]:
    """(any float tensor, all float tensors in a supported dtype)."""
    any_float, supported = False, True
    for t in _mode._tensors(args, kwargs):
        if t.is_floating_point() or t.is_complex():
            any_float = True
            supported = supported and t.dtype in SUPPORTED_DTYPES
    return any_float, supported


def _fallback(name, default, args, kwargs, why, floats):
    out = default(*args, **kwargs)  # a call PyTorch refuses raises here, neither counted nor warned
    if floats:
        _FALLBACKS[name] += 1
        if (name, why) not in _WARNED:
            _WARNED.add((name, why))
            warnings.warn(f"aten::{name} ran PyTorch's kernel under the batch-invariant switch ({why}); its "
                          "reduction order may change with the batch size", BatchVarianceWarning, stacklevel=3)
    return out


def _kernel(name, impl, default):
    packet, _, overload = name.partition(".")
    planned = _mode._PLANNED.get(getattr(getattr(aten, packet), overload or "default"))

    def run(*args, **kwargs):
        if planned is not None:
            out = planned(*args, **kwargs)
            if out is not None:
                return out
        floats, supported = _floats_supported(args, kwargs)
        if not (floats and supported) or getattr(_INSIDE, "active", False):
            why = "dtype " + ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in _mode._tensors(
                args, kwargs)})) if floats and not supported else "inside a bi_ kernel's wrapper"
            return _fallback(name, default, args, kwargs, why, floats and not supported)
        _INSIDE.active = True
        try:
            # Below autograd: the graph is recorded above, so the kernels'
            # forward-only check must not see the tensors' requires_grad.
            with torch.no_grad():
                return impl(*args, **kwargs)
        except (_mode._Unsupported, ValueError, TypeError, NotImplementedError) as why:
            reason = str(why).splitlines()[0][:200]
        finally:
            _INSIDE.active = False
        return _fallback(name, default, args, kwargs, reason, True)

    run.__name__ = f"bi_{name.replace('.', '_')}"
    return run


_LOCK = threading.Lock()
_STATE: dict = {"library": None, "backend": None}
# The calls that decide the state, oldest first; the newest decides. A
# ``with`` block's call holds until the block exits. A call not entered as a
# ``with`` (its thread made another call since) holds for good: it becomes the
# base state, and the calls before it are dropped.
_HOLDS: list["enable_batch_invariant_mode"] = []
_BASE: dict = {"on": False, "backend": None}


def _apply(on: bool, backend=None) -> None:
    """Make the overrides and the forced ``torch.compile`` backend ``on``
    with ``backend`` (off: removed). Under ``_LOCK``."""
    if on:
        if _STATE["library"] is None:
            lib = torch.library.Library("aten", "IMPL")
            key = "CPU" if interpreting() else "CUDA"
            with warnings.catch_warnings():
                # "Overriding a previously registered kernel": the point.
                warnings.simplefilter("ignore", UserWarning)
                for name, (impl, default) in _OVERRIDES.items():
                    lib.impl(name, _kernel(name, impl, default), key)
            _STATE["library"] = lib
        if backend is not _STATE["backend"]:
            _STATE["backend"] = backend
            _mode._force_backend(backend)
    elif _STATE["library"] is not None:
        lib, _STATE["library"], _STATE["backend"] = _STATE["library"], None, None
        lib._destroy()
        _mode._force_backend(None)


def _settle() -> None:
    """Apply what the newest call still holding asks for, else the base. Under ``_LOCK``."""
    top = _HOLDS[-1] if _HOLDS else None
    _apply(*((top._target, top._backend) if top is not None else (_BASE["on"], _BASE["backend"])))


@functools.lru_cache(maxsize=None)
def _default_backend():
    from bi_torch.compile import compile_backend

    return compile_backend()


def _switch(on: bool) -> None:
    """Set the base state (``BI_BATCH_INVARIANT``) where no call holds another."""
    with _LOCK:
        _BASE.update(on=on, backend=_default_backend() if on else None)
        _settle()


class enable_batch_invariant_mode:  # noqa: N801  (acts when called, like torch.set_grad_enabled)
    """Turn the process-wide switch on (for every thread); in a ``with``
    statement, until the block exits::

        bi_torch.enable_batch_invariant_mode()      # on for the rest of the process

        with bi_torch.enable_batch_invariant_mode():
            logits = model(tokens)                  # off again after, if nothing else holds it on

    The newest call decides the state; when a ``with`` block exits, the state
    is what the newest call still in force asks for (a block still open in
    another thread, or the last call made without ``with``). Blocks may
    overlap in several threads: one thread's exit does not switch the state
    under another thread's open block, unless a newer call decided otherwise.

    ``compile_backend``: the backend of every ``torch.compile`` call while the
    switch is on (default: the backend in force, else
    ``bi_torch.compile_backend()``, Inductor with the bi_ kernels;
    ``bi_torch.compile_backend(mode="reduce-overhead")`` for CUDA graphs).
    """

    _target = True

    def __init__(self, compile_backend=None) -> None:
        if compile_backend is not None and not callable(compile_backend):
            raise TypeError(f"compile_backend must be a torch.compile backend (a callable), got "
                            f"{type(compile_backend).__name__}")
        self._thread = threading.get_ident()
        self._scoped = False
        with _LOCK:
            if self._target and compile_backend is None:
                compile_backend = _STATE["backend"] or _default_backend()
            self._backend = compile_backend if self._target else None
            # This thread's earlier calls that were not entered as ``with``
            # blocks were plain calls, in force for good: the newest of them is
            # the base now, and every call before it no longer counts.
            plain = [i for i, h in enumerate(_HOLDS) if h._thread == self._thread and not h._scoped]
            if plain:
                newest = _HOLDS[plain[-1]]
                _BASE.update(on=newest._target, backend=newest._backend)
                del _HOLDS[:plain[-1] + 1]
            _HOLDS.append(self)
            _settle()

    def __enter__(self) -> None:
        with _LOCK:
            self._scoped = True
        return None

    def __exit__(self, *exc) -> None:
        with _LOCK:
            if self in _HOLDS:
                _HOLDS.remove(self)
            _settle()


class disable_batch_invariant_mode(enable_batch_invariant_mode):  # noqa: N801
    """Turn the process-wide switch off (PyTorch's kernels exactly as before);
    in a ``with`` statement, until the block exits (see
    :class:`enable_batch_invariant_mode` for blocks in several threads)."""

    _target = False

    def __init__(self) -> None:
        super().__init__()


def is_batch_invariant_mode() -> bool:
    """Whether the process-wide switch is on."""
    return _STATE["library"] is not None


def fallbacks() -> dict[str, int]:
    """Float calls that ran PyTorch's kernel under the switch, per op, since
    the process started (each also warned once per reason)."""
    return dict(_FALLBACKS)


_ENV = "BI_BATCH_INVARIANT"


def _from_environment() -> None:
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "0", "false", "off", "no"):
        return
    if value not in ("1", "true", "on", "yes"):
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: expected 1 (switch on at import) or 0")
    _switch(True)

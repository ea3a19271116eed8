"""``torch.compile`` with the bi_ kernels: custom ops and an Inductor backend.

The aten ops that the bi_ kernels implement are also custom ops,
``torch.ops.bi_torch.<op>``, with the aten op's schema and the same kernels
and fallbacks as the process-wide switch (``bi_torch.switch``)::

    aten::mm, bmm, addmm               -> bi_torch::mm, bmm, addmm
    aten::_softmax, _log_softmax       -> bi_torch::softmax, log_softmax
    aten::_safe_softmax                -> bi_torch::safe_softmax
    aten::sum.dim_IntList, sum         -> bi_torch::sum
    aten::mean.dim, mean               -> bi_torch::mean
    aten::_fused_rms_norm              -> bi_torch::rms_norm
    aten::_softmax_backward_data, _log_softmax_backward_data
                                       -> bi_torch::softmax_backward, log_softmax_backward
    aten::_fused_rms_norm_backward     -> bi_torch::rms_norm_backward
    aten::embedding_dense_backward     -> bi_torch::embedding_dense_backward
    aten::nll_loss_forward, _backward  -> bi_torch::nll_loss_forward, nll_loss_backward

and, in the graph Dynamo captures (before torch picks an SDPA backend),
``F.scaled_dot_product_attention`` -> ``bi_torch::scaled_dot_product_attention``;

and ``bi_torch::attention`` is ``bi_torch.attention`` (``bi_torch.hf``'s
attention calls it while compiling).

:func:`compile_backend` returns a ``torch.compile`` backend: Inductor with
decompositions that turn those aten ops into the custom ops before Inductor
lowers anything, so a compiled graph runs the bi_ kernels where eager would,
and Inductor's own kernels for the rest (pointwise ops, which are invariant
in any batch; intermediates are rounded to their dtype as eager rounds them,
``emulate_precision_casts``). A graph that still holds a floating-point op
which may combine elements in a batch-dependent order (a layer norm's
variance, a cumulative sum, a convolution, ...) is refused with
:class:`~bi_torch.BatchVarianceRisk` naming the ops, never compiled onto
Inductor's own reductions::

    model = torch.compile(model, backend=bi_torch.compile_backend())
    graphed = torch.compile(model, backend=bi_torch.compile_backend(mode="reduce-overhead"))

While the process-wide switch is on, every ``torch.compile`` call uses this
backend (the compiler stance ``force_backend``): the ``backend``, ``mode`` and
``options`` given to ``torch.compile`` are not used then. Pass
``enable_batch_invariant_mode(compile_backend=...)`` to choose the backend's
mode (``"reduce-overhead"`` for CUDA graphs). Graphs compiled before the switch
was turned on are recompiled: Dynamo guards the backend a graph was compiled
with. AOTAutograd's cache is bypassed in this backend (its key does not hold
the decompositions, so it could return a graph compiled without them).

Training: the custom ops have no autograd formula of their own; under
autograd, the aten ops' formulas are traced above them (AOTAutograd), and
the backward graph's products, softmax, RMSNorm and embedding backward ops
run the bi_ kernels too. The attention custom ops are inference-only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bi_torch import mode as _mode
from bi_torch import switch as _switch

__all__ = ["compile_backend"]

aten = torch.ops.aten
Tensor = torch.Tensor


def _fresh(out, inputs):
    """A custom op may not return an input or a view of one."""
    outs = out if isinstance(out, tuple) else (out,)
    storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    fixed = tuple(o.clone() if o.numel() and o.untyped_storage().data_ptr() in storages else o for o in outs)
    return fixed if isinstance(out, tuple) else fixed[0]


def _kernel(name):
    impl, default = _switch._OVERRIDES[name]
    return _switch._kernel(name, impl, default)


_MM = _kernel("mm")
_BMM = _kernel("bmm")
_ADDMM = _kernel("addmm")
_SOFTMAX = _kernel("_softmax")
_LOG_SOFTMAX = _kernel("_log_softmax")
_SUM = _kernel("sum.dim_IntList")
_MEAN = _kernel("mean.dim")
_RMS = _kernel("_fused_rms_norm")
_SOFTMAX_BACKWARD = _kernel("_softmax_backward_data")
_LOG_SOFTMAX_BACKWARD = _kernel("_log_softmax_backward_data")
_RMS_BACKWARD = _kernel("_fused_rms_norm_backward")
_EMBEDDING_BACKWARD = _kernel("embedding_dense_backward")
_NLL = _kernel("nll_loss_forward")
_NLL_BACKWARD = _kernel("nll_loss_backward")
_SAFE_SOFTMAX = _switch._kernel(
    "_safe_softmax", _mode._safe_softmax_impl, lambda x, dim, dtype=None: aten._safe_softmax.default(x, dim, dtype))


@torch.library.custom_op("bi_torch::mm", mutates_args=())
def mm(a: Tensor, b: Tensor) -> Tensor:
    return _fresh(_MM(a, b), (a, b))


@torch.library.custom_op("bi_torch::bmm", mutates_args=())
def bmm(a: Tensor, b: Tensor) -> Tensor:
    return _fresh(_BMM(a, b), (a, b))


@torch.library.custom_op("bi_torch::addmm", mutates_args=())
def addmm(bias: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    return _fresh(_ADDMM(bias, a, b, beta=beta, alpha=alpha), (bias, a, b))


@torch.library.custom_op("bi_torch::softmax", mutates_args=())
def softmax(x: Tensor, dim: int, half_to_float: bool) -> Tensor:
    return _fresh(_SOFTMAX(x, dim, half_to_float), (x,))


@torch.library.custom_op("bi_torch::log_softmax", mutates_args=())
def log_softmax(x: Tensor, dim: int, half_to_float: bool) -> Tensor:
    return _fresh(_LOG_SOFTMAX(x, dim, half_to_float), (x,))


@torch.library.custom_op("bi_torch::safe_softmax", mutates_args=())
def safe_softmax(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    return _fresh(_SAFE_SOFTMAX(x, dim, dtype), (x,))


@torch.library.custom_op("bi_torch::sum", mutates_args=())
def sum(x: Tensor, dim: Sequence[int] | None = None, keepdim: bool = False,  # noqa: A001
        dtype: torch.dtype | None = None) -> Tensor:
    return _fresh(_SUM(x, dim, keepdim, dtype=dtype), (x,))


@torch.library.custom_op("bi_torch::mean", mutates_args=())
def mean(x: Tensor, dim: Sequence[int] | None = None, keepdim: bool = False,
         dtype: torch.dtype | None = None) -> Tensor:
    return _fresh(_MEAN(x, dim, keepdim, dtype=dtype), (x,))


@torch.library.custom_op("bi_torch::rms_norm", mutates_args=())
def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> tuple[Tensor, Tensor]:
    return _fresh(_RMS(x, list(normalized_shape), weight, eps), (x, weight))


@torch.library.custom_op("bi_torch::softmax_backward", mutates_args=())
def softmax_backward(g: Tensor, out: Tensor, dim: int, input_dtype: torch.dtype) -> Tensor:
    return _fresh(_SOFTMAX_BACKWARD(g, out, dim, input_dtype), (g, out))


@torch.library.custom_op("bi_torch::log_softmax_backward", mutates_args=())
def log_softmax_backward(g: Tensor, out: Tensor, dim: int, input_dtype: torch.dtype) -> Tensor:
    return _fresh(_LOG_SOFTMAX_BACKWARD(g, out, dim, input_dtype), (g, out))


@torch.library.custom_op("bi_torch::rms_norm_backward", mutates_args=())
def rms_norm_backward(g: Tensor, x: Tensor, normalized_shape: Sequence[int], rstd: Tensor, weight: Tensor | None,
                      need_x: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """``aten::_fused_rms_norm_backward``; an output not asked for is empty
    (a custom op returns tensors only)."""
    dx, dw = _RMS_BACKWARD(g, x, list(normalized_shape), rstd, weight, [need_x, need_weight])
    return _fresh((dx if dx is not None else x.new_empty(0), dw if dw is not None else x.new_empty(0)),
                  (g, x, rstd, weight))


@torch.library.custom_op("bi_torch::embedding_dense_backward", mutates_args=())
def embedding_dense_backward(g: Tensor, indices: Tensor, num_weights: int, padding_idx: int,
                             scale_grad_by_freq: bool) -> Tensor:
    return _fresh(_EMBEDDING_BACKWARD(g, indices, num_weights, padding_idx, scale_grad_by_freq), (g,))


@torch.library.custom_op("bi_torch::nll_loss_forward", mutates_args=())
def nll_loss_forward(x: Tensor, target: Tensor, weight: Tensor | None, reduction: int,
                     ignore_index: int) -> tuple[Tensor, Tensor]:
    return _fresh(_NLL(x, target, weight, reduction, ignore_index), (x, target, weight))


@torch.library.custom_op("bi_torch::nll_loss_backward", mutates_args=())
def nll_loss_backward(g: Tensor, x: Tensor, target: Tensor, weight: Tensor | None, reduction: int,
                      ignore_index: int, total_weight: Tensor) -> Tensor:
    return _fresh(_NLL_BACKWARD(g, x, target, weight, reduction, ignore_index, total_weight),
                  (g, x, target, weight, total_weight))


@torch.library.custom_op("bi_torch::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None) -> Tensor:
    """``bi_torch.attention`` (B, L, H, D) as one node of a compiled graph."""
    from bi_torch.ops.attention import attention as run

    return _fresh(run(q, k, v, causal=causal, scale=scale).contiguous(), (q, k, v))


@torch.library.custom_op("bi_torch::scaled_dot_product_attention", mutates_args=())
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``bi_torch.scaled_dot_product_attention`` (B, H, L, E): its result is
    (B, L, H, E) in memory, transposed, like the flash backend's."""
    from bi_torch.ops.attention import scaled_dot_product_attention as run

    out = run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _fresh(out.transpose(1, 2).contiguous().transpose(1, 2), (query, key, value, attn_mask))


@torch.library.custom_op("bi_torch::sdpa_from_first_visible", mutates_args=())
def sdpa_from_first_visible(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor,
                            scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``bi_torch.ops.attention.sdpa_from_first_visible``: (B, H, L, E) in,
    (B, L, H, E) out (transformers' layout)."""
    from bi_torch.ops.attention import sdpa_from_first_visible as run

    return _fresh(run(query, key, value, attn_mask, scale=scale, enable_gqa=enable_gqa),
                  (query, key, value, attn_mask))


@sdpa_from_first_visible.register_fake
def _(query, key, value, attn_mask, scale=None, enable_gqa=False):
    b, h, length, _ = query.shape
    return query.new_empty((b, length, h, value.shape[-1]))


@attention.register_fake
def _(q, k, v, causal=False, scale=None):
    return q.new_empty(q.shape)


@scaled_dot_product_attention.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    b, h, length, _ = query.shape
    return query.new_empty((b, length, h, value.shape[-1])).transpose(1, 2)


# Shapes, dtypes and strides for tracing: those of the aten op (its meta
# kernel), which the bi_ kernels' outputs match.
mm.register_fake(lambda a, b: aten.mm.default(a, b))
bmm.register_fake(lambda a, b: aten.bmm.default(a, b))
addmm.register_fake(lambda bias, a, b, beta=1.0, alpha=1.0: aten.addmm.default(bias, a, b, beta=beta, alpha=alpha))
softmax.register_fake(lambda x, dim, half: aten._softmax.default(x, dim, half))
log_softmax.register_fake(lambda x, dim, half: aten._log_softmax.default(x, dim, half))
safe_softmax.register_fake(lambda x, dim, dtype=None: aten._safe_softmax.default(x, dim, dtype))
sum.register_fake(lambda x, dim=None, keepdim=False, dtype=None: aten.sum.dim_IntList(x, dim, keepdim, dtype=dtype))
mean.register_fake(lambda x, dim=None, keepdim=False, dtype=None: aten.mean.dim(x, dim, keepdim, dtype=dtype))
rms_norm.register_fake(lambda x, shape, weight=None, eps=None: aten._fused_rms_norm.default(x, shape, weight, eps))
softmax_backward.register_fake(lambda g, out, dim, dt: aten._softmax_backward_data.default(g, out, dim, dt))
log_softmax_backward.register_fake(lambda g, out, dim, dt: aten._log_softmax_backward_data.default(g, out, dim, dt))
rms_norm_backward.register_fake(lambda g, x, shape, rstd, weight, need_x, need_w: (
    torch.empty_like(x) if need_x else x.new_empty(0),
    torch.empty_like(weight) if weight is not None and need_w else x.new_empty(0)))
embedding_dense_backward.register_fake(lambda g, indices, n, pad, freq: g.new_empty((n, g.shape[-1])))
nll_loss_forward.register_fake(lambda x, t, w, red, ign: aten.nll_loss_forward.default(x, t, w, red, ign))
nll_loss_backward.register_fake(lambda g, x, t, w, red, ign, tw: torch.empty_like(x))


def _rms_norm_backward(g, x, shape, rstd, weight, output_mask):
    dx, dw = _OPS.rms_norm_backward.default(g, x, shape, rstd, weight, bool(output_mask[0]), bool(output_mask[1]))
    return dx if output_mask[0] else None, dw if weight is not None and output_mask[1] else None


_OPS = torch.ops.bi_torch
DECOMPOSITIONS = {
    aten.mm.default: _OPS.mm.default,
    aten.bmm.default: _OPS.bmm.default,
    aten.addmm.default: lambda bias, a, b, *, beta=1, alpha=1: _OPS.addmm.default(
        bias, a, b, float(beta), float(alpha)),
    aten._softmax.default: _OPS.softmax.default,
    aten._log_softmax.default: _OPS.log_softmax.default,
    aten._safe_softmax.default: lambda x, dim, dtype=None: _OPS.safe_softmax.default(x, dim, dtype),
    aten.sum.dim_IntList: lambda x, dim=None, keepdim=False, *, dtype=None: _OPS.sum.default(
        x, dim, keepdim, dtype),
    aten.sum.default: lambda x, *, dtype=None: _OPS.sum.default(x, None, False, dtype),
    aten.mean.dim: lambda x, dim=None, keepdim=False, *, dtype=None: _OPS.mean.default(x, dim, keepdim, dtype),
    aten.mean.default: lambda x, *, dtype=None: _OPS.mean.default(x, None, False, dtype),
    aten._fused_rms_norm.default: lambda x, shape, weight=None, eps=None: _OPS.rms_norm.default(
        x, shape, weight, eps),
    # Backward formulas (in the graphs AOTAutograd traces for training)
    aten._softmax_backward_data.default: _OPS.softmax_backward.default,
    aten._log_softmax_backward_data.default: _OPS.log_softmax_backward.default,
    aten._fused_rms_norm_backward.default: _rms_norm_backward,
    aten.embedding_dense_backward.default: _OPS.embedding_dense_backward.default,
    # The loss (F.cross_entropy, F.nll_loss)
    aten.nll_loss_forward.default: _OPS.nll_loss_forward.default,
    aten.nll_loss_backward.default: _OPS.nll_loss_backward.default,
}
"""aten op -> the custom op that replaces it in a compiled graph."""


_SDPA = torch._C._nn.scaled_dot_product_attention


def route_attention(gm: torch.fx.GraphModule) -> int:
    """Replace ``F.scaled_dot_product_attention`` calls of a Dynamo graph by
    the bi_ attention's custom op; how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _SDPA:
            node.target = _OPS.scaled_dot_product_attention.default
            count += 1
    if count:
        gm.recompile()
    return count


def _is_float(value) -> bool:
    values = value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) for v in values)


def risky_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The aten ops of a traced graph that may combine floating-point elements
    in a batch-dependent order (the dispatch mode's rule, ``mode._may_reduce``)."""
    found = []
    for node in gm.graph.nodes:
        func = node.target
        if node.op != "call_function" or not isinstance(func, torch._ops.OpOverload) or func.namespace != "aten":
            continue
        values = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
        if _is_float(values) and _mode._may_reduce(func, node.args, node.kwargs):
            found.append(str(func))
    return sorted(set(found))


# Pointwise aten ops whose Inductor kernels give the bits of ATen's CUDA
# kernels under eager numerics (each intermediate rounded to its dtype, no FMA
# contraction, division rounded to nearest, no flush to zero): on an H100,
# each op alone over every bf16 and fp16 value and 2**22 fp32 values (specials
# among them) gave ATen's bits (``python -m bench.probes.pointwise_bits``, with
# ``fuse=True``). The fused runs of a Llama layer under this marking are checked
# by a GPU test in ``tests/test_compile.py`` (passed on an H100; bench/NOTES.md).
# Measured to differ, so left on ATen: sigmoid (fp16, fp32),
# reciprocal (fp32), gelu (both forms). silu kept ATen's bits too, but
# Inductor has no lowering of it (it decomposes it), so it stays on ATen here,
# as do casts (``_to_copy``; ``_EXACT_DECOMPOSITIONS``); a ``convert_element_type``
# between these float dtypes (round to nearest even in both) is marked. ``add``/``sub`` only without ``alpha``
# (ATen's kernel may fuse ``a + alpha * b`` into one FMA), ``pow`` only squared. ``neg`` stays on
# ATen: Inductor's kernel computes it as ``0 - x``, which turns -0.0 into +0.0 (GPU test, H100).
_EXACT_POINTWISE = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.exp.default, aten.rsqrt.default, aten.sqrt.default, aten.sin.default, aten.cos.default,
    aten.tanh.default, aten.log.default, aten.pow.Tensor_Scalar,
    # data movement and float casts (no arithmetic)
    aten.clone.default, aten.cat.default, aten.where.self, aten.copy.default,
    torch.ops.prims.convert_element_type.default,
})
_CONVERT = torch.ops.prims.convert_element_type.default


def _float_cast(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    """``_to_copy`` as ``convert_element_type`` where it only changes a CUDA
    tensor's dtype among bf16, fp16 and fp32 (so that Inductor may fuse the
    cast); any other copy stays ATen's ``_to_copy``."""
    if (dtype in _EXACT_DTYPES and x.dtype in _EXACT_DTYPES and dtype != x.dtype and x.device.type == "cuda"
            and layout in (None, torch.strided) and (device is None or torch.device(device) == x.device)
            and not pin_memory and memory_format in (None, torch.preserve_format)):
        return _CONVERT(x, dtype)
    return NotImplemented


# Decompositions of the exact mode: none. torch's own of ``_to_copy`` (into
# ``convert_element_type``, device copies and clones), used so that casts fuse,
# gave a compiled Llama's generation other logits from its first decode step on,
# with or without any node marked (H100, ``bench.probes.exact_fusion``); kept as
# ATen's ``_to_copy``, the same marking gave eager's bits at every step.
# ``_float_cast`` (float casts only) is the candidate the probe tries next.
_EXACT_DECOMPOSITIONS: dict = {}
_EXACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
                   "eager_numerics.disable_ftz": True}


def _exact_on_cuda(node: torch.fx.Node) -> bool:
    """``node`` is one of ``_EXACT_POINTWISE`` (with its conditions) or a view,
    on CUDA tensors of the measured dtypes."""
    from torch._inductor.lowering import lowerings

    func = node.target
    if node.op != "call_function" or not isinstance(func, torch._ops.OpOverload):
        return False
    # Inductor compiles a marked node by its lowering; one without (silu,
    # _to_copy, t: Inductor decomposes those) stays on ATen.
    if not (func.is_view or func in _EXACT_POINTWISE) or func not in lowerings:
        return False
    if func in (aten.add.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) != 1:
        return False
    if func is aten.pow.Tensor_Scalar and node.args[1] != 2:
        return False
    if func is _CONVERT and not (node.args[1] in _EXACT_DTYPES and node.args[0].meta["val"].dtype in _EXACT_DTYPES):
        return False
    tensors = [v for v in [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
               if isinstance(v, Tensor)]
    return bool(tensors) and all(t.device.type == "cuda" and (t.dtype in _EXACT_DTYPES or not t.is_floating_point())
                                 for t in tensors)


def fuse_exact_pointwise(gm: torch.fx.GraphModule) -> int:
    """Mark the nodes of an aten graph that Inductor may fuse keeping eager's
    bits (``_exact_on_cuda``), for its fall-back-by-default mode, which runs
    every other node through its ATen kernel; returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if _exact_on_cuda(node):
            node.meta.setdefault("custom", {})["compile_with_inductor"] = "bi_torch: eager bits"
            count += 1
    return count


# Every op through its own kernel, as eager runs it (Inductor's "lite" mode,
# with the decompositions of this module instead of selective ones).
_EAGER_BITS = {
    "fallback_by_default": True,
    "reorder_for_peak_memory": False,
    "reorder_for_compute_comm_overlap": False,
    "use_pre_grad_passes": False,
    "use_joint_graph_passes": False,
    "use_post_grad_passes": False,
}


class compile_backend:  # noqa: N801  (a backend factory, used like torch.compile's mode strings)
    """A ``torch.compile`` backend: Inductor, with the bi_ kernels as custom
    ops for the aten ops they implement (see the module docstring).

    ``mode`` and ``options`` are ``torch.compile``'s (``"reduce-overhead"``
    for CUDA graphs, or Inductor config entries). Every other op:

    * ``fuse=False`` (the default): every other op through its ATen kernel,
      as eager runs it (eager's bits; the gain is host time: one graph, CUDA
      graphs with ``"reduce-overhead"``).
    * ``fuse="exact"`` (experimental): Inductor fuses the pointwise ops and
      views measured to give the bits of ATen's CUDA kernels under eager
      numerics (``_EXACT_POINTWISE``: arithmetic, ``exp``, ``rsqrt``,
      ``sqrt``, ``sin``, ``cos``, ``tanh``, ``log``, squares, ``cat``,
      ``where``; bf16, fp16, fp32 on CUDA); every other op, casts and
      ``neg`` among them, runs its ATen kernel. Eager's bits in fewer
      kernels: on an H100, each op over every bf16/fp16 value (casts then
      decomposed) and, with casts on ATen, the Llama generation of the
      benchmark gave eager's bits; its speed in this form is not measured.
    * ``fuse=True``: Inductor decomposes and fuses them all (intermediates
      rounded as eager rounds them): still invariant in the batch, but some
      formulas (``sigmoid``, ``gelu``, ``reciprocal``, ...) round otherwise
      than ATen's.
    """

    def __init__(self, mode: str | None = None, options: Mapping[str, object] | None = None, *,
                 fuse: bool | str = False) -> None:
        import torch._inductor

        if fuse not in (False, True, "exact"):
            raise ValueError(f"fuse={fuse!r}: expected False, 'exact' or True")
        modes = torch._inductor.list_mode_options()
        if mode is not None and mode not in modes:
            raise ValueError(f"mode={mode!r}: expected one of {sorted(modes)} or None")
        if mode is not None and "fallback_by_default" in modes[mode]:
            raise ValueError(f"mode={mode!r}: use fuse=False for ATen's kernels on the ops the bi_ kernels do not "
                             "take")
        self.mode, self.fuse = mode, fuse if fuse == "exact" else bool(fuse)
        self.__name__ = "batch_invariant"
        self.options = {**_EAGER_NUMERICS, **({} if self.fuse is True else _EAGER_BITS),
                        **modes.get(mode or "default", {}), **(options or {})}

    def __repr__(self) -> str:
        return f"bi_torch.compile_backend(mode={self.mode!r}, fuse={self.fuse})"

    def _inner(self, gm, example_inputs, **kwargs):
        from torch._inductor.compile_fx import compile_fx_inner

        risky = risky_ops(gm)
        if risky:
            raise _mode.BatchVarianceRisk(
                f"torch.compile with the batch-invariant backend: the graph holds {', '.join(risky)}, which "
                "has no bi_ kernel and would run a reduction whose order may follow the batch; run it eagerly "
                "or compute it with bi_ ops")
        if self.fuse == "exact":
            fuse_exact_pointwise(gm)
        return compile_fx_inner(gm, example_inputs, **kwargs)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        import torch._functorch.config as functorch_config
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table

        route_attention(gm)
        if self.fuse is True:
            table = {**select_decomp_table(), **DECOMPOSITIONS}
        elif self.fuse == "exact":
            table = {**_EXACT_DECOMPOSITIONS, **DECOMPOSITIONS}
        else:
            table = dict(DECOMPOSITIONS)
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=self._inner, config_patches=dict(self.options),
                              decompositions=table)

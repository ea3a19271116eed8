"""``bi_jax.batch_invariant(fn)``: run a JAX function through the bi_ kernels.

The transform traces ``fn`` to a jaxpr and evaluates it equation by equation:

* ``dot_general`` on float32 / bfloat16 / float16 operands runs
  :func:`bi_jax.dot_general`;
* ``reduce_sum`` on those dtypes runs :func:`bi_jax.sum` (so ``jnp.mean``,
  ``jax.nn.softmax`` and ``jax.nn.log_softmax``, which XLA builds from
  ``reduce_max``, ``exp`` and ``reduce_sum``, reduce in the kernels' fixed order);
* ``scatter-add`` of whole rows into a 2-D float array (the transpose of a
  row gather: the gradient of ``jnp.take(table, ids, axis=0)`` or
  ``table[ids]``, and ``jax.ops.segment_sum`` / ``.at[ids].add`` of rows)
  runs the embedding gradient's kernel (``bi_jax.ops.embedding``): each
  row's updates added in their order in fp32, rounded once, then added to
  the operand; ids out of bounds are dropped (clamped under ``mode="clip"``),
  as the scatter drops them;
* everything else runs as it is: exact reductions (``reduce_max``,
  ``reduce_min``, ``argmax``, integer sums) and elementwise ops, except that
  on the CPU backend (where the kernels run in the Pallas interpreter)
  transcendental functions (``exp``, ``log``, ``rsqrt``, ``tanh``, ...) are
  computed one element at a time: XLA:CPU's vectorised and scalar code for
  them can round differently (openxla/xla#41122 reports it for ``erf``; seen
  here for ``log`` inside ``jax.nn.log_softmax``), which would make an
  element's bits depend on its position in the array, and so on the batch;
* nested ``jit`` calls, ``custom_jvp`` / ``custom_vjp`` functions and
  rematerialised blocks are evaluated the same way, inside; so is a
  ``shard_map``'s body, under a ``shard_map`` over the same mesh and specs
  (except on the CPU backend with ``check_vma=True``, where the Pallas
  interpreter cannot run a kernel inside it: that body runs as it is);
* ``jax.nn.dot_product_attention`` (any ``implementation``: ``None``, ``"xla"``
  or ``"cudnn"``) runs :func:`bi_jax.dot_product_attention`, the fused kernel:
  while the transform traces, in that thread, the ``jax.nn`` attribute calls
  bi_jax's function (a reference to the original taken before, with
  ``from jax.nn import dot_product_attention``, is not rerouted: its xla
  implementation then runs as the products and sums above, its cudnn one is a
  foreign call). As bi_jax documents, a query whose keys are all masked gives
  zeros, where JAX's xla implementation averages the values;
* the bi_jax kernels themselves (their ``pallas_call`` primitives, named in
  ``bi_jax._checks.KERNEL_NAMES``), when ``fn`` calls bi_jax ops, run as they
  are; other Pallas kernels are refused in strict mode like any primitive
  that may reduce.

Any other primitive on floats that may combine several elements into one
(``reduce_prod``, cumulative sums, convolutions, generic ``reduce`` and
``reduce_window``, scatter-add of anything but whole rows, FFTs, linear
algebra, foreign calls and callbacks, collectives such as ``psum``, a product
or a sum in float64, and such primitives inside ``cond`` / ``while`` /
``scan`` bodies, which the transform does not rewrite) is refused with ``BatchVarianceRisk`` when
``strict=True``, else run as it is and counted in ``wrapped.unhandled``. What
may combine elements is decided from the primitive: every primitive on floats
may, except those in ``_EXACT`` (elementwise, layout, gathers, overwriting
scatters, and comparisons such as ``reduce_max`` or ``sort``), so a primitive
missing from the list is refused rather than passed.

The result composes with ``jax.jit`` and with ``jax.grad``/``jax.vjp`` for
the ops with backward rules (``bi_jax.ops.grad``; attention has none yet).
"""

from __future__ import annotations

import functools
import threading
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from bi_jax._checks import KERNEL_NAMES, SUPPORTED_DTYPES, interpret_mode
from bi_jax.ops.matmul import dot_general as _bi_dot_general
from bi_jax.ops.rows import sum as _bi_sum

__all__ = ["BatchVarianceRisk", "batch_invariant"]

_FLOATS = {np.dtype(d) for d in SUPPORTED_DTYPES}

# Strictness follows what a primitive does: a primitive on floats that is not
# routed is refused (strict) or counted (lenient) unless it computes each
# output element from one input element, or moves, selects or compares
# elements (so its bits cannot follow the batch). A primitive that JAX adds
# later is refused until it is listed here.
_EXACT = frozenset({
    # elementwise
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "bessel_i0e", "bessel_i1e",
    "bitcast_convert_type", "cbrt", "ceil", "clamp", "clz", "complex", "conj", "convert_element_type", "cos",
    "cosh", "digamma", "div", "eq", "eq_to", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt",
    "igamma", "igamma_grad_a", "igammac", "imag", "integer_pow", "is_finite", "le", "le_to", "lgamma", "log",
    "log1p", "log2", "logistic", "lt", "lt_to", "max", "min", "mul", "mulhi", "ne", "neg", "nextafter", "not",
    "one_minus_square", "or", "polygamma", "population_count", "pow", "real", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sinh",
    "sqrt", "square", "sub", "tan", "tanh", "xor", "zeta", "regularized_incomplete_beta", "random_bits",
    "random_seed", "random_wrap", "random_unwrap", "random_split", "random_fold_in", "threefry2x32",
    "rng_bit_generator", "rng_uniform", "erf_inv",
    # layout, copies, gathers, scatters that overwrite
    "broadcast_in_dim", "concatenate", "copy", "copy_p", "device_put", "dynamic_slice", "dynamic_update_slice",
    "gather", "iota", "pad", "reshape", "rev", "scatter", "slice", "split", "squeeze", "expand_dims", "stack",
    "unstack", "tile", "transpose", "sharding_constraint", "optimization_barrier", "stop_gradient", "pvary",
    "create_token", "after_all", "empty", "empty2", "dce_sink",
    # comparisons and selections: exact in any order
    "argmax", "argmin", "reduce_max", "reduce_min", "reduce_and", "reduce_or", "reduce_xor", "sort", "top_k",
    "approx_top_k", "cummax", "cummin", "reduce_window_max", "reduce_window_min", "scatter-max", "scatter-min",
    "pmax", "pmin",
})
# Calls whose body the transform evaluates itself (and so routes).
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
# Primitives whose sub-jaxprs are bodies run on the data: whether they may
# reduce is whether their bodies may.
_BODIES = _CALLS | _CUSTOM | {"cond", "while", "scan", "shard_map", "custom_linear_solve", "custom_vmap_call"}
# Elementwise functions that XLA:CPU approximates, in vector code and scalar
# code that need not agree bit for bit (IEEE ops such as add, mul, div and
# sqrt are exact in both).
_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
                   "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "pow", "rsqrt", "cbrt",
                   "erf", "erfc", "erf_inv", "lgamma", "digamma"}


class BatchVarianceRisk(RuntimeError):
    """A strict :func:`batch_invariant` transform met a reduction it cannot make invariant."""


def _is_float(x) -> bool:
    return np.dtype(x.dtype) in _FLOATS


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def _has_floats(values) -> bool:
    return any(hasattr(v, "dtype") and np.dtype(v.dtype).kind in "fc" for v in values)


def _is_bi_kernel(eqn) -> bool:
    """A pallas_call of a bi_jax kernel (fixed reduction orders by design)."""
    return eqn.primitive.name == "pallas_call" and eqn.params.get("name") in KERNEL_NAMES


def _bi_kernels(params):
    """The names of the bi_jax kernels in the bodies of an equation."""
    for jaxpr in _sub_jaxprs(params):
        for e in jaxpr.eqns:
            if _is_bi_kernel(e):
                yield e.params["name"]
            else:
                yield from _bi_kernels(e.params)


def _row_scatter_add(params, operand, indices, updates):
    """``scatter-add`` of whole rows into a 2-D float operand through the
    ordered embedding gradient; None for any other scatter-add."""
    from jax.lax import GatherScatterMode

    dims = params["dimension_numbers"]
    if not (_is_float(operand) and operand.ndim == 2 and updates.dtype == operand.dtype
            and np.issubdtype(np.dtype(indices.dtype), np.integer) and indices.ndim >= 1 and indices.shape[-1] == 1
            and updates.shape == indices.shape[:-1] + operand.shape[1:]
            and tuple(dims.update_window_dims) == (updates.ndim - 1,) and tuple(dims.inserted_window_dims) == (0,)
            and tuple(dims.scatter_dims_to_operand_dims) == (0,) and not tuple(dims.operand_batching_dims)
            and not tuple(dims.scatter_indices_batching_dims)):
        return None
    from bi_jax.ops.embedding import embedding_backward

    rows = operand.shape[0]
    ids = indices[..., 0].astype(jnp.int32)
    if params["mode"] == GatherScatterMode.CLIP:
        ids = jnp.clip(ids, 0, rows - 1)
    else:  # dropped (the kernel skips ids past the table)
        ids = jnp.where((ids < 0) | (ids >= rows), rows, ids)
    # Rows no id reaches keep the operand's bits (a -0.0 stays -0.0, as in the scatter).
    touched = jnp.zeros((rows,), bool).at[ids].set(True, mode="drop")
    return jnp.where(touched[:, None], operand + embedding_backward(ids, updates, rows, operand.dtype), operand)


def _may_reduce(eqn) -> bool:
    """Whether an equation (or one nested in it) may combine several float
    elements into one: a primitive outside ``_EXACT`` on floats."""
    name = eqn.primitive.name
    if name in _EXACT or _is_bi_kernel(eqn):
        return False
    if name in _BODIES:
        return any(_may_reduce(e) for j in _sub_jaxprs(eqn.params) for e in j.eqns)
    # Any other primitive, including those whose sub-jaxpr is a combiner
    # (reduce, reduce_window, scatter-add).
    return _has_floats([v.aval for v in (*eqn.invars, *eqn.outvars)])


def _one_element_at_a_time(primitive, invals, params):
    """``primitive`` applied to every element on its own (a loop whose body
    is scalar code), so that no element takes XLA:CPU's vector path."""
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in invals))
    flat = tuple(jnp.broadcast_to(v, shape).reshape(-1) for v in invals)
    if not flat[0].size:
        return primitive.bind(*invals, **params)
    out = jax.lax.map(lambda xs: primitive.bind(*xs, **params), flat)
    return out.reshape(shape)


class _Evaluator:
    def __init__(self, strict: bool, handled: Counter, unhandled: Counter) -> None:
        self.strict = strict
        self.handled = handled
        self.unhandled = unhandled
        self.cpu = interpret_mode("batch_invariant")

    def risky(self, name: str, why: str) -> None:
        if self.strict:
            raise BatchVarianceRisk(
                f"batch_invariant: {name} ({why}) has no batch-invariant kernel; XLA may change its reduction "
                "order with the shape. Use strict=False to run it anyway (it is then counted in .unhandled)."
            )
        self.unhandled[name] += 1

    def run(self, jaxpr, consts, args):
        env = {}

        def read(v):
            return v.val if isinstance(v, jex_core.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            outs = self.apply(eqn, [read(v) for v in eqn.invars])
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def shard_map(self, params, invals):
        """A ``shard_map`` again over its mesh and specs and with its checks,
        its body evaluated by this evaluator (so rewritten too)."""
        body = params["jaxpr"]
        manual = params.get("newly_manual_axes") or frozenset(params["mesh"].axis_names)

        def per_shard(*xs):
            return tuple(self.run(body, (), xs))

        mapped = jax.shard_map(per_shard, mesh=params["mesh"], in_specs=params["in_specs"],
                               out_specs=params["out_specs"], axis_names=set(manual),
                               check_vma=params.get("check_vma", True))
        return list(mapped(*invals))

    def apply(self, eqn, invals):
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            lhs, rhs = invals
            if _is_float(lhs) and _is_float(rhs) and lhs.dtype == rhs.dtype:
                pet = params.get("preferred_element_type")
                if pet is not None and np.dtype(pet) not in (np.dtype(lhs.dtype), np.dtype(jnp.float32)):
                    self.risky(name, f"preferred_element_type {pet}")
                else:
                    self.handled[name] += 1
                    return _bi_dot_general(lhs, rhs, params["dimension_numbers"], precision=params.get("precision"),
                                           preferred_element_type=pet)
            elif np.dtype(lhs.dtype).kind == "f" or np.dtype(rhs.dtype).kind == "f":
                self.risky(name, f"dtypes {lhs.dtype} x {rhs.dtype}")
        elif name == "reduce_sum":
            (x,) = invals
            if _is_float(x):
                self.handled[name] += 1
                return _bi_sum(x, axis=tuple(params["axes"]))
            if np.dtype(x.dtype).kind == "f":
                self.risky(name, f"dtype {x.dtype}")
        elif name == "scatter-add" and (rows := _row_scatter_add(params, *invals)) is not None:
            self.handled[name] += 1
            return rows
        elif name == "shard_map" and not (self.cpu and params.get("check_vma", True)):
            return self.shard_map(params, invals)
        elif name == "shard_map" and _may_reduce(eqn):
            # In the Pallas interpreter a kernel inside a checked shard_map
            # fails JAX's varying-axes check: the body runs as it is.
            if self.strict:
                raise BatchVarianceRisk(
                    "batch_invariant: on the CPU backend the kernels cannot run inside shard_map(check_vma=True) "
                    "(the Pallas interpreter fails JAX's varying-axes check), so its body would run as it is, "
                    "XLA's reductions included. Pass check_vma=False to shard_map, run on a GPU, or use "
                    "strict=False to run the body as it is (it is then counted in .unhandled)."
                )
            self.unhandled[name] += 1
        elif _is_bi_kernel(eqn):
            self.handled[params["name"]] += 1  # a bi_jax op called inside the function
        elif name in _CALLS or name in _CUSTOM:
            sub = params.get("jaxpr") or params.get("call_jaxpr") or params.get("fun_jaxpr")
            if isinstance(sub, jex_core.ClosedJaxpr):
                return self.run(sub.jaxpr, sub.consts, invals)
            return self.run(sub, (), invals)
        elif _may_reduce(eqn):
            body = " inside its body" if any(True for _ in _sub_jaxprs(params)) else ""
            self.risky(name, f"it may combine several floating-point elements into one{body}")
        elif name == "custom_vmap_call":
            # Bound whole, so that its batching rule still holds under vmap
            # (bi_jax's kernels carry one); its body reduces nothing here.
            for kernel in _bi_kernels(params):
                self.handled[kernel] += 1
        elif self.cpu and name in _TRANSCENDENTAL and not eqn.primitive.multiple_results:
            return _one_element_at_a_time(eqn.primitive, invals, params)
        # As jax.core.eval_jaxpr binds an equation (shard_map's bind
        # parameters differ from its equation's).
        return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))


# jax.nn.dot_product_attention, while a transform traces in this thread, is
# bi_jax.dot_product_attention (the fused kernel, whatever the implementation
# asked for): its xla implementation would otherwise run as products and sums
# over the whole score matrix, and its cudnn one as a foreign call.
_TRACING = threading.local()
_ORIGINAL_ATTENTION: list = []


_INSTALL = threading.Lock()


def _install_attention_route() -> None:
    with _INSTALL:
        if not _ORIGINAL_ATTENTION:
            _route_attention()


def _route_attention() -> None:
    original = jax.nn.dot_product_attention
    _ORIGINAL_ATTENTION.append(original)

    @functools.wraps(original)
    def dot_product_attention(query, key, value, bias=None, mask=None, *, implementation=None, **kwargs):
        if not getattr(_TRACING, "depth", 0):
            return original(query, key, value, bias, mask, implementation=implementation, **kwargs)
        if implementation not in (None, "xla", "cudnn"):
            raise ValueError(f"jax.nn.dot_product_attention: implementation={implementation!r}: expected None, "
                             "'xla' or 'cudnn'")
        from bi_jax.ops.attention import dot_product_attention as bi_attention

        return bi_attention(query, key, value, bias, mask, **kwargs)

    dot_product_attention._bi_route = True
    jax.nn.dot_product_attention = dot_product_attention


def _trace(fn, args):
    _install_attention_route()
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        return jax.make_jaxpr(fn, return_shape=True)(*args)
    finally:
        _TRACING.depth -= 1


def batch_invariant(fn=None, *, strict: bool = False):
    """Transform ``fn`` so that its products and sums run the bi_ kernels.

    Usable as ``batch_invariant(fn)``, ``batch_invariant(fn, strict=True)`` or
    as a decorator (``@batch_invariant`` / ``@batch_invariant(strict=True)``).
    Keyword arguments of the wrapped function are static (not traced). The
    returned function counts, per primitive, the equations the bi_ kernels
    ran (``handled``) and those that ran XLA's kernel although they reduce
    floats (``unhandled``, lenient mode); both count every trace.
    """
    if fn is None:
        return functools.partial(batch_invariant, strict=strict)

    handled: Counter = Counter()
    unhandled: Counter = Counter()

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        closed, out_shape = _trace(functools.partial(fn, **kwargs), args)
        outs = _Evaluator(strict, handled, unhandled).run(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    wrapped.handled = handled
    wrapped.unhandled = unhandled
    return wrapped

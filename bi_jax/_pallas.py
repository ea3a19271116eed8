"""``pallas_call`` (and ``varying`` for the Mosaic GPU matmul's ``plgpu.kernel``)
for the bi_jax kernels, usable inside a checked ``shard_map``.

Inside ``jax.shard_map(..., check_vma=True)`` (its default) every value's
type says over which mesh axes it varies, and a Pallas call must declare it
for its outputs. A bi_ kernel computes each output from its inputs alone, so
its outputs vary over the axes any input varies over: the inputs that vary
over fewer are cast to vary over all of them (``jax.lax.pcast``, a change of
type, not of values) and the outputs declared so. Outside ``shard_map``
nothing varies and this is ``pl.pallas_call``.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.sharding import ManualAxisType


def _varying(a) -> frozenset:
    mat = getattr(jax.typeof(a), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def varying(args, out_shape):
    """``(args, out_shape)`` for a kernel inside ``shard_map``: the args
    cast to vary over every mesh axis any of them varies over, and the output
    shapes declared to vary so."""
    axes = frozenset().union(*(_varying(a) for a in args))
    if axes:
        args = [jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying") if axes - _varying(a) else a
                for a in args]
    mat = ManualAxisType(varying=axes)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape,
                          is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))
    return args, shapes


def first_order(call, name: str):
    """``call`` (a kernel launch), refusing to be differentiated with an
    error that names it. The bi_jax ops differentiate through their own
    ``custom_vjp`` rules; JAX reaches a kernel's own derivative only for a
    second derivative (a backward differentiated again), where Pallas would
    fail with a bare ``AssertionError``."""
    guarded = jax.custom_jvp(call)

    @guarded.defjvp
    def _jvp(primals, tangents):
        raise NotImplementedError(
            f"bi_jax kernel {name!r}: second derivatives are not supported (the bi_jax ops have first-order "
            "gradients only: jax.grad of jax.grad, or a jvp of a vjp, reached a kernel's own derivative)")

    return guarded


def pallas_call(kernel, *, out_shape, name: str | None = None, **kwargs):
    """``pl.pallas_call(kernel, out_shape=out_shape, **kwargs)`` whose
    outputs vary over the union of its inputs' varying mesh axes, and which
    refuses to be differentiated (:func:`first_order`)."""

    def call(*args):
        args, shapes = varying(args, out_shape)
        return pl.pallas_call(kernel, out_shape=shapes, name=name, **kwargs)(*args)

    return first_order(call, name or getattr(kernel, "__name__", "pallas kernel"))

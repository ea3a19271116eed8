"""Backward passes of the bi_ ops (``jax.custom_vjp`` rules).

Each rule wraps the kernel's launch on 2-D rows (or 3-D operands for the
products), so the forward of ``jax.vjp``/``jax.grad`` is the inference
kernel itself: a training forward gives exactly the inference bits. The
backward is built from the bi_ kernels and elementwise ``jnp`` ops, as in
``bi_torch.ops.grad``:

- each reduction over a row (softmax's, RMSNorm's) is a bi_ ``sum``/``mean``
  launch or a bi_ product, so input gradients are batch-invariant per row;
- each sum over the tokens (a weight's, a bias's, RMSNorm's weight
  gradient) is a bi_ product or ``sum`` with a fixed order for a given
  number of tokens: a given batch always gives the same bits. Those sums
  change with the tokens in the batch, as the math says.

Elementwise steps run in fp32 and round once to the input's dtype. The
rules are first-order (a gradient of a gradient goes through the backward's
own kernels, which have these rules too, but is not tested). Attention (full
or causal; dense, with key lengths, or packed) has a fused backward
(``bi_jax.ops.attention_grad``, through ``with_attention_backward``); with
masks, biases, windows or pages ``jax.grad`` raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _product_backward(run):
    def backward(kmajor, residuals, g):
        a3, b3, bias = residuals
        g = g.astype(a3.dtype)  # an fp32 output's cotangent, rounded to the operands' dtype
        if kmajor:  # out = a3 @ b3^T, b3 (batch, N, K)
            grad_a = run(g, b3, False)
            grad_b = run(jnp.swapaxes(g, 1, 2), a3, False)
        else:  # out = a3 @ b3, b3 (batch, K, N)
            grad_a = run(g, b3, True)
            grad_b = run(jnp.swapaxes(a3, 1, 2), g, False)
        grad_bias = None
        if bias is not None:
            from bi_jax.ops.rows import _rows

            grad_bias = _rows("sum", g.reshape(-1, g.shape[-1]).T).astype(bias.dtype)
        return grad_a, grad_b.astype(b3.dtype), grad_bias

    return backward


def with_product_backward(fn, kmajor: bool, run):
    """``fn(a3, b3, bias)`` (the kernel's 3-D product for one static
    configuration; ``kmajor``: ``b3`` is ``(batch, N, K)``) with a backward
    from ``run(a3, b3, kmajor)``, the bi_ product in ``a3``'s dtype."""
    wrapped = jax.custom_vjp(fn)
    backward = _product_backward(run)
    wrapped.defvjp(lambda a3, b3, bias: (fn(a3, b3, bias), (a3, b3, bias)),
                   lambda residuals, g: backward(kmajor, residuals, g))
    return wrapped


def with_rms_norm_backward(fn, eps: float):
    """``fn(x2d, weight)`` (the RMSNorm kernel) with its backward."""
    from bi_jax.ops.rows import _rows

    def backward(residuals, g):
        x2d, weight = residuals
        x32, g32 = x2d.astype(jnp.float32), g.astype(jnp.float32)
        gw = g32 if weight is None else g32 * weight.astype(jnp.float32)
        rstd = jax.lax.rsqrt(_rows("mean", x32 * x32)[:, None] + jnp.float32(eps))
        # r * (g w - x r^2 mean(g w x)), the mean over the row.
        dot = _rows("mean", gw * x32)[:, None]
        grad_x = (rstd * (gw - x32 * (rstd * rstd) * dot)).astype(x2d.dtype)
        grad_w = None
        if weight is not None:
            grad_w = _rows("sum", (g32 * (x32 * rstd)).T).astype(weight.dtype)
        return grad_x, grad_w

    wrapped = jax.custom_vjp(fn)
    wrapped.defvjp(lambda x2d, weight: (fn(x2d, weight), (x2d, weight)), backward)
    return wrapped


def with_rows_backward(mode: str, fn, shape, dtype):
    """``fn(x2d)`` (a row kernel: sum, mean, softmax, log_softmax, on rows
    of ``shape`` and ``dtype``) with its backward."""
    from bi_jax.ops.rows import _rows

    def forward(x2d):
        out = fn(x2d)
        return out, out if mode in ("softmax", "log_softmax") else None

    def backward(y, g):
        g32 = g.astype(jnp.float32)
        if mode == "sum":
            grad = jnp.broadcast_to(g32[:, None], shape)
        elif mode == "mean":
            # One IEEE division per row, by a divisor XLA cannot see: it turns
            # a division by a scalar (constant or broadcast) into a product with
            # the rounded reciprocal for some shapes and not others (on the CPU
            # a batch of 1 divided, of 2 multiplied: a row's bits followed the
            # batch).
            count = jax.lax.optimization_barrier(jnp.full(g32.shape, shape[1], jnp.float32))
            grad = jnp.broadcast_to((g32 / count)[:, None], shape)
        elif mode == "softmax":
            y32 = y.astype(jnp.float32)
            grad = y32 * (g32 - _rows("sum", g32 * y32)[:, None])
        else:  # log_softmax
            grad = g32 - jnp.exp(y.astype(jnp.float32)) * _rows("sum", g32)[:, None]
        return (grad.astype(dtype),)

    wrapped = jax.custom_vjp(fn)
    wrapped.defvjp(forward, backward)
    return wrapped


def with_attention_backward(fn, statics: dict, fn_with_lse):
    """``fn(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias)`` (the
    attention launch for one static configuration) with a backward for
    attention, full or causal, dense (with or without key lengths) or packed
    (``cu_q``, ``cu_k``), without masks, biases, pages or windows: the fused
    kernels of ``bi_jax.ops.attention_grad``. ``fn_with_lse``: the same
    launch returning ``(out, lse)`` as
    ``bi_jax.ops.attention.launch(with_lse=True)``; its statistics are the
    backward's."""
    import math

    from bi_core import attention as contract

    left, right = statics["window"]
    # The kernel takes scale * log2(e) (rounded to fp32); the backward the scale.
    scale = statics["qk_scale"] / math.log2(math.e)
    lq = statics["max_q_len"]

    def forward(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias):
        given = [name for name, a in (("block_table", block_table), ("mask", mask), ("bias", bias)) if a is not None]
        if (cu_q is None) != (cu_k is None):
            given.append("cu_seqlens_q" if cu_k is None else "cu_seqlens_k")
        if given or left != contract.UNBOUNDED or right not in (0, contract.UNBOUNDED):
            raise NotImplementedError(
                "bi_jax.attention has no derivative rule for this call (" + (", ".join(given) or "a window") +
                "): only attention without window, full or causal, trains (attention(q, k, v, causal=..., "
                "kv_lengths=...), varlen_attention, dot_product_attention without mask, bias or window); the "
                "rest is forward-only")
        out, rows = fn_with_lse(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias)
        # Tile rows (query, head of the group) of each (sequence, KV head) -> (sequence, query head, query).
        hq, hkv = q.shape[-2], k.shape[-2]
        b = rows.shape[0] // hkv
        lse = rows[:, :lq * (hq // hkv)].reshape(b, hkv, lq, hq // hkv).transpose(0, 1, 3, 2).reshape(-1)
        return out, (q, k, v, out, lse, cu_q, cu_k, kv_lens)

    def backward(residuals, g):
        from bi_jax.ops.attention_grad import attention_backward

        q, k, v, out, lse, cu_q, cu_k, kv_lens = residuals
        grads = attention_backward(q, k, v, out, g, causal=right == 0, scale=scale,
                                   bottom_right=statics["bottom_right"], lse=lse, kv_lengths=kv_lens,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=lq,
                                   max_seqlen_k=statics["max_kv_len"])
        return (*grads, None, None, None, None, None, None)

    wrapped = jax.custom_vjp(fn)
    wrapped.defvjp(forward, backward)
    return wrapped

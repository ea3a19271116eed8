"""Backward passes of the bi_ ops (``torch.autograd.Function``s).

A bi_ op called on tensors that require grad, with grad mode on, runs as one
of these functions. The forward is the op's inference path itself (under
``no_grad``), so a training forward gives exactly the inference bits. The
backward is built from bi_ kernels and elementwise torch ops only:

- every reduction over a row (RMSNorm's ``sum(g w x)``, softmax's
  ``sum(g y)``) runs in a fused row kernel (``bi_torch.ops.rows_grad``) or a
  bi_ ``sum``/product, whose order depends on the row length alone, so
  **input gradients are batch-invariant per row**: a row's gradient depends
  only on that row's input and output gradient;
- every sum over the tokens of a batch (a weight's, a bias's or RMSNorm's
  weight gradient; a product's broadcast batch dimensions) is a bi_ product,
  a bi_ ``sum`` or ``rows_grad``'s ordered partial sums, with a fixed order
  for a given number of tokens, so **a given batch always gives the same
  bits** (run-to-run determinism, no atomics). These sums change with the
  tokens in the batch, as the math says they must: adding, removing or
  reordering rows changes a weight gradient's bits.

Elementwise steps run in fp32 and round once to the input's dtype; torch's
elementwise kernels compute each element alone, so they keep both
properties. Gradients of gradients are not supported
(``once_differentiable``).

Attention (``attention``: full or causal, GQA, any scale) has a fused
backward (``bi_torch.ops.attention_grad``: log-sum-exp statistics, then dK/dV
per key block and dQ per query block, each summed in a fixed order, no
atomics, no (L, L) array). It keeps the properties above: a sequence's
gradients depend only on that sequence. Key lengths (``kv_lengths``) and
packed sequences (``varlen_attention``) train through the same kernels;
windows, masks and paged attention still refuse inputs that require grad.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


def needed(*tensors) -> bool:
    """Grad mode is on and one of ``tensors`` requires grad (others: the
    full path checks them)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed (bi_ ``sum``, fp32 accumulation, one rounding) over the
    dimensions that broadcasting added or expanded to reach ``t.shape`` from
    ``shape``."""
    from bi_torch.ops.rows import sum as bi_sum

    lead = t.ndim - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    if not dims:
        return t
    return bi_sum(t, dims, keepdim=True).reshape(shape)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias, out_dtype):
        from bi_torch.ops.matmul import matmul

        out = matmul(a, b, bias, out_dtype)
        ctx.save_for_backward(a, b)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from bi_torch.ops.matmul import matmul
        from bi_torch.ops.rows import sum as bi_sum

        a, b = ctx.saved_tensors
        need_a, need_b, need_bias, _ = ctx.needs_input_grad
        g = g.to(a.dtype)  # an fp32 out_dtype's gradient, rounded to the operands' dtype
        a2 = a.unsqueeze(0) if a.ndim == 1 else a
        b2 = b.unsqueeze(-1) if b.ndim == 1 else b
        g2 = g.unsqueeze(-1) if b.ndim == 1 else g  # the dimensions that matmul removed, restored
        if a.ndim == 1:
            g2 = g2.unsqueeze(-2)
        grad_a = grad_b = grad_bias = None
        if b2.ndim == 2:
            # Leading dims of a folded into M: one weight for every row.
            k, n = b2.shape
            if need_a:
                grad_a = matmul(g2, b2.t()).reshape(a.shape)
            if need_b:
                # Over the tokens, in the product's fixed order over its K (= the tokens).
                grad_b = matmul(a2.reshape(-1, k).t(), g2.reshape(-1, n)).reshape(b.shape)
        else:
            if need_a:
                grad_a = _sum_to(matmul(g2, b2.transpose(-1, -2)), a2.shape).reshape(a.shape)
            if need_b:
                grad_b = _sum_to(matmul(a2.transpose(-1, -2), g2), b2.shape).reshape(b.shape)
        if need_bias:
            grad_bias = bi_sum(g2.reshape(-1, g2.shape[-1]), 0).to(ctx.bias_dtype)
        return grad_a, grad_b, grad_bias, None


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from bi_torch.ops.rms_norm import rms_norm_with_rstd

        y, rstd = rms_norm_with_rstd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _):
        from bi_torch.ops.rows_grad import rms_norm_backward

        x, weight, rstd = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        grad_x, grad_w = rms_norm_backward(x, weight, rstd, g, need_x, need_w)
        return grad_x if need_x else None, grad_w, None


class _Normalise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, dim, dtype):
        from bi_torch.ops import rows

        y = rows._normalise(op, x, dim, dtype)
        ctx.save_for_backward(y)
        ctx.op, ctx.dim, ctx.x_dtype = op, dim, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from bi_torch.ops.rows_grad import normalise_backward

        (y,) = ctx.saved_tensors
        if y.ndim == 0:
            return torch.zeros_like(g, dtype=ctx.x_dtype), None, None, None
        return normalise_backward(ctx.op, y, g, ctx.dim, ctx.x_dtype), None, None, None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, dim, keepdim, dtype):
        from bi_torch.ops import rows

        out = rows._reduce(op, x, dim, keepdim, dtype)
        dims = rows._dims(op, x, dim)
        ctx.shape, ctx.x_dtype, ctx.dims, ctx.keepdim, ctx.op = x.shape, x.dtype, dims, keepdim, op
        ctx.count = math.prod(x.shape[d] for d in dims)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        g32 = g.float()
        if not ctx.keepdim:
            for d in ctx.dims:
                g32 = g32.unsqueeze(d)
        if ctx.op == "mean":
            # A device tensor divisor: an IEEE division per element (a Python
            # number would be turned into a multiplication by its rounded
            # reciprocal on CUDA: two roundings).
            g32 = g32 / torch.full((), ctx.count, dtype=torch.float32, device=g32.device)
        return g32.expand(ctx.shape).to(ctx.x_dtype), None, None, None, None


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, split_kv, kv_lengths):
        from bi_torch.ops.attention import _dense

        # The inference forward's kernel (the same output bits), which also
        # keeps each query's softmax statistics for the backward.
        out, lse = _dense("attention", q, k, v, causal=causal, scale=scale, window=None, bottom_right=True,
                          split_kv=split_kv, kv_lengths=kv_lengths, with_lse=True)
        kv_lens = None if kv_lengths is None else kv_lengths.to(torch.int32).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, kv_lens)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from bi_torch.ops.attention_grad import attention_backward

        q, k, v, out, lse, kv_lens = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_backward(q, k, v, out, g, ctx.causal, ctx.scale, lse=lse,
                                                    kv_lengths=kv_lens)
        return grad_q, grad_k, grad_v, None, None, None, None


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, split_kv):
        from bi_torch.ops.attention import _varlen

        out, lse, (cu_q, cu_k, max_q, max_k) = _varlen("varlen_attention", q, k, v, cu_q, cu_k, max_q, max_k,
                                                       causal=causal, scale=scale, window=None,
                                                       split_kv=split_kv, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale, ctx.max_q, ctx.max_k = causal, scale, max_q, max_k
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        from bi_torch.ops.attention_grad import attention_backward

        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_backward(q, k, v, out, g, ctx.causal, ctx.scale, lse=lse,
                                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=ctx.max_q,
                                                    max_seqlen_k=ctx.max_k)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


def attention(q, k, v, causal, scale, split_kv, kv_lengths=None):
    return _Attention.apply(q, k, v, causal, scale, split_kv, kv_lengths)


def varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, split_kv):
    return _VarlenAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, split_kv)


def matmul(a, b, bias, out_dtype):
    return _Matmul.apply(a, b, bias, out_dtype)


def rms_norm(x, weight, eps, with_rstd):
    y, rstd = _RmsNorm.apply(x, weight, eps)
    return (y, rstd) if with_rstd else y


def normalise(op, x, dim, dtype):
    return _Normalise.apply(x, op, dim, dtype)


def reduce(op, x, dim, keepdim, dtype):
    return _Reduce.apply(x, op, dim, keepdim, dtype)

"""The public bi_ ops inside ``torch.compile``.

Dynamo cannot trace an op's eager path (its launches go through Triton's C
launcher, its plans are keyed on addresses), and a backend that traced into
it could swap the kernels for its own. So while Dynamo traces a function,
each public op of ``bi_torch`` (``bi_torch.matmul``, ``bi_torch.rms_norm``,
...) becomes one node of the graph: the custom op
``torch.ops.bi_torch_direct.<name>``, whose kernel is the eager op itself
(the same kernels, configs and bits) and whose fake gives the output's shape
and dtype. Any backend (Inductor, :func:`bi_torch.compile_backend`,
``mode="reduce-overhead"``'s CUDA graphs) runs the bi_ kernels there, never
kernels of its own::

    @torch.compile
    def mlp(x, w_gate_up, w_down):
        return bi_torch.linear(bi_torch.silu_and_mul(bi_torch.linear(x, w_gate_up)), w_down)

Outputs are contiguous (each custom op's fake says so; where the eager op
would return another layout, the node copies it once), except
``scaled_dot_product_attention``'s ``(B, H, L, E)`` result, whose memory is
``(B, L, H, E)`` as the kernel writes it (and as the flash backend returns it).

Gradients: the custom ops have no autograd formula of their own. A call
whose tensors require grad while grad mode is on runs the eager op outside
the graph (Dynamo breaks the graph there, and with ``fullgraph=True`` says
so), so training still gets the bi_ backward kernels and eager's bits. To
compile a training step into one graph, write it with torch's ops and
compile with :func:`bi_torch.compile_backend`.

``paged_attention`` with ``k_new``/``v_new`` writes the cache in place: in a
graph that is a node giving each new token's page and slot (after the eager
op's checks), two ``index_put_`` writes, and the attention node over the
pages, as the eager op runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
_NS = "bi_torch_direct"


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


@torch.compiler.disable(reason="bi_torch: inputs that require grad (grad mode on) run the eager op, with its "
                                "backward, outside the graph; the graph's bi_ nodes are inference-only")
def _eager(fn, *args, **kwargs):
    """The eager op, outside the graph (a graph break while Dynamo traces)."""
    return fn(*args, **kwargs)


@torch.compiler.disable(reason="bi_torch: arguments the op refuses (its eager error follows without fullgraph)")
def _refused(fn, *args, **kwargs):
    """The eager op, outside the graph, for arguments it refuses: it raises
    its own error."""
    return fn(*args, **kwargs)


def _fresh(out: Tensor, inputs, keep_layout: bool = False) -> Tensor:
    """The output contiguous (``keep_layout``: as it is), and never an
    input's storage (a custom op may not return an input or a view of one)."""
    if not keep_layout:
        out = out.contiguous()
    if out.numel() and any(isinstance(t, Tensor) and t.numel() and t.untyped_storage().data_ptr() ==
                           out.untyped_storage().data_ptr() for t in inputs):
        out = out.clone(memory_format=torch.preserve_format)
    return out


def _window(window) -> list[int] | None:
    """A window as the schema takes it: None or ``[left, right]``."""
    if window is None:
        return None
    if isinstance(window, int):
        return [window, window]
    return list(window)


def _dims(dim) -> list[int] | None:
    if dim is None:
        return None
    return [dim] if isinstance(dim, int) else list(dim)


# ---- the custom ops: each one's kernel is the eager op ----

@torch.library.custom_op(f"{_NS}::silu_and_mul", mutates_args=())
def _silu_and_mul(x: Tensor) -> Tensor:
    from bi_torch.ops.activation import silu_and_mul

    return _fresh(silu_and_mul(x), (x,))


@_silu_and_mul.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op(f"{_NS}::matmul", mutates_args=())
def _matmul(a: Tensor, b: Tensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    from bi_torch.ops.matmul import matmul

    return _fresh(matmul(a, b, bias, out_dtype), (a, b, bias))


@_matmul.register_fake
def _(a, b, bias=None, out_dtype=None):
    return a.new_empty(torch.matmul(a, b).shape, dtype=out_dtype or a.dtype)


@torch.library.custom_op(f"{_NS}::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    from bi_torch.ops.matmul import linear

    return _fresh(linear(x, weight, bias), (x, weight, bias))


@_linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op(f"{_NS}::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    from bi_torch.ops.rms_norm import rms_norm

    return _fresh(rms_norm(x, weight, eps), (x, weight))


@_rms_norm.register_fake
def _(x, weight=None, eps=1e-6):
    return x.new_empty(x.shape)


def _rows_op(name: str):
    @torch.library.custom_op(f"{_NS}::{name}", mutates_args=())
    def op(x: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
        from bi_torch.ops import rows

        return _fresh(getattr(rows, name)(x, dim, dtype), (x,))

    @op.register_fake
    def _(x, dim=-1, dtype=None):
        return x.new_empty(x.shape, dtype=dtype or x.dtype)
    return op


def _reduce_op(name: str):
    @torch.library.custom_op(f"{_NS}::{name}", mutates_args=())
    def op(x: Tensor, dim: Sequence[int] | None = None, keepdim: bool = False,
           dtype: torch.dtype | None = None) -> Tensor:
        from bi_torch.ops import rows

        return _fresh(getattr(rows, name)(x, dim, keepdim, dtype=dtype), (x,))

    @op.register_fake
    def _(x, dim=None, keepdim=False, dtype=None):
        shape = getattr(torch, name)(x, dim, keepdim, dtype=dtype).shape  # fake tensors: the shape only
        return x.new_empty(shape, dtype=dtype or x.dtype)
    return op


_softmax, _log_softmax = _rows_op("softmax"), _rows_op("log_softmax")
_sum, _mean = _reduce_op("sum"), _reduce_op("mean")


@torch.library.custom_op(f"{_NS}::embedding", mutates_args=())
def _embedding(ids: Tensor, weight: Tensor) -> Tensor:
    from bi_torch.ops.embedding import embedding

    return _fresh(embedding(ids, weight), (ids, weight))


@_embedding.register_fake
def _(ids, weight):
    return weight.new_empty((*ids.shape, weight.shape[-1]))


def _attention_out(q, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op(f"{_NS}::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
               window: Sequence[int] | None = None, kv_lengths: Tensor | None = None,
               split_kv: bool | None = None) -> Tensor:
    from bi_torch.ops.attention import attention

    out = attention(q, k, v, causal=causal, scale=scale, window=window if window is None else tuple(window),
                    kv_lengths=kv_lengths, split_kv=split_kv)
    return _fresh(out, (q, k, v))


@_attention.register_fake
def _(q, k, v, causal=False, scale=None, window=None, kv_lengths=None, split_kv=None):
    return _attention_out(q, v)


@torch.library.custom_op(f"{_NS}::scaled_dot_product_attention", mutates_args=())
def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    from bi_torch.ops.attention import scaled_dot_product_attention

    out = scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out.ndim != 4:
        return _fresh(out, (query, key, value, attn_mask))
    # (B, H, L, E) whose memory is (B, L, H, E), as the kernel writes it
    # (and the flash backend returns it): no copy.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return _fresh(out, (query, key, value, attn_mask), keep_layout=True)


@_sdpa.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if query.ndim != 4:
        return _attention_out(query, value)
    b, h, length, _ = query.shape
    return query.new_empty((b, length, h, value.shape[-1])).transpose(1, 2)


@torch.library.custom_op(f"{_NS}::varlen_attention", mutates_args=())
def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
            max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, causal: bool = False,
            scale: float | None = None, window: Sequence[int] | None = None,
            split_kv: bool | None = None) -> Tensor:
    from bi_torch.ops.attention import varlen_attention

    out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                           scale=scale, window=window if window is None else tuple(window), split_kv=split_kv)
    return _fresh(out, (q, k, v))


@_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False, scale=None,
      window=None, split_kv=None):
    return _attention_out(q, v)


def _paged(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new, causal,
           scale, window, split_kv, validate):
    from bi_torch.ops.attention import paged_attention

    out = paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q=cu_seqlens_q,
                          max_seqlen_q=max_seqlen_q, k_new=k_new, v_new=v_new, causal=causal, scale=scale,
                          window=window if window is None else tuple(window), split_kv=split_kv,
                          validate=validate)
    return _fresh(out, (q, k_cache, v_cache))


@torch.library.custom_op(f"{_NS}::paged_attention", mutates_args=())
def _paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                     cu_seqlens_q: Tensor | None = None, max_seqlen_q: int | None = None, causal: bool = True,
                     scale: float | None = None, window: Sequence[int] | None = None,
                     split_kv: bool | None = None, validate: bool = True) -> Tensor:
    return _paged(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, None, None, causal,
                  scale, window, split_kv, validate)


@torch.library.custom_op(f"{_NS}::paged_append_slots", mutates_args=())
def _paged_append_slots(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                        k_new: Tensor, v_new: Tensor, cu_seqlens_q: Tensor | None = None,
                        max_seqlen_q: int | None = None, validate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    from bi_torch.ops.attention import paged_append_slots

    return paged_append_slots(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new,
                              cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, validate=validate)


@_paged_attention.register_fake
def _(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q=None, max_seqlen_q=None, causal=True,
      scale=None, window=None, split_kv=None, validate=True):
    return _attention_out(q, v_cache)


@_paged_append_slots.register_fake
def _(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, cu_seqlens_q=None, max_seqlen_q=None,
      validate=True):
    total = q.shape[0] if q.ndim == 3 else q.shape[0] * q.shape[1]
    slots = q.new_empty((total,), dtype=torch.int64)
    return slots, torch.empty_like(slots), cache_seqlens.new_empty(cache_seqlens.shape, dtype=torch.int32)


# ---- what the public ops call while Dynamo traces ----

def silu_and_mul(fn, x):
    return _eager(fn, x) if _grad_needed(x) else _silu_and_mul(x)


def matmul(fn, a, b, bias, out_dtype):
    return _eager(fn, a, b, bias, out_dtype) if _grad_needed(a, b, bias) else _matmul(a, b, bias, out_dtype)


def linear(fn, x, weight, bias):
    return _eager(fn, x, weight, bias) if _grad_needed(x, weight, bias) else _linear(x, weight, bias)


def rms_norm(fn, x, weight, eps):
    return _eager(fn, x, weight, eps) if _grad_needed(x, weight) else _rms_norm(x, weight, eps)


def softmax(fn, x, dim, dtype):
    return _eager(fn, x, dim, dtype) if _grad_needed(x) else _softmax(x, dim, dtype)


def log_softmax(fn, x, dim, dtype):
    return _eager(fn, x, dim, dtype) if _grad_needed(x) else _log_softmax(x, dim, dtype)


def sum(fn, x, dim, keepdim, dtype):  # noqa: A001
    return _eager(fn, x, dim, keepdim, dtype=dtype) if _grad_needed(x) else _sum(x, _dims(dim), keepdim, dtype)


def mean(fn, x, dim, keepdim, dtype):
    return _eager(fn, x, dim, keepdim, dtype=dtype) if _grad_needed(x) else _mean(x, _dims(dim), keepdim, dtype)


def embedding(fn, ids, weight):
    return _eager(fn, ids, weight) if _grad_needed(weight) else _embedding(ids, weight)


def attention(fn, q, k, v, causal, scale, window, kv_lengths, split_kv):
    if _grad_needed(q, k, v):
        return _eager(fn, q, k, v, causal=causal, scale=scale, window=window, kv_lengths=kv_lengths,
                      split_kv=split_kv)
    return _attention(q, k, v, causal, scale, _window(window), kv_lengths, split_kv)


def scaled_dot_product_attention(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if _grad_needed(query, key, value, attn_mask):
        return _eager(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def varlen_attention(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                     split_kv):
    if _grad_needed(q, k, v):
        return _eager(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                      scale=scale, window=window, split_kv=split_kv)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, _window(window),
                   split_kv)


def paged_attention(fn, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new,
                    causal, scale, window, split_kv, validate):
    if _grad_needed(q, k_cache, v_cache, k_new, v_new):
        return _eager(fn, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q=cu_seqlens_q,
                      max_seqlen_q=max_seqlen_q, k_new=k_new, v_new=v_new, causal=causal, scale=scale, window=window,
                      split_kv=split_kv, validate=validate)
    if k_new is None and v_new is None:
        return _paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, causal,
                                scale, _window(window), split_kv, validate)
    if k_new is None or v_new is None:
        return _refused(fn, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q=cu_seqlens_q,
                        max_seqlen_q=max_seqlen_q, k_new=k_new, v_new=v_new, causal=causal, scale=scale,
                        window=window, split_kv=split_kv, validate=validate)
    # Appending: the checks and each new token's page and slot (a node), the
    # writes as aten index_put_ (the eager op writes them so too), then the
    # attention over the pages with the new lengths: eager's launches. Not a
    # custom op that writes the caches: Inductor (torch 2.11) corrupted a
    # cache through such an op when the two caches were views of one buffer.
    pages, slots, kv_lens = _paged_append_slots(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new,
                                                cu_seqlens_q, max_seqlen_q, validate)
    k_cache[pages, slots] = k_new.reshape(-1, *k_new.shape[-2:])
    v_cache[pages, slots] = v_new.reshape(-1, *v_new.shape[-2:])
    return _paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_seqlens_q, max_seqlen_q, causal, scale,
                            _window(window), split_kv, validate)

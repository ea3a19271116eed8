"""A fused backward for dense attention (full or causal, GQA) in Pallas, the
twin of ``bi_torch.ops.attention_grad``: three kernels, no atomics, no (L, L)
array.

1. statistics, a program per (query block, sequence x query head):
   ``delta = rowsum(dO * O)`` and, unless the forward kept them (autograd's
   path does: ``bi_jax.ops.attention.launch(with_lse=True)``), each query's
   log2-sum-exp2 of its scaled scores ``s * scale * log2(e)`` over its visible
   keys;
2. dK and dV, a program per (key block, sequence x KV head): the group's query
   heads in order, the query blocks in increasing order;
3. dQ, a program per (query block, sequence x query head): the key blocks in
   increasing order.

A program reads one sequence and walks it in an order fixed by the lengths
and ``bi_core.attention.backward_blocks``: a sequence's gradients do not
depend on the batch. From ``bi_core.attention.MASK_FREE_FROM`` tokens the
tiles that see every key skip the mask, in loops of their own (a speed
choice: the same values in the same order, the same bits). Products take
the inputs' dtype with fp32 accumulation (fp32 inputs: full fp32); in the
interpreter they are written out one term at a time
(``bi_jax.ops.matmul._tile_dot``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_core import attention as contract
from bi_jax._checks import interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops.attention import _scalar
from bi_jax.ops.matmul import _tile_dot

_NEG_INF = float("-inf")


def _rows(index, d):
    return index[:, None], jnp.arange(d, dtype=jnp.int32)[None, :]


def _load(ref, rows, ok, d):
    return pltriton.load(ref.at[_rows(rows, d)], mask=jnp.broadcast_to(ok[:, None], (rows.shape[0], d)), other=0.0)


def _visible(qpos, kpos, st):
    ok = (kpos < st["lk"])[None, :] & (qpos < st["lq"])[:, None]
    if st["causal"]:
        ok = ok & (kpos[None, :] <= qpos[:, None] + st["offset"])
    return ok


def _dot(a, b, st):
    return _tile_dot(a, b, st["precision"], interpreted=st["interpret"])


def _key_end(tile, st):
    """One past the last key a block of queries sees."""
    if st["causal"]:
        return jnp.clip(tile * st["bm"] + st["bm"] + st["offset"], 0, st["lk"])
    return st["lk"]


def _p_ds(q, k, v, g, lse, delta, qpos, kpos, st, mask=True):
    """The probabilities of a (queries, keys) tile and ``dS`` (with the scale);
    without ``mask`` every (query, key) pair of the tile is visible."""
    s = _dot(q, k.T, st) * st["c"]
    p = jnp.exp2(s - lse[:, None])
    if mask:
        p = jnp.where(_visible(qpos, kpos, st), p, 0.0)
    return p, p * (_dot(g, v.T, st) - delta[:, None]) * st["scale"]


def _sequence(b, cu_q_ref, cu_k_ref, kv_len_ref, st):
    """``st`` with the program's sequence ``b``: its first query and key rows
    (``q0``, ``k0``, in the flattened ``(tokens, heads)`` rows' token index),
    its query and key counts (``lq``, ``lk``) and causal ``offset``. Packed
    sequences read them from the offsets; dense ones start at ``b`` times the
    padded lengths, their keys counted by ``kv_len_ref`` where given."""
    if st["varlen"]:
        q0 = _scalar(cu_q_ref, b)
        lq = _scalar(cu_q_ref, b + 1) - q0
        k0 = _scalar(cu_k_ref, b)
        lk = _scalar(cu_k_ref, b + 1) - k0
    else:
        q0, lq = b * st["ls"], jnp.int32(st["ls"])
        k0, lk = b * st["lk_buffer"], jnp.int32(st["lk_buffer"])
    if st["has_kv_len"]:
        lk = _scalar(kv_len_ref, b)
    offset = lk - lq if st["bottom_right"] else jnp.int32(0)
    return {**st, "q0": q0, "lq": lq, "k0": k0, "lk": lk, "offset": offset}


def _delta(o_ref, g_ref, cu_q_ref, cu_k_ref, kv_len_ref, delta_ref, st):
    """Stores ``delta = rowsum(dO * O)`` of the program's queries; returns
    (sequence, head, positions, in range, rows, the sequence's ``st``)."""
    bm, d, hq = st["bm"], st["d"], st["hq"]
    tile, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // hq, bh % hq
    st = _sequence(b, cu_q_ref, cu_k_ref, kv_len_ref, st)
    qpos = tile * bm + jnp.arange(bm, dtype=jnp.int32)
    q_ok = qpos < st["lq"]
    qrows = (st["q0"] + qpos) * hq + h
    delta = jnp.sum(_load(o_ref, qrows, q_ok, d).astype(jnp.float32) * _load(g_ref, qrows, q_ok, d).astype(jnp.float32),
                    axis=1)
    pltriton.store(delta_ref.at[bh * st["ls"] + qpos], delta, mask=q_ok)
    return b, h, qpos, q_ok, qrows, st


def _delta_kernel(o_ref, g_ref, cu_q_ref, cu_k_ref, kv_len_ref, delta_ref, *, st):
    _delta(o_ref, g_ref, cu_q_ref, cu_k_ref, kv_len_ref, delta_ref, st)


def _stats_kernel(q_ref, k_ref, o_ref, g_ref, cu_q_ref, cu_k_ref, kv_len_ref, lse_ref, delta_ref, *, st):
    bm, bn, d, group = st["bm"], st["bn"], st["d"], st["group"]
    b, h, qpos, q_ok, qrows, st = _delta(o_ref, g_ref, cu_q_ref, cu_k_ref, kv_len_ref, delta_ref, st)
    tile, bh = pl.program_id(0), pl.program_id(1)
    q = _load(q_ref, qrows, q_ok, d)

    def body(n, ml):
        m, l = ml
        kpos = n * bn + jnp.arange(bn, dtype=jnp.int32)
        k = _load(k_ref, (st["k0"] + kpos) * st["hkv"] + h // group, kpos < st["lk"], d)
        s = jnp.where(_visible(qpos, kpos, st), _dot(q, k.T, st) * st["c"], _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        return m_new, l * jnp.exp2(m - safe) + jnp.sum(jnp.exp2(s - safe[:, None]), axis=1)

    m, l = lax.fori_loop(0, (_key_end(tile, st) + bn - 1) // bn, body,
                         (jnp.full((bm,), _NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32)))
    # A query that sees no key: +inf, so that its probabilities are exp2(-inf) = 0.
    lse = jnp.where(l > 0, m + jnp.log2(jnp.where(l > 0, l, 1.0)), float("inf"))
    pltriton.store(lse_ref.at[bh * st["ls"] + qpos], lse, mask=q_ok)


def _dkdv_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, delta_ref, cu_q_ref, cu_k_ref, kv_len_ref, dk_ref, dv_ref, *,
                 st):
    bm, bn, d, hkv, group = st["bm"], st["bn"], st["d"], st["hkv"], st["group"]
    tile, bh = pl.program_id(0), pl.program_id(1)
    b, hk = bh // hkv, bh % hkv
    st = _sequence(b, cu_q_ref, cu_k_ref, kv_len_ref, st)
    kpos = tile * bn + jnp.arange(bn, dtype=jnp.int32)
    k_ok = kpos < st["lk"]
    krows = (st["k0"] + kpos) * hkv + hk
    k, v = _load(k_ref, krows, k_ok, d), _load(v_ref, krows, k_ok, d)
    lo = 0
    if st["causal"]:  # the first query block that sees this tile's first key
        lo = jnp.maximum(tile * bn - st["offset"], 0) // bm
    # Query blocks [lo, mid_lo) and [mid_hi, end) need the mask (the diagonal,
    # the last partial block); those between see every key of this tile and
    # skip it (the same values: the mask keeps every element). A tile past
    # the sequence's keys walks no query (its gradients are zeros).
    end = jnp.where(tile * bn < st["lk"], (st["lq"] + bm - 1) // bm, 0)
    mid_lo = lo
    if st["causal"]:  # the first query block that sees this tile's last key
        mid_lo = jnp.maximum(lo, (jnp.maximum(tile * bn + bn - 1 - st["offset"], 0) + bm - 1) // bm)
    interior = tile * bn + bn <= st["lk"]
    mid_lo = jnp.where(interior, jnp.minimum(mid_lo, end), end)
    mid_hi = jnp.where(interior, jnp.maximum(mid_lo, st["lq"] // bm), end)
    if not st["mask_free"]:  # one loop, every tile masked (bi_core.attention.MASK_FREE_FROM)
        mid_lo = mid_hi = end
    dk = dv = jnp.zeros((bn, d), jnp.float32)
    for j in range(group):  # the group's query heads, in order
        h = hk * group + j

        def body(i, acc, h=h, mask=True):
            dk, dv = acc
            qpos = i * bm + jnp.arange(bm, dtype=jnp.int32)
            q_ok = qpos < st["lq"]
            qrows = (st["q0"] + qpos) * st["hq"] + h
            q, g = _load(q_ref, qrows, q_ok, d), _load(g_ref, qrows, q_ok, d)
            stats = (b * st["hq"] + h) * st["ls"] + qpos
            lse = pltriton.load(lse_ref.at[stats], mask=q_ok, other=float("inf"))
            delta = pltriton.load(delta_ref.at[stats], mask=q_ok, other=0.0)
            p, ds = _p_ds(q, k, v, g, lse, delta, qpos, kpos, st, mask)
            dv = dv + _dot(p.astype(g.dtype).T, g, st)
            dk = dk + _dot(ds.astype(q.dtype).T, q, st)
            return dk, dv

        dk, dv = lax.fori_loop(lo, mid_lo, body, (dk, dv))
        if st["mask_free"]:
            acc = lax.fori_loop(mid_lo, mid_hi, functools.partial(body, mask=False), (dk, dv))
            dk, dv = lax.fori_loop(mid_hi, end, body, acc)
    # Dense keys past a sequence's length are its padding: their gradients
    # (zeros) are written too. Packed ones belong to the next sequence.
    written = k_ok if st["varlen"] else kpos < st["lk_buffer"]
    written = jnp.broadcast_to(written[:, None], (bn, d))
    pltriton.store(dk_ref.at[_rows(krows, d)], dk.astype(dk_ref.dtype), mask=written)
    pltriton.store(dv_ref.at[_rows(krows, d)], dv.astype(dv_ref.dtype), mask=written)


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, lse_ref, delta_ref, cu_q_ref, cu_k_ref, kv_len_ref, dq_ref, *, st):
    bm, bn, d, hq, group = st["bm"], st["bn"], st["d"], st["hq"], st["group"]
    tile, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // hq, bh % hq
    st = _sequence(b, cu_q_ref, cu_k_ref, kv_len_ref, st)
    qpos = tile * bm + jnp.arange(bm, dtype=jnp.int32)
    q_ok = qpos < st["lq"]
    qrows = (st["q0"] + qpos) * hq + h
    q, g = _load(q_ref, qrows, q_ok, d), _load(g_ref, qrows, q_ok, d)
    lse = pltriton.load(lse_ref.at[bh * st["ls"] + qpos], mask=q_ok, other=float("inf"))
    delta = pltriton.load(delta_ref.at[bh * st["ls"] + qpos], mask=q_ok, other=0.0)

    def body(n, dq, mask=True):
        kpos = n * bn + jnp.arange(bn, dtype=jnp.int32)
        krows = (st["k0"] + kpos) * st["hkv"] + h // group
        k, v = _load(k_ref, krows, kpos < st["lk"], d), _load(v_ref, krows, kpos < st["lk"], d)
        _, ds = _p_ds(q, k, v, g, lse, delta, qpos, kpos, st, mask)
        return dq + _dot(ds.astype(k.dtype), k, st)

    # Key blocks [0, mid) are visible to every query of this block (when it
    # lies inside lq): no mask; the rest (the diagonal, the last partial
    # block) take it. The same values, in the same order. A tile past the
    # sequence's queries walks no key.
    mid = st["lk"] // bn
    if st["causal"]:
        mid = jnp.minimum(mid, jnp.maximum(tile * bm + st["offset"] + 1, 0) // bn)
    mid = jnp.where(tile * bm + bm <= st["lq"], mid, 0)
    end = jnp.where(tile * bm < st["lq"], (_key_end(tile, st) + bn - 1) // bn, 0)
    dq = jnp.zeros((bm, d), jnp.float32)
    if st["mask_free"]:
        dq = lax.fori_loop(0, mid, functools.partial(body, mask=False), dq)
    else:  # one loop, every tile masked (bi_core.attention.MASK_FREE_FROM)
        mid = 0
    dq = lax.fori_loop(mid, end, body, dq)
    pltriton.store(dq_ref.at[_rows(qrows, d)], dq.astype(dq_ref.dtype), mask=jnp.broadcast_to(q_ok[:, None], (bm, d)))


# Triton's software pipelining depth for the Pallas kernels (``num_stages``):
# their loops are ``fori_loop``s of loads and products.
PALLAS_STAGES = 1


def attention_backward(q, k, v, out, g, *, causal: bool, scale: float | None = None, bottom_right: bool = True,
                       interpret=None, config: dict | None = None, lse=None, kv_lengths=None, cu_seqlens_q=None,
                       cu_seqlens_k=None, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
    """(dQ, dK, dV) of ``out = attention(q, k, v, causal, scale)`` for the
    output gradient ``g``; ``(B, L, H, D)`` layouts; causal queries aligned to
    the end of the keys (``bottom_right``) or to their start; in the inputs'
    dtype. ``config``: ``bi_core.attention.BackwardLaunch``es by kernel name
    (default: ``backward_launches`` with ``PALLAS_STAGES``), for probes that
    time other tiles. ``lse``: the forward's statistics, fp32 ``(B * Hq * Lq,)``
    in (sequence, query head, query) order; without them a kernel recomputes
    them (one more ``QK^T`` product; other gradient bits, as deterministic and
    batch-invariant).

    ``kv_lengths`` (int32 ``(B,)``, dense): sequence b has its first
    ``kv_lengths[b]`` keys; the padding keys' gradients are zeros.
    ``cu_seqlens_q``, ``cu_seqlens_k`` (int32 ``(B + 1,)``, with the Python
    ints ``max_seqlen_q``, ``max_seqlen_k``): packed ``(total, H, D)`` arrays
    as ``bi_jax.varlen_attention``, ``lse`` then ``(B * Hq * max_seqlen_q,)``.
    The offsets are trusted here (the forward checked them)."""
    interpret = interpret_mode("attention backward") if interpret is None else interpret
    varlen = contract.backward_packed(cu_seqlens_q, cu_seqlens_k, kv_lengths, max_seqlen_q, max_seqlen_k)
    if varlen:
        (_, hq, d), hkv = q.shape, k.shape[1]
        b, lq, lk = cu_seqlens_q.shape[0] - 1, int(max_seqlen_q), max(int(max_seqlen_k), 1)
        tokens_q, tokens_k = q.shape[0], k.shape[0]
    else:
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        tokens_q, tokens_k = b * lq, b * lk
    contract.check_head_dim(d, "attention backward")
    if hq % hkv:
        raise ValueError(f"attention backward: {hq} query heads are not a multiple of {hkv} KV heads")
    g = g.astype(q.dtype)
    if b == 0 or tokens_q == 0 or tokens_k == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    launches = {name: c._replace(num_stages=PALLAS_STAGES) for name, c in contract.backward_launches(d).items()}
    launches.update(config or {})
    ieee = q.dtype == jnp.float32
    st = dict(d=d, hq=hq, hkv=hkv, group=hq // hkv, ls=lq, lk_buffer=lk, bottom_right=bool(bottom_right),
              varlen=varlen, has_kv_len=kv_lengths is not None,
              causal=bool(causal), mask_free=max(lq, lk) >= contract.MASK_FREE_FROM,
              scale=1.0 / math.sqrt(d) if scale is None else float(scale),
              c=contract.qk_scale(scale, d, "attention backward"),
              interpret=bool(interpret), precision=lax.Precision.HIGHEST if ieee else lax.Precision.DEFAULT)
    fq, fk, fv, fo, fg = (a.reshape(-1, d) for a in (q, k, v, out, g))
    dummy = jnp.zeros((1,), jnp.int32)
    index = tuple(dummy if a is None else a.astype(jnp.int32) for a in (cu_seqlens_q, cu_seqlens_k, kv_lengths))

    def call(name, kernel, rows, heads, out_shape):
        c = launches[name]
        grid = (pl.cdiv(rows, c.block_n if name == "dkdv" else c.block_m), b * heads)
        params = pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
        return pallas_call(functools.partial(kernel, st={**st, "bm": c.block_m, "bn": c.block_n}), grid=grid,
                              out_shape=out_shape, compiler_params=params, interpret=interpret,
                              name=f"bi_attention_bwd_{name}")

    stats_shape = jax.ShapeDtypeStruct((b * hq * lq,), jnp.float32)
    if lse is None:
        lse, delta = call("stats", _stats_kernel, lq, hq, (stats_shape, stats_shape))(fq, fk, fo, fg, *index)
    else:
        if lse.shape != (b * hq * lq,) or lse.dtype != jnp.float32:
            raise ValueError(f"attention backward: lse must be float32 ({b * hq * lq},), got {lse.dtype} {lse.shape}")
        delta = call("stats", _delta_kernel, lq, hq, stats_shape)(fo, fg, *index)
    dk, dv = call("dkdv", _dkdv_kernel, lk, hkv, (jax.ShapeDtypeStruct(fk.shape, k.dtype),
                                                  jax.ShapeDtypeStruct(fv.shape, v.dtype)))(fq, fk, fv, fg, lse, delta,
                                                                                             *index)
    dq = call("dq", _dq_kernel, lq, hq, jax.ShapeDtypeStruct(fq.shape, q.dtype))(fq, fk, fv, fg, lse, delta, *index)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)

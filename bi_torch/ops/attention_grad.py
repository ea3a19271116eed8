"""A fused backward for dense attention (full or causal, GQA): three Triton
kernels, no atomics, no (L, L) array in memory.

1. ``_stats_kernel``, a program per (sequence, query head, block of queries):
   ``delta = rowsum(dO * O)`` in fp32, and, unless the forward kept them
   (autograd's path does: ``bi_torch.ops.attention._dense(with_lse=True)``),
   each query's log2-sum-exp2 of its scaled scores ``s * scale * log2(e)``
   over its visible keys, from which the probabilities are recomputed.
2. ``_dkdv_kernel``, a program per (sequence, KV head, block of keys): dK and
   dV summed over the group's query heads in head order, and over the query
   blocks in increasing order.
3. ``_dq_kernel``, a program per (sequence, query head, block of queries): dQ
   summed over the key blocks in increasing order.

Every program reads one sequence and walks it in an order fixed by the
lengths and ``bi_core.attention.backward_blocks`` alone, so a sequence's
gradients do not depend on the batch, and every run gives the same bits.
From ``bi_core.attention.MASK_FREE_FROM`` tokens the tiles that see every
key skip the mask, in loops of their own (a speed choice: the same values in
the same order, the same bits).
Products take the inputs' dtype on the tensor cores with fp32 accumulation
(fp32 inputs: full fp32), as flash-attention's backward does; the
probabilities and ``dS`` are rounded to the inputs' dtype for their products.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bi_core import attention as contract
from bi_torch._launch import fast


@triton.jit
def _at(base, b, h, pos, sb, sl, sh, d):
    """Pointers to the rows ``pos`` of head ``h`` of sequence ``b``."""
    return base + b * sb + h * sh + pos.to(tl.int64)[:, None] * sl + d[None, :]


@triton.jit
def _seq(b, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, VARLEN: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    """(first query token, query count, first key token, key count) of
    sequence ``b``: packed sequences read them from the offsets ``CU_Q``,
    ``CU_K``; dense ones start at 0 with the fixed counts, unless
    ``KV_LEN`` gives each sequence's keys."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        lq = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        lk = tl.load(CU_K + b + 1) - k0
    else:
        q0 = lq_fixed * 0
        lq = lq_fixed + q0
        k0 = q0
        lk = lk_fixed + q0
    if HAS_KV_LEN:
        lk = tl.load(KV_LEN + b)
    return q0, lq, k0, lk


@triton.jit
def _visible(qpos, kpos, lq, lk, offset, CAUSAL: tl.constexpr):
    ok = (kpos < lk)[None, :] & (qpos < lq)[:, None]
    if CAUSAL:
        ok = ok & (kpos[None, :] <= qpos[:, None] + offset)
    return ok


@triton.jit
def _key_end(tile, lk, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key a block of queries sees."""
    if CAUSAL:
        return tl.minimum(lk, tile * BLOCK_M + BLOCK_M + offset)
    return lk


@triton.jit
def _p_ds(q, k, v, g, lse, delta, valid, scale, c, PRECISION: tl.constexpr, MASK: tl.constexpr):
    """The probabilities of a (queries, keys) tile and ``dS`` (with the scale);
    ``c = scale * log2(e)``, ``lse`` in log2 units; ``valid`` applied only
    with ``MASK`` (a tile whose pairs are all visible skips it)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * c
    p = tl.exp2(s - lse[:, None])
    if MASK:
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(g, tl.trans(v), input_precision=PRECISION, out_dtype=tl.float32)
    return p, p * (dp - delta[:, None]) * scale


@fast
@triton.jit
def _stats_kernel(Q, K, O, DO, LSE, DELTA, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, ls, c,
                  sqb, sql, sqh, skb, skl, skh, sob, sol, soh, sgb, sgl, sgh,
                  HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                  HAS_LSE: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HQ, bh % HQ
    q0, lq, k0, lk = _seq(b, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, VARLEN, HAS_KV_LEN)
    offset = lk - lq
    qpos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q_ok = (qpos < lq)[:, None]
    o = tl.load(_at(O, b, h, q0 + qpos, sob, sol, soh, d), mask=q_ok, other=0.0)
    g = tl.load(_at(DO, b, h, q0 + qpos, sgb, sgl, sgh, d), mask=q_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    rows = bh * ls + qpos
    tl.store(DELTA + rows, delta, mask=qpos < lq)
    if not HAS_LSE:
        q = tl.load(_at(Q, b, h, q0 + qpos, sqb, sql, sqh, d), mask=q_ok, other=0.0)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        end = tl.where(tile * BLOCK_M < lq, _key_end(tile, lk, offset, BLOCK_M, CAUSAL), 0)
        for n0 in range(0, end, BLOCK_N):
            kpos = n0 + tl.arange(0, BLOCK_N)
            k = tl.load(_at(K, b, h // G, k0 + kpos, skb, skl, skh, d), mask=(kpos < lk)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * c
            s = tl.where(_visible(qpos, kpos, lq, lk, offset, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), axis=1)
            m = m_new
        # A query that sees no key: +inf, so that its probabilities are exp2(-inf) = 0.
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))
        tl.store(LSE + rows, lse, mask=qpos < lq)


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, q0, m0, kpos, d, stats, lq, lk, offset, scale, c,
               sqb, sql, sqh, sgb, sgl, sgh, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr, MASK: tl.constexpr):
    """dK and dV of one block of queries added to ``dk``, ``dv``; without
    ``MASK`` every (query, key) pair of the tile is visible."""
    qpos = m0 + tl.arange(0, BLOCK_M)
    q_ok = (qpos < lq)[:, None]
    q = tl.load(_at(Q, b, h, q0 + qpos, sqb, sql, sqh, d), mask=q_ok, other=0.0)
    g = tl.load(_at(DO, b, h, q0 + qpos, sgb, sgl, sgh, d), mask=q_ok, other=0.0)
    lse = tl.load(LSE + stats + qpos, mask=qpos < lq, other=float("inf"))
    delta = tl.load(DELTA + stats + qpos, mask=qpos < lq, other=0.0)
    p, ds = _p_ds(q, k, v, g, lse, delta, _visible(qpos, kpos, lq, lk, offset, CAUSAL), scale, c, PRECISION,
                  MASK)
    dv = tl.dot(tl.trans(p.to(g.dtype)), g, dv, input_precision=PRECISION, out_dtype=tl.float32)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION, out_dtype=tl.float32)
    return dk, dv


@fast
@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, ls, scale, c,
                 sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sgb, sgl, sgh,
                 sdkb, sdkl, sdkh, sdvb, sdvl, sdvh,
                 HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 MASK_FREE: tl.constexpr, VARLEN: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, hkv = bh // HKV, bh % HKV
    q0, lq, k0, lk = _seq(b, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, VARLEN, HAS_KV_LEN)
    offset = lk - lq
    kpos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    k_ok = (kpos < lk)[:, None]
    k = tl.load(_at(K, b, hkv, k0 + kpos, skb, skl, skh, d), mask=k_ok, other=0.0)
    v = tl.load(_at(V, b, hkv, k0 + kpos, svb, svl, svh, d), mask=k_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    # A tile past the sequence's keys walks no query (its gradients are zeros).
    q_end = tl.where(tile * BLOCK_N < lk, lq, 0)
    lo = q_end * 0
    if CAUSAL:  # the first query that sees this tile's first key
        lo = tl.maximum(tile * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    # MASK_FREE: query blocks [lo, mid_lo) and [mid_hi, lq) need the mask (the
    # diagonal, the last partial block); those between see every key of this
    # tile, so their tiles skip it (the same values: the mask keeps every
    # element). Else one loop, every tile masked: the same bits.
    mid_lo, mid_hi = q_end, q_end
    if MASK_FREE:
        if tile * BLOCK_N + BLOCK_N <= lk:
            mid_lo = lo
            if CAUSAL:  # the first query block that sees this tile's last key
                mid_lo = tl.maximum(lo, tl.cdiv(tl.maximum(tile * BLOCK_N + BLOCK_N - 1 - offset, 0), BLOCK_M)
                                    * BLOCK_M)
            mid_lo = tl.minimum(mid_lo, lq)
            mid_hi = tl.maximum(mid_lo, lq // BLOCK_M * BLOCK_M)
    for j in range(G):  # the group's query heads, in order
        h = hkv * G + j
        stats = (b * (HKV * G) + h) * ls
        for m0 in range(lo, mid_lo, BLOCK_M):
            dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, q0, m0, kpos, d, stats, lq, lk, offset, scale,
                                c, sqb, sql, sqh, sgb, sgl, sgh, BLOCK_M, CAUSAL, PRECISION, True)
        if MASK_FREE:
            for m0 in range(mid_lo, mid_hi, BLOCK_M):
                dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, q0, m0, kpos, d, stats, lq, lk, offset,
                                    scale, c, sqb, sql, sqh, sgb, sgl, sgh, BLOCK_M, CAUSAL, PRECISION, False)
            for m0 in range(mid_hi, q_end, BLOCK_M):
                dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, k, v, dk, dv, b, h, q0, m0, kpos, d, stats, lq, lk, offset,
                                    scale, c, sqb, sql, sqh, sgb, sgl, sgh, BLOCK_M, CAUSAL, PRECISION, True)
    # Dense keys past a sequence's length are its padding: their gradients
    # (zeros) are written too. Packed ones belong to the next sequence.
    if VARLEN:
        written = kpos < lk
    else:
        written = kpos < lk_fixed
    tl.store(_at(DK, b, hkv, k0 + kpos, sdkb, sdkl, sdkh, d), dk.to(DK.dtype.element_ty), mask=written[:, None])
    tl.store(_at(DV, b, hkv, k0 + kpos, sdvb, sdvl, sdvh, d), dv.to(DV.dtype.element_ty), mask=written[:, None])


@triton.jit
def _dq_tile(K, V, q, g, lse, delta, dq, b, hkv, k0, n0, qpos, d, lq, lk, offset, scale, c,
             skb, skl, skh, svb, svl, svh, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
             PRECISION: tl.constexpr, MASK: tl.constexpr):
    """dQ of one block of keys added to ``dq``."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    k_ok = (kpos < lk)[:, None]
    k = tl.load(_at(K, b, hkv, k0 + kpos, skb, skl, skh, d), mask=k_ok, other=0.0)
    v = tl.load(_at(V, b, hkv, k0 + kpos, svb, svl, svh, d), mask=k_ok, other=0.0)
    _, ds = _p_ds(q, k, v, g, lse, delta, _visible(qpos, kpos, lq, lk, offset, CAUSAL), scale, c, PRECISION, MASK)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=tl.float32)


@fast
@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, ls, scale, c,
               sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sgb, sgl, sgh, sdqb, sdql, sdqh,
               HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, MASK_FREE: tl.constexpr,
               VARLEN: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HQ, bh % HQ
    q0, lq, k0, lk = _seq(b, CU_Q, CU_K, KV_LEN, lq_fixed, lk_fixed, VARLEN, HAS_KV_LEN)
    offset = lk - lq
    qpos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q_ok = (qpos < lq)[:, None]
    q = tl.load(_at(Q, b, h, q0 + qpos, sqb, sql, sqh, d), mask=q_ok, other=0.0)
    g = tl.load(_at(DO, b, h, q0 + qpos, sgb, sgl, sgh, d), mask=q_ok, other=0.0)
    lse = tl.load(LSE + bh * ls + qpos, mask=qpos < lq, other=float("inf"))
    delta = tl.load(DELTA + bh * ls + qpos, mask=qpos < lq, other=0.0)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    # A tile past the sequence's queries walks no key.
    end = tl.where(tile * BLOCK_M < lq, _key_end(tile, lk, offset, BLOCK_M, CAUSAL), 0)
    # MASK_FREE: key blocks [0, mid) are visible to every query of this block
    # (when it lies inside lq): no mask; the rest (the diagonal, the last
    # partial block) take it. The same values, in the same order.
    mid = end * 0
    if MASK_FREE:
        if tile * BLOCK_M + BLOCK_M <= lq:
            mid = lk // BLOCK_N * BLOCK_N
            if CAUSAL:
                mid = tl.minimum(mid, tl.maximum(tile * BLOCK_M + offset + 1, 0) // BLOCK_N * BLOCK_N)
        for n0 in range(0, mid, BLOCK_N):
            dq = _dq_tile(K, V, q, g, lse, delta, dq, b, h // G, k0, n0, qpos, d, lq, lk, offset, scale, c,
                          skb, skl, skh, svb, svl, svh, BLOCK_N, CAUSAL, PRECISION, False)
    for n0 in range(mid, end, BLOCK_N):
        dq = _dq_tile(K, V, q, g, lse, delta, dq, b, h // G, k0, n0, qpos, d, lq, lk, offset, scale, c,
                      skb, skl, skh, svb, svl, svh, BLOCK_N, CAUSAL, PRECISION, True)
    tl.store(_at(DQ, b, h, q0 + qpos, sdqb, sdql, sdqh, d), dq.to(DQ.dtype.element_ty), mask=q_ok)


def _rows_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, g: torch.Tensor,
                       causal: bool, scale: float | None = None,
                       config: dict[str, contract.BackwardLaunch] | None = None,
                       lse: torch.Tensor | None = None, *, kv_lengths: torch.Tensor | None = None,
                       cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                       max_seqlen_q: int | None = None,
                       max_seqlen_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of ``out = attention(q, k, v, causal, scale)`` for the
    output gradient ``g``; ``(B, L, H, D)`` layouts as ``bi_torch.attention``,
    causal queries aligned to the end of the keys. In the inputs' dtype.
    ``config``: launches by kernel name (default:
    ``bi_core.attention.backward_launches``), for
    probes that time other tiles. ``lse``: the forward's statistics, fp32
    ``(B * Hq, Lq)`` (``bi_torch.ops.attention._dense(with_lse=True)``);
    without them a kernel recomputes them (one more ``QK^T`` product; other
    gradient bits, as deterministic and batch-invariant).

    ``kv_lengths`` (int32 ``(B,)``, dense): sequence b has its first
    ``kv_lengths[b]`` keys, its queries aligned to that length; the padding
    keys' gradients are zeros. ``cu_seqlens_q``, ``cu_seqlens_k`` (int32
    ``(B + 1,)``, with the host ints ``max_seqlen_q``, ``max_seqlen_k``):
    packed ``(total, H, D)`` tensors as ``bi_torch.varlen_attention``, and
    ``lse`` then ``(B * Hq, max_seqlen_q)``. The offsets are trusted here
    (the forward checked them)."""
    varlen = contract.backward_packed(cu_seqlens_q, cu_seqlens_k, kv_lengths, max_seqlen_q, max_seqlen_k)
    if varlen:
        q, k, v, out, g = (t.unsqueeze(0) for t in (q, k, v, out, g))
        b, lq, lk = cu_seqlens_q.shape[0] - 1, int(max_seqlen_q), int(max_seqlen_k)
    else:
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    hq, d = q.shape[2], q.shape[3]
    hkv = k.shape[2]
    contract.check_head_dim(d, "attention backward")
    if hq % hkv:
        raise ValueError(f"attention backward: {hq} query heads are not a multiple of {hkv} KV heads")
    q, k, v, out, g = (_rows_unit(t) for t in (q, k, v, out, g.to(q.dtype)))
    c = contract.qk_scale(scale, d, "attention backward")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    group = hq // hkv
    cfg = {**contract.backward_launches(d), **(config or {})}
    precision = "ieee"  # fp32 inputs: full fp32 products (16-bit inputs: the flag is unused)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    unpack = (lambda *ts: tuple(t[0] for t in ts)) if varlen else (lambda *ts: ts)
    if b == 0 or q.shape[1] == 0 or hq == 0:
        return unpack(dq, dk.zero_(), dv.zero_())
    if k.shape[1] == 0:
        return unpack(dq.zero_(), dk, dv)
    lk = max(lk, 1)
    if lse is not None and (lse.shape != (b * hq, lq) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(f"attention backward: lse must be float32 ({b * hq}, {lq}) on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    has_lse = lse is not None
    lse = lse.contiguous() if has_lse else torch.empty((b * hq, lq), dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)
    # Packed tensors: one "sequence" of every token, each program's own
    # sequence from the offsets (a batch stride of 0).
    strides = (lambda t: (0, t.stride(1), t.stride(2))) if varlen else (lambda t: (t.stride(0), t.stride(1),
                                                                                  t.stride(2)))
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    index = [cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
             kv_lengths if kv_lengths is not None else dummy]
    mask_free = max(lq, lk) >= contract.MASK_FREE_FROM
    common = dict(D=d, G=group, CAUSAL=bool(causal), PRECISION=precision, VARLEN=varlen,
                  HAS_KV_LEN=kv_lengths is not None)

    def launch(kernel, rows, heads, *args, **consts):
        at = cfg[kernel]
        grid = (triton.cdiv(rows, at.block_n if kernel == "dkdv" else at.block_m), b * heads)
        kernels[kernel][grid](*args, **consts, **common, BLOCK_M=at.block_m, BLOCK_N=at.block_n,
                              num_warps=at.num_warps, num_stages=at.num_stages)

    sizes = (*index, lq, lk, lq)
    launch("stats", lq, hq, q, k, out, g, lse, delta, *sizes, c,
           *strides(q), *strides(k), *strides(out), *strides(g), HQ=hq, HAS_LSE=has_lse)
    launch("dkdv", lk, hkv, q, k, v, g, lse, delta, dk, dv, *sizes, scale, c,
           *strides(q), *strides(k), *strides(v), *strides(g), *strides(dk), *strides(dv), HKV=hkv,
           MASK_FREE=mask_free)
    launch("dq", lq, hq, q, k, v, g, lse, delta, dq, *sizes, scale, c,
           *strides(q), *strides(k), *strides(v), *strides(g), *strides(dq), HQ=hq, MASK_FREE=mask_free)
    return unpack(dq, dk, dv)


kernels = {"stats": _stats_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}

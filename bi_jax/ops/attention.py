"""Attention for JAX: Pallas kernels (Triton backend) and launchers for the
dense, packed variable-length and paged-KV-cache forms.

The kernels are the program that ``bi_torch/ops/attention.py`` runs, step for
step (the contract of ``bi_core.attention``: blocks and splits at absolute
key positions, the online softmax within a split, the splits folded in
order, PTX for every step a compiler could reorder), so that the two
frameworks give the same bits. The kernels see q, k, v and the output as
``(rows, head_dim)`` arrays (a row: one head of one token) and index them by
row, so that Pallas's Triton backend switches to 64-bit offsets for arrays
past 4 GB (a KV cache of any size); a row index is int32: each array may
hold at most 2**31 - 1 rows, a mask at most 2**31 - 1 elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bi_core import attention as contract
from bi_jax._checks import check_float_array, interpret_mode
from bi_jax._pallas import pallas_call
from bi_jax.ops.grad import with_attention_backward
from bi_jax.ops.matmul import _tile_dot

__all__ = ["attention", "dot_product_attention", "varlen_attention", "paged_attention", "launch"]

_NEG_INF = float("-inf")
_MAX_ROWS = 2**31 - 1


def _asm(asm, *args):
    shape = args[0].shape
    args = [jnp.broadcast_to(a, shape).astype(jnp.float32) for a in args]
    return pltriton.elementwise_inline_asm(
        asm, args=args, constraints="=r," + ",".join("r" for _ in args), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)],
    )[0]


def _exp2_fma(x, c, neg_m, ptx):
    return _asm(contract.EXP2_FMA_ASM, x, c, neg_m) if ptx else jnp.exp2(x * c + neg_m)


def _exp2_diff(a, b, ptx):
    return _asm(contract.EXP2_DIFF_ASM, a, b) if ptx else jnp.exp2(a - b)


def _fma(a, b, c, ptx):
    return _asm(contract.FMA_ASM, a, b, c) if ptx else a * b + c


def _mul(a, b, ptx):
    return _asm(contract.MUL_ASM, a, b) if ptx else a * b


def _add(a, b, ptx):
    return _asm(contract.ADD_ASM, a, b) if ptx else a + b


def _fold_term(a, sa, b, sb, ptx):
    return _asm(contract.FOLD_ASM, a, sa, b, sb) if ptx else a * sa + b * sb


def _div(a, b, ptx):
    return _asm(contract.DIV_ASM, a, b) if ptx else a / b


def _fold(big, part, ptx):
    """Fold a split's partial (m, l, acc) into the running result (split order)."""
    big_m, big_l, big_acc = big
    m, l, acc = part
    new_m = jnp.maximum(big_m, m)
    base = jnp.where(new_m == _NEG_INF, 0.0, new_m)
    a = _exp2_diff(big_m, base, ptx)
    b = _exp2_diff(m, base, ptx)
    big_l = _fold_term(big_l, a, l, b, ptx)
    big_acc = _fold_term(big_acc, jnp.broadcast_to(a[:, None], big_acc.shape), acc,
                         jnp.broadcast_to(b[:, None], acc.shape), ptx)
    return new_m, big_l, big_acc


def _finish(big_l, big_acc, ptx):
    """ACC / L; zeros for a row with no visible key (a NaN stays a NaN)."""
    l2 = jnp.broadcast_to(big_l[:, None], big_acc.shape)
    empty = l2 == 0.0
    return jnp.where(empty, 0.0, _div(big_acc, jnp.where(empty, 1.0, l2), ptx))


def _empty(bm, d):
    return (jnp.full((bm,), _NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32),
            jnp.zeros((bm, d), jnp.float32))


def _store_lse(lse_ref, row, big_m, big_l, valid):
    """Each row's log2-sum-exp2 of its scaled scores, ``m + log2(l)`` (+inf
    for a row that sees no key), at the workspace's row layout: the
    statistics the backward recomputes the probabilities from
    (``bi_jax.ops.attention_grad``)."""
    lse = jnp.where(big_l > 0, big_m + jnp.log2(jnp.where(big_l > 0, big_l, 1.0)), float("inf"))
    pltriton.store(lse_ref.at[row], lse, mask=valid)


def _head_rows(rows, d):
    """The index of whole rows ``rows`` of a ``(rows, d)`` ref (2-D integer
    indices, so the lowering scales them by d in 64 bits past 4 GB)."""
    return rows[:, None], jnp.arange(d, dtype=jnp.int32)[None, :]


def _scalar(ref, i):
    return pltriton.load(ref.at[pl.ds(i, 1)])[0]


def _seq_info(s, cu_q_ref, cu_k_ref, kv_len_ref, st):
    if st["varlen_q"]:
        q0 = _scalar(cu_q_ref, s)
        q_len = _scalar(cu_q_ref, s + 1) - q0
    else:
        q0, q_len = jnp.int32(0), jnp.int32(st["q_len"])
    if st["varlen_k"]:
        k0 = _scalar(cu_k_ref, s)
        kv_len = _scalar(cu_k_ref, s + 1) - k0
    else:
        k0, kv_len = jnp.int32(0), jnp.int32(st["kv_len"])
    if st["has_kv_len"]:
        kv_len = _scalar(kv_len_ref, s)
    return q0, q_len, k0, kv_len


def _rows(tile, q_len, kv_len, st):
    bm, g = st["block_m"], st["group"]
    flat = tile * bm + jnp.arange(bm, dtype=jnp.int32)
    qi = flat // g
    gi = flat % g
    valid = qi < q_len
    pos = kv_len - q_len + qi if st["bottom_right"] else qi
    lo = jnp.maximum(pos - st["left"], 0)
    hi = jnp.minimum(pos + st["right"], kv_len - 1)
    return qi, gi, valid, jnp.where(valid, lo, 1), jnp.where(valid, hi, 0)


def _kv_offsets(kpos, in_seq, s, k0, bt_ref, strides, st):
    sb, stt = strides
    if st["paged"]:
        page = pltriton.load(bt_ref.at[s * st["bt_stride"] + kpos // st["page_size"]], mask=in_seq, other=0)
        return page * sb + (kpos % st["page_size"]) * stt
    return s * sb + (k0 + kpos) * stt


def _block(q, k_ref, v_ref, bt_ref, carry, blk, s, k0, hk, kv_len, lo, hi, valid, masks, st, bounded=True):
    """One block of keys folded into a split's running (m, l, acc); ``masks``:
    (mask_ref, mask row offsets, bias_ref, bias row offsets), as bi_torch's.
    ``bounded=False``: a block every valid row of the tile sees whole, run
    without the bounds' selects (which would keep every score as it is)."""
    m, l, acc = carry
    bn, d, ptx = st["block_n"], st["head_dim"], st["ptx"]
    kpos = blk * bn + jnp.arange(bn, dtype=jnp.int32)
    in_seq = kpos < kv_len
    k_off = _kv_offsets(kpos, in_seq, s, k0, bt_ref, st["k_strides"][:2], st) + hk * st["k_strides"][2]
    v_off = _kv_offsets(kpos, in_seq, s, k0, bt_ref, st["v_strides"][:2], st) + hk * st["v_strides"][2]
    if bounded:
        kmask = jnp.broadcast_to(in_seq[:, None], (bn, d))
        k = pltriton.load(k_ref.at[_head_rows(k_off, d)], mask=kmask, other=0.0)
        v = pltriton.load(v_ref.at[_head_rows(v_off, d)], mask=kmask, other=0.0)
    else:
        k = pltriton.load(k_ref.at[_head_rows(k_off, d)])
        v = pltriton.load(v_ref.at[_head_rows(v_off, d)])
    precision = lax.Precision.HIGHEST if st["ieee"] else lax.Precision.DEFAULT
    qk = _tile_dot(q, k.T, precision, interpreted=not ptx)
    seen = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= hi[:, None]) if bounded else None
    mask_ref, mask_rows, bias_ref, bias_rows = masks
    tile_in = valid[:, None] & in_seq[None, :]
    if st["has_mask"]:
        keep = pltriton.load(mask_ref.at[mask_rows[:, None] + kpos[None, :] * st["mask_strides"][3]], mask=tile_in,
                             other=0)
        seen = keep != 0 if seen is None else seen & (keep != 0)
    if st["has_bias"]:
        bias = pltriton.load(bias_ref.at[bias_rows[:, None] + kpos[None, :] * st["bias_strides"][3]], mask=tile_in,
                             other=0.0).astype(jnp.float32)
        t = _fma(qk, jnp.full(qk.shape, st["qk_scale"], jnp.float32), _mul(bias, contract.LOG2E_F32, ptx), ptx)
        if seen is not None:
            t = jnp.where(seen, t, _NEG_INF)
        new_m = jnp.maximum(m, jnp.max(t, axis=1))
        base = jnp.where(new_m == _NEG_INF, 0.0, new_m)
        p = _exp2_diff(t, jnp.broadcast_to(base[:, None], t.shape), ptx).astype(v.dtype)
        return _products(p, v, (m, l, acc), new_m, base, st)
    if seen is not None:
        qk = jnp.where(seen, qk, _NEG_INF)
    return _scores_step(qk, v, carry, st)


def _scores_step(qk, v, carry, st):
    """A block's raw scores (hidden ones at -inf) folded into the split's
    running (m, l, acc): the exponent ``fma(qk, c, -m)``."""
    m, ptx = carry[0], st["ptx"]
    new_m = jnp.maximum(m, _mul(jnp.max(qk, axis=1), st["qk_scale"], ptx))
    base = jnp.where(new_m == _NEG_INF, 0.0, new_m)
    p = _exp2_fma(qk, st["qk_scale"], jnp.broadcast_to(-base[:, None], qk.shape), ptx).astype(v.dtype)
    return _products(p, v, carry, new_m, base, st)


def _products(p, v, carry, new_m, base, st):
    """The block's probabilities ``p`` (rounded to the value dtype, against
    the new maximum ``base``) into the running sum and accumulator."""
    m, l, acc = carry
    ptx = st["ptx"]
    precision = lax.Precision.HIGHEST if st["ieee"] else lax.Precision.DEFAULT
    alpha = _exp2_diff(m, base, ptx)
    # The row sum as a product against ones (bi_torch's reason: a reduction's
    # order follows the register layout, a product's does not).
    p_sum = _tile_dot(p, jnp.ones((st["block_n"], 16), v.dtype), precision, interpreted=not ptx)
    pv = _tile_dot(p, v, precision, interpreted=not ptx)
    l = _fma(l, alpha, jnp.max(p_sum, axis=1), ptx)
    return new_m, l, _add(_mul(acc, jnp.broadcast_to(alpha[:, None], acc.shape), ptx), pv, ptx)


def _tile_range(valid, lo, hi):
    k_lo = jnp.min(jnp.where(valid, lo, 1 << 30))
    k_hi = jnp.max(jnp.where(valid, hi, -1))
    return k_lo, k_hi


def _causal_tile(q_ref, k_ref, v_ref, out_refs, st):
    """A dense causal prefill tile, as many queries as keys, one program for
    all its splits: the general tile's arithmetic, block by block and fold by
    fold (the same bits), without what a dense causal tile does not need
    (per-row key ranges, sequence offsets, a mask on the keys of the blocks
    every row sees whole); bi_torch's ``_causal_tile``. ``even``: every row
    of every tile is a query and every key block is full, so no load or
    store is masked."""
    bm, bn, bps, d, g, ptx = st["block_m"], st["block_n"], st["bps"], st["head_dim"], st["group"], st["ptx"]
    tile, sh = pl.program_id(0), pl.program_id(1)
    s, hk = sh // st["hkv"], sh % st["hkv"]
    seq, even = st["q_len"], st["even"]
    r = jnp.arange(bm, dtype=jnp.int32)
    first = tile * (bm // g)
    qi = first + r // g
    h = hk * g + r % g
    valid = qi < seq
    rmask = None if even else jnp.broadcast_to(valid[:, None], (bm, d))
    qs, ks, vs = st["q_strides"], st["k_strides"], st["v_strides"]
    q = pltriton.load(q_ref.at[_head_rows(s * qs[0] + qi * qs[1] + h * qs[2], d)], mask=rmask,
                      other=None if even else 0.0)
    k_row, v_row = s * ks[0] + hk * ks[2], s * vs[0] + hk * vs[2]
    free = (first + 1) // bn  # blocks [0, free): every row sees them whole
    last = jnp.minimum(first + bm // g - 1, seq - 1) // bn

    def body(diagonal, blk, state):
        kpos = blk * bn + jnp.arange(bn, dtype=jnp.int32)
        kmask = None if even or not diagonal else jnp.broadcast_to((kpos < seq)[:, None], (bn, d))
        other = None if kmask is None else 0.0
        k = pltriton.load(k_ref.at[_head_rows(k_row + kpos * ks[1], d)], mask=kmask, other=other)
        v = pltriton.load(v_ref.at[_head_rows(v_row + kpos * vs[1], d)], mask=kmask, other=other)
        precision = lax.Precision.HIGHEST if st["ieee"] else lax.Precision.DEFAULT
        qk = _tile_dot(q, k.T, precision, interpreted=not ptx)
        if diagonal:
            qk = jnp.where(kpos[None, :] <= qi[:, None], qk, _NEG_INF)
        part = _scores_step(qk, v, state[3:], st)
        return lax.cond(((blk + 1) % bps == 0) | (blk == last),
                        lambda: (*_fold(state[:3], part, ptx), *_empty(bm, d)),
                        lambda: (*state[:3], *part))

    state = _empty(bm, d) + _empty(bm, d)
    # A traced lower bound: with a literal 0 the Triton lowering (jax 0.11.2)
    # typed the loop index as i1 inside the loop ("_mod: i32, i1").
    state = lax.fori_loop(free * 0, free, functools.partial(body, False), state)
    state = lax.fori_loop(free, last + 1, functools.partial(body, True), state)
    out = _finish(state[1], state[2], ptx)
    os_ = st["o_strides"]
    o_ref = out_refs[0]
    pltriton.store(o_ref.at[_head_rows(s * os_[0] + qi * os_[1] + h * os_[2], d)], out.astype(o_ref.dtype),
                   mask=rmask)
    if st["with_lse"]:
        row = sh * st["ws_rows"] + tile * bm + r
        _store_lse(out_refs[1], row, state[0], state[1], None if even else valid)


def _attn_kernel(q_ref, k_ref, v_ref, cu_q_ref, cu_k_ref, kv_len_ref, bt_ref, mask_ref, bias_ref, *out_refs, st):
    if st["dense_causal"]:
        return _causal_tile(q_ref, k_ref, v_ref, out_refs, st)
    bm, bn, bps, d, g, ptx = st["block_m"], st["block_n"], st["bps"], st["head_dim"], st["group"], st["ptx"]
    tile, sh = pl.program_id(0), pl.program_id(1)
    s, hk = sh // st["hkv"], sh % st["hkv"]
    q0, q_len, k0, kv_len = _seq_info(s, cu_q_ref, cu_k_ref, kv_len_ref, st)
    qi, gi, valid, lo, hi = _rows(tile, q_len, kv_len, st)
    k_lo, k_hi = _tile_range(valid, lo, hi)
    blk_lo, blk_hi = k_lo // bn, k_hi // bn
    if st["spread"]:
        split = pl.program_id(2)
        blk_lo = jnp.maximum(blk_lo, split * bps)
        blk_hi = jnp.minimum(blk_hi, split * bps + bps - 1)
    live = (tile * bm < q_len * g) & (k_lo <= k_hi) & (blk_lo <= blk_hi) if st["spread"] else tile * bm < q_len * g
    h = hk * g + gi
    qs = st["q_strides"]
    rmask = jnp.broadcast_to(valid[:, None], (bm, d))

    @pl.when(live)
    def _():
        q_off = s * qs[0] + (q0 + qi) * qs[1] + h * qs[2]
        q = pltriton.load(q_ref.at[_head_rows(q_off, d)], mask=rmask, other=0.0)
        ms, bs = st["mask_strides"], st["bias_strides"]
        masks = (mask_ref, s * ms[0] + h * ms[1] + qi * ms[2], bias_ref, s * bs[0] + h * bs[1] + qi * bs[2])
        blk_args = (s, k0, hk, kv_len, lo, hi, valid, masks, st)

        def body(bounded, blk, state):
            part = _block(q, k_ref, v_ref, bt_ref, state[3:], blk, *blk_args, bounded=bounded)
            if st["spread"]:
                return (*state[:3], *part)
            # The end of a split (or of the tile's range): fold it in, start the next.
            return lax.cond(((blk + 1) % bps == 0) | (blk == blk_hi),
                            lambda: (*_fold(state[:3], part, ptx), *_empty(bm, d)),
                            lambda: (*state[:3], *part))

        state = _empty(bm, d) + _empty(bm, d)
        if st["whole"]:
            # Blocks every valid row sees whole, [w_lo, w_hi], without the
            # bounds' selects (the same bits); those before and after with.
            w_lo = jnp.maximum((jnp.max(jnp.where(valid, lo, 0)) + bn - 1) // bn, blk_lo)
            w_hi = jnp.minimum((jnp.min(jnp.where(valid, hi, 1 << 30)) + 1) // bn - 1, blk_hi)
            none = w_lo > w_hi
            w_lo, w_hi = jnp.where(none, blk_hi + 1, w_lo), jnp.where(none, blk_hi, w_hi)
            for start, stop, bounded in ((blk_lo, w_lo, True), (w_lo, w_hi + 1, False), (w_hi + 1, blk_hi + 1, True)):
                state = lax.fori_loop(start, stop, functools.partial(body, bounded), state)
        else:
            state = lax.fori_loop(blk_lo, blk_hi + 1, functools.partial(body, True), state)
        if st["spread"]:
            ws_m_ref, ws_l_ref, ws_acc_ref = out_refs
            m, l, acc = state[3:]
            row = (split * (pl.num_programs(1) * st["ws_rows"]) + sh * st["ws_rows"] + tile * bm
                   + jnp.arange(bm, dtype=jnp.int32))
            pltriton.store(ws_m_ref.at[row], m, mask=valid)
            pltriton.store(ws_l_ref.at[row], l, mask=valid)
            pltriton.store(ws_acc_ref.at[_head_rows(row, d)], acc, mask=rmask)
        else:
            o_ref = out_refs[0]
            out = _finish(state[1], state[2], ptx)
            os_ = st["o_strides"]
            o_off = s * os_[0] + (q0 + qi) * os_[1] + h * os_[2]
            pltriton.store(o_ref.at[_head_rows(o_off, d)], out.astype(o_ref.dtype), mask=rmask)
            if st["with_lse"]:
                row = sh * st["ws_rows"] + tile * bm + jnp.arange(bm, dtype=jnp.int32)
                _store_lse(out_refs[1], row, state[0], state[1], valid)


def _merge_kernel(ws_m_ref, ws_l_ref, ws_acc_ref, cu_q_ref, cu_k_ref, kv_len_ref, o_ref, *lse_ref, st):
    bm, d, g, ptx = st["block_m"], st["head_dim"], st["group"], st["ptx"]
    tile, sh = pl.program_id(0), pl.program_id(1)
    s, hk = sh // st["hkv"], sh % st["hkv"]
    q0, q_len, k0, kv_len = _seq_info(s, cu_q_ref, cu_k_ref, kv_len_ref, st)
    qi, gi, valid, lo, hi = _rows(tile, q_len, kv_len, st)
    k_lo, k_hi = _tile_range(valid, lo, hi)
    rmask = jnp.broadcast_to(valid[:, None], (bm, d))
    split_keys = st["block_n"] * st["bps"]
    row = sh * st["ws_rows"] + tile * bm + jnp.arange(bm, dtype=jnp.int32)
    plane = pl.num_programs(1) * st["ws_rows"]

    @pl.when(tile * bm < q_len * g)
    def _():
        def body(split, big):
            r = split * plane + row
            m = pltriton.load(ws_m_ref.at[r], mask=valid, other=_NEG_INF)
            l = pltriton.load(ws_l_ref.at[r], mask=valid, other=0.0)
            acc = pltriton.load(ws_acc_ref.at[_head_rows(r, d)], mask=rmask, other=0.0)
            return _fold(big, (m, l, acc), ptx)

        big = lax.fori_loop(k_lo // split_keys, k_hi // split_keys + 1, body, _empty(bm, d))
        out = _finish(big[1], big[2], ptx)
        h = hk * g + gi
        os_ = st["o_strides"]
        o_off = s * os_[0] + (q0 + qi) * os_[1] + h * os_[2]
        pltriton.store(o_ref.at[_head_rows(o_off, d)], out.astype(o_ref.dtype), mask=rmask)
        if st["with_lse"]:
            _store_lse(lse_ref[0], row, big[0], big[1], valid)


def _row_major_strides(shape):
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _rows_of(strides, d):
    if any(int(x) % d for x in strides):
        raise AssertionError(f"attention: strides {tuple(strides)} are not multiples of the head dim {d}")
    return tuple(int(x) // d for x in strides)


def _broadcast_strides(a):
    """Row-major element strides of a 4-D array, 0 along its size-1 (broadcast) axes."""
    if a is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else st for n, st in zip(a.shape, _row_major_strides(a.shape)))


# The dense causal specialisation serves every grid it fits (as in bi_torch);
# False keeps the general path unless ``launch(..., dense_causal=True)``. The
# same bits either way (tests/test_attention.py, on an H100: bench/NOTES.md).
DENSE_CAUSAL_BY_DEFAULT = True


def launch(q, k, v, *, batch, hkv, group, q_strides, k_strides, v_strides, q_len=0, kv_len=0, cu_q=None,
           cu_k=None, kv_lens=None, block_table=None, page_size=1, max_q_len, max_kv_len, qk_scale, window,
           bottom_right, split_kv=None, config=None, interpret=None, mask=None, bias=None, whole=None,
           with_lse=False, dense_causal=None):
    """The kernels over every (tile, sequence x KV head[, split]) of
    row-major arrays (``*_strides``: element strides of batch or page, token
    or slot, head, each a multiple of the head dim); returns the output laid
    out as ``q``. Any ``config`` of
    ``bi_core.attention.tile_configs``, either ``split_kv`` and either loop
    structure (``whole``: blocks that every row of a tile sees whole run without
    the bounds' selects; default from the tile's rows) give the same bits.
    ``mask`` (int16, nonzero: visible) and ``bias`` (float): dense forms only,
    4-D arrays that broadcast to ``(B, Hq, Lq, Lk)``. ``with_lse``: return
    ``(out, lse)``, ``lse`` each row's log2-sum-exp2 of its scaled scores,
    fp32 ``(batch * hkv, rows)`` in the tiles' row order (query-major, the
    group's heads inside), the same bits from either strategy.
    ``dense_causal``: run a dense causal grid (as many queries as keys, no
    window on the left within the sequence, no mask, bias, lengths or pages,
    one program per tile) through the causal specialisation (True) or the
    general path (False; None: ``DENSE_CAUSAL_BY_DEFAULT``); the same bits."""
    interpret = interpret_mode("attention") if interpret is None else interpret
    d = q.shape[-1]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.size // d > _MAX_ROWS:
            raise ValueError(f"attention: {name} has {a.size // d} rows of head_dim {d}; bi_jax's kernels index at "
                             f"most {_MAX_ROWS} (int32 row indices)")
    for name, a in (("mask", mask), ("bias", bias)):
        if a is not None and a.size > _MAX_ROWS:
            raise ValueError(f"attention: {name} has {a.size} elements; bi_jax's kernels address at most "
                             f"{_MAX_ROWS} (int32 offsets)")
    score_bytes = sum(np.dtype(a.dtype).itemsize for a in (mask, bias) if a is not None)
    cfg = config or contract.tile_config(d, max_q_len * group, np.dtype(q.dtype).itemsize, score_bytes)
    bm = cfg.block_m
    tiles = max(1, -(-(max_q_len * group) // bm))
    splits = contract.num_splits(max_kv_len)
    programs = tiles * batch * hkv
    spread = contract.spread_splits(programs, max_kv_len) if split_kv is None else bool(split_kv) and splits > 1
    left, right = window
    ws_rows = tiles * bm
    whole = bool(bm >= contract.WHOLE_BLOCKS_FROM_ROWS if whole is None else whole)
    plain = all(a is None for a in (cu_q, cu_k, kv_lens, block_table, mask, bias))
    causal_fits = (plain and not spread and q_len == kv_len and right == 0 and left >= kv_len
                   and bm % group == 0)
    if dense_causal is None:
        dense_causal = DENSE_CAUSAL_BY_DEFAULT and causal_fits and whole
    elif dense_causal and not causal_fits:
        raise ValueError("attention launch: dense_causal needs dense causal keys, as many as queries, "
                         "one program per tile and a tile of whole GQA groups")
    st = dict(
        block_m=bm, block_n=contract.block_n(d), bps=contract.SPLIT // contract.block_n(d), head_dim=d, group=group, hkv=hkv,
        varlen_q=cu_q is not None, varlen_k=cu_k is not None, has_kv_len=kv_lens is not None,
        paged=block_table is not None, q_len=int(q_len), kv_len=int(kv_len), left=int(left), right=int(right),
        bottom_right=bool(bottom_right), page_size=int(page_size),
        bt_stride=int(block_table.shape[1]) if block_table is not None else 0,
        # Strides in rows of head_dim elements: the kernels index (rows, d) views.
        q_strides=_rows_of(q_strides, d), k_strides=_rows_of(k_strides, d),
        v_strides=_rows_of(v_strides, d), o_strides=_rows_of(q_strides, d),
        qk_scale=float(qk_scale), ieee=np.dtype(q.dtype) == np.dtype(jnp.float32), ptx=not interpret,
        spread=spread, ws_rows=ws_rows,
        whole=whole, has_mask=mask is not None, has_bias=bias is not None,
        dense_causal=bool(dense_causal),
        even=bool(dense_causal) and q_len % (bm // group) == 0 and q_len % contract.block_n(d) == 0,
        mask_strides=_broadcast_strides(mask), bias_strides=_broadcast_strides(bias), with_lse=bool(with_lse),
    )
    dummy = jnp.zeros((1,), jnp.int32)
    index_args = [a.reshape(-1).astype(jnp.int32) if a is not None else dummy
                  for a in (cu_q, cu_k, kv_lens, block_table)]
    flat = [q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)]
    score_args = [a.reshape(-1) if a is not None else dummy for a in (mask, bias)]
    params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out_shape = jax.ShapeDtypeStruct((q.size // d, d), q.dtype)
    lse_shape = jax.ShapeDtypeStruct((batch * hkv * ws_rows,), jnp.float32)

    def result(outs):
        if not with_lse:
            return outs.reshape(q.shape)
        return outs[0].reshape(q.shape), outs[1].reshape(batch * hkv, ws_rows)

    if not spread:
        out = pallas_call(
            functools.partial(_attn_kernel, st=st), grid=(tiles, batch * hkv, 1),
            out_shape=(out_shape, lse_shape) if with_lse else out_shape,
            compiler_params=params, interpret=interpret, name="bi_attention",
        )(*flat, *index_args, *score_args)
        return result(out)
    ws_len = splits * batch * hkv * ws_rows
    if ws_len > _MAX_ROWS:
        raise ValueError("attention: the split-KV workspace would exceed int32 row indices; pass split_kv=False")
    ws = (jax.ShapeDtypeStruct((ws_len,), jnp.float32), jax.ShapeDtypeStruct((ws_len,), jnp.float32),
          jax.ShapeDtypeStruct((ws_len, d), jnp.float32))
    ws_m, ws_l, ws_acc = pallas_call(
        functools.partial(_attn_kernel, st=st), grid=(tiles, batch * hkv, splits), out_shape=ws,
        compiler_params=params, interpret=interpret, name="bi_attention_splits",
    )(*flat, *index_args, *score_args)
    out = pallas_call(
        functools.partial(_merge_kernel, st=st), grid=(tiles, batch * hkv),
        out_shape=(out_shape, lse_shape) if with_lse else out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
        name="bi_attention_merge",
    )(ws_m, ws_l, ws_acc, *index_args[:3])
    return result(out)


# --- checks ------------------------------------------------------------------


def _check_qkv(op, q, k, v, q_dims, kv_dims, names=("q", "k", "v")):
    for name, a in zip(names, (q, k, v)):
        check_float_array(name, a, op)
    return contract.check_shapes(op, names, (q.shape, k.shape, v.shape),
                                 tuple(str(np.dtype(a.dtype)) for a in (q, k, v)), q_dims, kv_dims)


def _check_index(op, name, a, ndim, length=None):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{op}: {name} must be an int32 array, got {type(a).__name__}")
    if not np.issubdtype(np.dtype(a.dtype), np.integer):
        raise TypeError(f"{op}: {name} must be an int32 array, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(a.shape)}")
    if length is not None and a.shape[0] != length:
        raise ValueError(f"{op}: {name} must have {length} entries, got {a.shape[0]}")
    host = _concrete(a) if np.dtype(a.dtype).itemsize > 4 else None
    if host is not None and host[0].size and (host[0].min() < -contract.INT32_MAX - 1 or host[0].max() > contract.INT32_MAX):
        raise ValueError(f"{op}: {name} holds values outside int32 ({host[0].min()}..{host[0].max()})")
    return jnp.asarray(a, jnp.int32)


def _concrete(*arrays):
    """Host copies when every array is concrete (outside jit), else None."""
    try:
        return [np.asarray(a) for a in arrays]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _positive_static(op, name, value):
    if value is None or isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative Python int (it sizes the launch grid), got {value!r}")
    return int(value)


# --- public API ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jitted(statics: tuple):
    kw = dict(statics)

    def run(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias):
        return launch(q, k, v, cu_q=cu_q, cu_k=cu_k, kv_lens=kv_lens, block_table=block_table, mask=mask,
                      bias=bias, **kw)

    def run_with_lse(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias):
        # The training forward: the same launch, also keeping the rows' statistics.
        return launch(q, k, v, cu_q=cu_q, cu_k=cu_k, kv_lens=kv_lens, block_table=block_table, mask=mask,
                      bias=bias, with_lse=True, **kw)

    return with_attention_backward(jax.jit(run), kw, jax.jit(run_with_lse))


def _call(q, k, v, *, cu_q=None, cu_k=None, kv_lens=None, block_table=None, mask=None, bias=None, **statics):
    return _jitted(tuple(sorted(statics.items())))(q, k, v, cu_q, cu_k, kv_lens, block_table, mask, bias)


def _score_mask(op, name, a, shape, boolean):
    """A boolean mask (as int16) or additive bias as a 4-D array that
    broadcasts to ``shape`` (B, N, T, S), without materialising the broadcast."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{op}: {name} must be an array, got {type(a).__name__}")
    dt = np.dtype(a.dtype)
    if boolean and dt != np.bool_:
        raise TypeError(f"{op}: {name} must be a bool array, got {dt}")
    if not boolean and not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{op}: {name} must be a floating-point array, got {dt}")
    full = (1,) * (4 - a.ndim) + tuple(a.shape) if a.ndim <= 4 else None
    if full is None or any(n not in (1, m) for n, m in zip(full, shape)):
        raise ValueError(f"{op}: {name} of shape {tuple(a.shape)} does not broadcast to (B, N, T, S) = {tuple(shape)}")
    a = jnp.reshape(a, full)
    # int16, not int8: an 8-bit array among the inputs of the probabilities
    # gives their product operands kWidth 4, which regroups the keys of each
    # tensor-core step (bi_torch.ops.attention._score_mask).
    return a.astype(jnp.int16) if boolean else a


def _dense(op, q, k, v, *, causal, scale, window, bottom_right, split_kv, kv_lengths=None,
           kv_lengths_name="kv_lengths", names=("q", "k", "v"), mask=None, bias=None):
    contract.check_split_kv(split_kv, op)
    contract.window_sides(causal, window, op)
    group = _check_qkv(op, q, k, v, 4, 4, names)
    b, lq, hq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{op}: batch sizes differ: q has {b}, k and v have {k.shape[0]}")
    lk, hkv = k.shape[1], k.shape[2]
    shape = (b, hq, lq, lk)
    mask = None if mask is None else _score_mask(op, "mask", mask, shape, True)
    bias = None if bias is None else _score_mask(op, "bias", bias, shape, False)
    if b == 0 or lq == 0:
        return jnp.zeros(q.shape, q.dtype)
    kv_lens = None
    if kv_lengths is not None:
        kv_lens = _check_index(op, kv_lengths_name, kv_lengths, 1, b)
        host = _concrete(kv_lens)
        if host is not None and ((host[0] < 0) | (host[0] > lk)).any():
            raise ValueError(f"{op}: {kv_lengths_name} must lie in [0, {lk}]")
    if lk == 0:
        return jnp.zeros(q.shape, q.dtype)
    qs, ks = _row_major_strides(q.shape), _row_major_strides(k.shape)
    return _call(q, k, v, kv_lens=kv_lens, mask=mask, bias=bias, batch=b, hkv=hkv, group=group, q_strides=qs[:3], k_strides=ks[:3],
                 v_strides=ks[:3], q_len=lq, kv_len=lk, max_q_len=lq, max_kv_len=lk,
                 qk_scale=contract.qk_scale(scale, d, op), window=contract.window_sides(causal, window, op),
                 bottom_right=bottom_right, split_kv=split_kv)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, window=None, kv_lengths=None,
              split_kv: bool | None = None):
    """Batch-invariant attention over ``(batch, seq, heads, head_dim)`` arrays,
    with the semantics of ``bi_torch.attention`` (flash-attn's): ``Hq`` a
    multiple of ``Hkv``; causal queries aligned to the end of the keys;
    ``window`` None, an int ``w`` (``(w, w)``) or ``(left, right)``;
    ``kv_lengths`` (int32 ``(B,)``) the valid keys of each sequence. On the
    same inputs it gives bi_torch's bits."""
    return _dense("attention", q, k, v, causal=causal, scale=scale, window=window, bottom_right=True,
                  split_kv=split_kv, kv_lengths=kv_lengths)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None, return_residual: bool = False):
    """Batch-invariant ``jax.nn.dot_product_attention`` for ``(B, T, N, H)`` or
    ``(T, N, H)`` arrays: ``is_causal`` masks as JAX does (query ``i`` sees
    keys up to ``i``), ``key_value_seq_lengths`` masks padded keys,
    ``local_window_size`` an int or ``(left, right)``, GQA when the query
    heads are a multiple of the key heads. Query rows past
    ``query_seq_lengths`` are zeros.

    ``bias`` (floating point, added to the scaled scores) and ``mask`` (bool,
    True: the key takes part) broadcast to ``(B, N, T, S)`` and combine with
    the other masks, as in JAX. A query whose keys are all masked gives zeros
    (JAX's XLA implementation averages the values); so does one whose every
    bias is so negative that ``bias * log2(e)`` overflows fp32 (``finfo.min``).
    A mask equal to the causal one gives ``is_causal``'s bits.

    Not supported (refused): an ``implementation`` other than None and
    ``return_residual=True``.
    """
    op = "dot_product_attention"
    if return_residual:
        raise NotImplementedError(f"{op}: return_residual=True is not supported (the softmax statistics stay "
                                  "inside the kernel)")
    if implementation is not None:
        raise ValueError(f"{op}: implementation={implementation!r}: bi_jax has one (batch-invariant) implementation")
    for name, a in (("query", query), ("key", key), ("value", value)):
        check_float_array(name, a, op)
        if a.ndim not in (3, 4) or a.ndim != query.ndim:
            raise ValueError(f"{op}: query, key and value must all be (B, T, N, H) or all (T, N, H); got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    squeeze = query.ndim == 3
    if squeeze:
        # (T, N, H): a mask or bias of (N, T, S) is the batch of one's.
        query, key, value = query[None], key[None], value[None]
    out = _dense(op, query, key, value, causal=is_causal, scale=scale, window=local_window_size,
                 bottom_right=False, split_kv=None, kv_lengths=key_value_seq_lengths,
                 kv_lengths_name="key_value_seq_lengths", names=("query", "key", "value"), mask=mask, bias=bias)
    if query_seq_lengths is not None:
        lens = _check_index(op, "query_seq_lengths", query_seq_lengths, 1, query.shape[0])
        host = _concrete(lens)
        if host is not None and ((host[0] < 0) | (host[0] > query.shape[1])).any():
            raise ValueError(f"{op}: query_seq_lengths must lie in [0, {query.shape[1]}]")
        keep = jnp.arange(query.shape[1])[None, :] < lens[:, None]
        out = jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out[0] if squeeze else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, scale: float | None = None, window=None, split_kv: bool | None = None):
    """Batch-invariant attention over packed sequences, as
    ``bi_torch.varlen_attention``: q ``(total_q, Hq, D)``, k and v
    ``(total_k, Hkv, D)``, int32 offsets ``cu_seqlens_*`` of ``B + 1``
    entries. ``max_seqlen_q`` and ``max_seqlen_k`` are Python ints (they size
    the launch grid under jit)."""
    op = "varlen_attention"
    contract.check_split_kv(split_kv, op)
    group = _check_qkv(op, q, k, v, 3, 3)
    cu_q = _check_index(op, "cu_seqlens_q", cu_seqlens_q, 1)
    cu_k = _check_index(op, "cu_seqlens_k", cu_seqlens_k, 1)
    if cu_q.shape[0] != cu_k.shape[0] or cu_q.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries")
    mq = _positive_static(op, "max_seqlen_q", max_seqlen_q)
    mk = _positive_static(op, "max_seqlen_k", max_seqlen_k)
    host = _concrete(cu_q, cu_k)
    if host is not None:
        for name, cu, total, mx in (("cu_seqlens_q", host[0], q.shape[0], mq), ("cu_seqlens_k", host[1], k.shape[0], mk)):
            if cu[0] != 0 or cu[-1] != total or (np.diff(cu) < 0).any():
                raise ValueError(f"{op}: {name} must start at 0, not decrease and end at {total}")
            if len(cu) > 1 and np.diff(cu).max() > mx:
                raise ValueError(f"{op}: a sequence is longer than the max_seqlen given for {name}")
    batch = cu_q.shape[0] - 1
    if batch == 0 or q.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    qs, ks = _row_major_strides(q.shape), _row_major_strides(k.shape)
    return _call(q, k, v, cu_q=cu_q, cu_k=cu_k, batch=batch, hkv=k.shape[1], group=group,
                 q_strides=(0, qs[0], qs[1]), k_strides=(0, ks[0], ks[1]), v_strides=(0, ks[0], ks[1]),
                 max_q_len=mq, max_kv_len=max(mk, 1), qk_scale=contract.qk_scale(scale, q.shape[-1], op),
                 window=contract.window_sides(causal, window, op), bottom_right=True, split_kv=split_kv)


def paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                    max_seqlen_q: int | None = None, k_new=None, v_new=None, causal: bool = True,
                    scale: float | None = None, window=None, split_kv: bool | None = None):
    """Batch-invariant attention of new queries against a paged KV cache, as
    ``bi_torch.paged_attention``: q ``(B, Lq, Hq, D)`` or packed
    ``(total_q, Hq, D)`` with ``cu_seqlens_q`` and a static ``max_seqlen_q``;
    caches ``(num_pages, page_size, Hkv, D)``; ``block_table`` int32
    ``(B, pages_per_seq)``; ``cache_seqlens`` int32 ``(B,)``.

    With ``k_new``/``v_new`` (q's layout, Hkv heads) the new keys and values
    are written at positions ``cache_seqlens[b] ..`` first and the result is
    ``(out, k_cache, v_cache)`` (JAX arrays are immutable: donate the caches
    under jit to update them in place); without them, ``out``. Outside jit the
    lengths and the block table's used entries are checked on the host.
    """
    op = "paged_attention"
    contract.check_split_kv(split_kv, op)
    packed = getattr(q, "ndim", 0) == 3
    group = _check_qkv(op, q, k_cache, v_cache, 3 if packed else 4, 4, ("q", "k_cache", "v_cache"))
    num_pages, page_size, hkv, d = k_cache.shape
    if page_size < 1:
        raise ValueError(f"{op}: the cache's page size must be positive, got {page_size}")
    if packed:
        if cu_seqlens_q is None:
            raise ValueError(f"{op}: a 3-D q (total_q, Hq, D) needs cu_seqlens_q; pass q as (B, Lq, Hq, D) otherwise")
        cu_q = _check_index(op, "cu_seqlens_q", cu_seqlens_q, 1)
        batch = cu_q.shape[0] - 1
        max_q = _positive_static(op, "max_seqlen_q", max_seqlen_q)
        host = _concrete(cu_q)
        if host is not None:
            cu = host[0]
            if len(cu) < 1 or cu[0] != 0 or cu[-1] != q.shape[0] or (np.diff(cu) < 0).any():
                raise ValueError(f"{op}: cu_seqlens_q must start at 0, not decrease and end at {q.shape[0]} "
                                 "(the packed query count)")
            if len(cu) > 1 and np.diff(cu).max() > max_q:
                raise ValueError(f"{op}: a sequence has {np.diff(cu).max()} new queries, more than "
                                 f"max_seqlen_q={max_q}")
        q_lens = cu_q[1:] - cu_q[:-1]
    else:
        if cu_seqlens_q is not None:
            raise ValueError(f"{op}: cu_seqlens_q is for a packed 3-D q; q has shape {tuple(q.shape)}")
        cu_q, batch, max_q = None, q.shape[0], q.shape[1]
        q_lens = jnp.full((batch,), max_q, jnp.int32)
    bt = _check_index(op, "block_table", block_table, 2, batch)
    lens = _check_index(op, "cache_seqlens", cache_seqlens, 1, batch)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: pass both k_new and v_new, or neither")
    if k_new is not None:
        want = tuple(q.shape[:-2]) + (hkv, d)
        for name, a in (("k_new", k_new), ("v_new", v_new)):
            check_float_array(name, a, op)
            if tuple(a.shape) != want:
                raise ValueError(f"{op}: {name} must have shape {want} (q's layout with the cache's {hkv} heads), "
                                 f"got {tuple(a.shape)}")
            if np.dtype(a.dtype) != np.dtype(q.dtype):
                raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {a.dtype}")
    kv_lens = lens + q_lens if k_new is not None else lens
    host = _concrete(bt, kv_lens, q_lens) if batch else None
    if host is not None:
        h_bt, h_kv, h_q = host
        capacity = bt.shape[1] * page_size
        if (h_kv > capacity).any() or (np.asarray(lens) < 0).any():
            raise ValueError(f"{op}: cache lengths must lie in [0, {capacity}] (block table width x page size), "
                             "new keys included")
        if (h_kv < h_q).any():
            raise ValueError(f"{op}: every sequence needs at least as many keys as new queries")
        used = np.arange(h_bt.shape[1])[None, :] < -(-h_kv // page_size)[:, None]
        bad = used & ((h_bt < 0) | (h_bt >= num_pages))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{op}: block_table[{r}, {c}] = {h_bt[r, c]} is not a page of the cache "
                             f"(0..{num_pages - 1})")
    if k_new is not None:
        k_cache, v_cache = _write_cache(k_cache, v_cache, bt, lens, k_new, v_new, cu_q, page_size)
    total_q = q.shape[0] if packed else batch * max_q
    if total_q == 0 or batch == 0:
        out = jnp.zeros(q.shape, q.dtype)
    else:
        qs, ks = _row_major_strides(q.shape), _row_major_strides(k_cache.shape)
        q_strides = (0, qs[0], qs[1]) if packed else qs[:3]
        out = _call(q, k_cache, v_cache, cu_q=cu_q, kv_lens=kv_lens, block_table=bt, batch=batch, hkv=hkv,
                    group=group, q_strides=q_strides, k_strides=ks[:3], v_strides=ks[:3], q_len=max_q,
                    page_size=page_size, max_q_len=max_q, max_kv_len=max(bt.shape[1] * page_size, 1),
                    qk_scale=contract.qk_scale(scale, d, op), window=contract.window_sides(causal, window, op),
                    bottom_right=True, split_kv=split_kv)
    return (out, k_cache, v_cache) if k_new is not None else out


def _write_cache(k_cache, v_cache, bt, lens, k_new, v_new, cu_q, page_size):
    """Scatter the new keys and values to their pages (a copy: no arithmetic)."""
    if cu_q is None:
        b, lq = k_new.shape[:2]
        seq = jnp.repeat(jnp.arange(b), lq)
        idx = jnp.tile(jnp.arange(lq), b)
        kn, vn = k_new.reshape(b * lq, *k_new.shape[2:]), v_new.reshape(b * lq, *v_new.shape[2:])
    else:
        total = k_new.shape[0]
        tok = jnp.arange(total)
        seq = jnp.searchsorted(cu_q[1:], tok, side="right")
        idx = tok - cu_q[seq]
        kn, vn = k_new, v_new
    pos = lens[seq] + idx
    page = bt[seq, pos // page_size]
    slot = pos % page_size
    return k_cache.at[page, slot].set(kn), v_cache.at[page, slot].set(vn)

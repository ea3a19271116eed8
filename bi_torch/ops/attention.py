"""Attention: Triton kernels and launchers (dense, packed variable-length and
paged KV cache), following the contract of ``bi_core.attention``.

One kernel serves every form. A program owns a tile of ``block_m`` rows of one
(sequence, KV head): the rows are (query, head of the GQA group) pairs, so a
decode step with 4 query heads per KV head fills 4 rows per query. It walks
the keys of its tile's range in blocks of ``BLOCK_N`` at absolute positions,
folding each split of ``SPLIT`` keys into the row's result in split order
(``SPREAD=False``), or computes one split and writes its partial result, which
a second kernel folds in split order (``SPREAD=True``, split-KV for small
batches). Both give the same bits; so do both tile configs of a head size,
and the dense causal specialisation (``_causal_tile``: as many queries as
keys, no mask, lengths or pages), which a dense causal grid takes by default.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from bi_core import attention as contract
from bi_torch import direct as _direct
from bi_torch import _plan
from bi_torch._checks import check_float_tensor, check_launchable, check_no_autograd, interpreting
from bi_torch._launch import cdiv, fast, recording, sm_count
from bi_torch.ops import grad as _grad

__all__ = ["attention", "scaled_dot_product_attention", "varlen_attention", "paged_attention", "launch"]

_NEG_INF = float("-inf")


@triton.jit
def _bcast(x, like):
    return tl.broadcast_to(x, like.shape)


@triton.jit
def _exp2_fma(x, c, neg_m, PTX: tl.constexpr):
    """2 ** fma(x, c, neg_m)."""
    if PTX:
        return tl.inline_asm_elementwise(contract_EXP2_FMA, "=r,r,r,r", [x, _bcast(c, x), _bcast(neg_m, x)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.math.exp2(x * c + neg_m)


@triton.jit
def _exp2_diff(a, b, PTX: tl.constexpr):
    """2 ** (a - b)."""
    if PTX:
        return tl.inline_asm_elementwise(contract_EXP2_DIFF, "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.math.exp2(a - b)


@triton.jit
def _fma(a, b, c, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(contract_FMA, "=r,r,r,r", [a, _bcast(b, a), _bcast(c, a)], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b + c


@triton.jit
def _mul(a, b, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(contract_MUL, "=r,r,r", [a, _bcast(b, a)], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _add(a, b, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(contract_ADD, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def _fold_term(a, sa, b, sb, PTX: tl.constexpr):
    """a * sa + b * sb (contract FOLD_ASM)."""
    if PTX:
        return tl.inline_asm_elementwise(contract_FOLD, "=r,r,r,r,r", [a, sa, b, sb], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * sa + b * sb


@triton.jit
def _div(a, b, PTX: tl.constexpr):
    if PTX:
        return tl.inline_asm_elementwise(contract_DIV, "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a / b


# The PTX strings, as module globals the jitted helpers read as constants.
contract_EXP2_FMA = tl.constexpr(contract.EXP2_FMA_ASM)
contract_EXP2_DIFF = tl.constexpr(contract.EXP2_DIFF_ASM)
contract_FMA = tl.constexpr(contract.FMA_ASM)
contract_MUL = tl.constexpr(contract.MUL_ASM)
contract_ADD = tl.constexpr(contract.ADD_ASM)
contract_FOLD = tl.constexpr(contract.FOLD_ASM)
contract_DIV = tl.constexpr(contract.DIV_ASM)


@triton.jit
def _fold(big_m, big_l, big_acc, m, l, acc, PTX: tl.constexpr):
    """Fold a split's partial (m, l, acc) into the running result, in split order."""
    new_m = tl.maximum(big_m, m)
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    a = _exp2_diff(big_m, base, PTX)
    b = _exp2_diff(m, base, PTX)
    big_l = _fold_term(big_l, a, l, b, PTX)
    big_acc = _fold_term(big_acc, _bcast(a[:, None], big_acc), acc, _bcast(b[:, None], acc), PTX)
    return new_m, big_l, big_acc


@triton.jit
def _end_split(big_m, big_l, big_acc, m, l, acc, BLOCK_M: tl.constexpr, D: tl.constexpr, PTX: tl.constexpr):
    """The end of a split walked in the tile's program: its partial folded in,
    a fresh one for the next split."""
    big_m, big_l, big_acc = _fold(big_m, big_l, big_acc, m, l, acc, PTX)
    return (big_m, big_l, big_acc, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, D], tl.float32))


@triton.jit
def _finish(big_l, big_acc, PTX: tl.constexpr):
    """ACC / L, correctly rounded; zeros for a row with no visible key (L = 0;
    a NaN in its inputs stays a NaN)."""
    l2 = _bcast(big_l[:, None], big_acc)
    empty = l2 == 0.0
    return tl.where(empty, 0.0, _div(big_acc, tl.where(empty, 1.0, l2), PTX))


@triton.jit
def _store_lse(WS_M, sh, ws_rows, tile, big_m, big_l, valid, BLOCK_M: tl.constexpr):
    """Each row's log2-sum-exp2 of its scaled scores, ``m + log2(l)`` (+inf
    for a row that sees no key), into the first plane of ``WS_M`` at the
    workspace's row layout: the statistics the backward recomputes the
    probabilities from (``bi_torch.ops.attention_grad``)."""
    row = (sh * ws_rows + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    lse = tl.where(big_l > 0, big_m + tl.log2(tl.where(big_l > 0, big_l, 1.0)), float("inf"))
    tl.store(WS_M + row, lse, mask=valid)


@triton.jit
def _seq_info(s, CU_Q, CU_K, KV_LEN, q_len_fixed, kv_len_fixed,
              VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_KV_LEN: tl.constexpr,
              K_STARTS: tl.constexpr = False):
    """(first query token, query count, first key token, key count) of
    sequence s. ``K_STARTS``: dense keys, ``CU_K`` holds each sequence's first
    key (the keys before it are left out, as if absent)."""
    if VARLEN_Q:
        q0 = tl.load(CU_Q + s)
        q_len = tl.load(CU_Q + s + 1) - q0
    else:
        q0 = s * 0
        q_len = q_len_fixed + s * 0
    if VARLEN_K:
        k0 = tl.load(CU_K + s)
        kv_len = tl.load(CU_K + s + 1) - k0
    elif K_STARTS:
        k0 = tl.load(CU_K + s)
        kv_len = kv_len_fixed - k0
    else:
        k0 = s * 0
        kv_len = kv_len_fixed + s * 0
    if HAS_KV_LEN:
        kv_len = tl.load(KV_LEN + s)
    return q0, q_len, k0, kv_len


@triton.jit
def _rows(tile, q_len, kv_len, win_left, win_right, G: tl.constexpr, BLOCK_M: tl.constexpr,
          BOTTOM_RIGHT: tl.constexpr):
    """The tile's rows: query index, head in group, validity and visible key range."""
    flat = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = flat // G
    g = flat % G
    valid = qi < q_len
    if BOTTOM_RIGHT:
        pos = kv_len - q_len + qi
    else:
        pos = qi
    lo = tl.maximum(pos - win_left, 0)
    hi = tl.minimum(pos + win_right, kv_len - 1)
    lo = tl.where(valid, lo, 1)
    hi = tl.where(valid, hi, 0)
    return qi, g, valid, lo, hi


@triton.jit
def _key_range(valid, lo, hi):
    """The first and last key any valid row of the tile sees (first > last: none)."""
    return tl.min(tl.where(valid, lo, 1 << 30), 0), tl.max(tl.where(valid, hi, -1), 0)


@triton.jit
def _kv_offsets(kpos, in_seq, s, k0, BT, bt_stride, page_size, stride_b, stride_t, PAGED: tl.constexpr):
    """Element offsets (int64) of the key rows at absolute positions ``kpos``."""
    if PAGED:
        page = tl.load(BT + s * bt_stride + kpos // page_size, mask=in_seq, other=0).to(tl.int64)
        return page * stride_b + (kpos % page_size).to(tl.int64) * stride_t
    else:
        return s.to(tl.int64) * stride_b + (k0 + kpos).to(tl.int64) * stride_t


@triton.jit
def _block(q, K, V, m, l, acc, blk, s, k0, hkv, kv_len, lo, hi, BT, bt_stride, page_size,
           skb, skt, skh, svb, svt, svh, qk_scale, d, cols, valid, MASK, mask_rows, smk, BIAS, bias_rows, sbk,
           bias_scale, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, IEEE: tl.constexpr, PTX: tl.constexpr,
           HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, BOUNDED: tl.constexpr = True):
    """One block of keys folded into a split's running (m, l, acc). A boolean
    mask hides keys as the causal and window bounds do; an additive bias
    enters the exponent as ``fma(qk, c, bias * log2(e))``. ``BOUNDED=False``:
    a block that every valid row of the tile sees whole (inside each row's
    range and the sequence), so the bounds' selects, which would keep every
    score as it is, are left out."""
    kpos = blk * BLOCK_N + cols
    in_seq = kpos < kv_len
    k_off = _kv_offsets(kpos, in_seq, s, k0, BT, bt_stride, page_size, skb, skt, PAGED) + hkv.to(tl.int64) * skh
    v_off = _kv_offsets(kpos, in_seq, s, k0, BT, bt_stride, page_size, svb, svt, PAGED) + hkv.to(tl.int64) * svh
    if BOUNDED:
        k = tl.load(K + k_off[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(V + v_off[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(K + k_off[:, None] + d[None, :])
        v = tl.load(V + v_off[:, None] + d[None, :])
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
    else:
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    tile_in = valid[:, None] & in_seq[None, :]
    if BOUNDED:
        seen = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= hi[:, None])
        if HAS_MASK:
            keep = tl.load(MASK + mask_rows[:, None] + kpos[None, :].to(tl.int64) * smk, mask=tile_in, other=0)
            seen = seen & (keep != 0)
    elif HAS_MASK:
        keep = tl.load(MASK + mask_rows[:, None] + kpos[None, :].to(tl.int64) * smk, mask=tile_in, other=0)
        seen = keep != 0
    if HAS_BIAS:
        bias = tl.load(BIAS + bias_rows[:, None] + kpos[None, :].to(tl.int64) * sbk, mask=tile_in, other=0.0)
        t = _fma(qk, qk_scale, _mul(bias.to(tl.float32), bias_scale, PTX), PTX)
        if BOUNDED or HAS_MASK:
            t = tl.where(seen, t, float("-inf"))
        new_m = tl.maximum(m, tl.max(t, 1))
        base = tl.where(new_m == float("-inf"), 0.0, new_m)
        p = _exp2_diff(t, _bcast(base[:, None], t), PTX).to(v.dtype)
        m, l, acc = _products(p, v, m, l, acc, new_m, base, BLOCK_N, IEEE, PTX)
    else:
        if BOUNDED or HAS_MASK:
            qk = tl.where(seen, qk, float("-inf"))
        m, l, acc = _scores_step(qk, v, m, l, acc, qk_scale, BLOCK_N, IEEE, PTX)
    return m, l, acc


@triton.jit
def _scores_step(qk, v, m, l, acc, qk_scale, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PTX: tl.constexpr):
    """A block's raw scores (hidden ones at -inf) folded into the split's
    running (m, l, acc): the exponent ``fma(qk, c, -m)``."""
    new_m = tl.maximum(m, _mul(tl.max(qk, 1), qk_scale, PTX))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    p = _exp2_fma(qk, qk_scale, -base[:, None], PTX).to(v.dtype)
    return _products(p, v, m, l, acc, new_m, base, BLOCK_N, IEEE, PTX)


@triton.jit
def _products(p, v, m, l, acc, new_m, base, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, PTX: tl.constexpr):
    """The block's probabilities ``p`` (rounded to the value dtype, against
    the new maximum ``base``) into the running sum and accumulator."""
    alpha = _exp2_diff(m, base, PTX)
    # The row sum is a product too (p against a column of ones, every column
    # of it equal, so the max picks it exactly): a tl.sum's order follows the
    # tile's register layout, which follows the tile config and the compiler.
    ones = tl.full([BLOCK_N, 16], 1.0, tl.float32).to(v.dtype)
    # The products start from zero; the rescale is two IEEE steps after them,
    # so no compiler may fold it into a product's accumulation.
    if IEEE:
        p_sum = tl.dot(p, ones, input_precision="ieee", out_dtype=tl.float32)
        pv = tl.dot(p, v, input_precision="ieee", out_dtype=tl.float32)
    else:
        p_sum = tl.dot(p, ones, out_dtype=tl.float32)
        pv = tl.dot(p, v, out_dtype=tl.float32)
    l = _fma(l, alpha, tl.max(p_sum, 1), PTX)
    return new_m, l, _add(_mul(acc, _bcast(alpha[:, None], acc), PTX), pv, PTX)


@triton.jit
def _store_partial(WS_M, WS_L, WS_ACC, split, sh, ws_rows, tile, m, l, acc, valid, d, BLOCK_M: tl.constexpr,
                   D: tl.constexpr):
    """A split's partial (m, l, acc) of the tile's valid rows, for the merge kernel."""
    row = (sh * ws_rows + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    base_row = tl.cast(split, tl.int64) * (tl.num_programs(1) * ws_rows)
    tl.store(WS_M + base_row + row, m, mask=valid)
    tl.store(WS_L + base_row + row, l, mask=valid)
    tl.store(WS_ACC + (base_row + row)[:, None] * D + d[None, :], acc, mask=valid[:, None])


@triton.jit
def _causal_tile(Q, K, V, O, WS_M, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, seq, qk_scale,
                 ws_rows, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BPS: tl.constexpr, IEEE: tl.constexpr, PTX: tl.constexpr,
                 REVERSE: tl.constexpr, HAS_LSE: tl.constexpr, EVEN: tl.constexpr):
    """A dense causal prefill tile, ``seq`` queries over as many keys, one
    program for all its splits: the general tile's arithmetic, block by block
    and fold by fold (the same bits), without what a dense causal tile does
    not need (per-row key ranges, sequence offsets, a mask on the keys of the
    blocks every row sees whole). Each row sees keys ``0..qi``: the blocks
    before the tile's first query's are whole, the rest take the causal
    select. ``EVEN``: every row of every tile is a query and every key block
    is full (``seq`` a multiple of the tile's queries and of ``BLOCK_N``), so
    no load or store is masked."""
    if REVERSE:
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        tile = tl.program_id(0)
    sh = tl.program_id(1)
    s = sh // HKV
    hkv = sh % HKV
    r = tl.arange(0, BLOCK_M)
    first = tile * (BLOCK_M // G)
    qi = first + r // G
    h = hkv * G + r % G
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    q_ptrs = Q + (s.to(tl.int64) * sqb + qi.to(tl.int64) * sqt + h.to(tl.int64) * sqh)[:, None] + d[None, :]
    if EVEN:
        valid = r >= 0
        q = tl.load(q_ptrs)
    else:
        valid = qi < seq
        q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
    K_s = K + (s.to(tl.int64) * skb + hkv.to(tl.int64) * skh)
    V_s = V + (s.to(tl.int64) * svb + hkv.to(tl.int64) * svh)
    free = (first + 1) // BLOCK_N  # blocks [0, free): every row sees them whole
    last = tl.minimum(first + BLOCK_M // G - 1, seq - 1) // BLOCK_N
    big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    big_l = tl.zeros([BLOCK_M], tl.float32)
    big_acc = tl.zeros([BLOCK_M, D], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for part in tl.static_range(2):
        if part == 0:
            start = 0
            stop = free
        else:
            start = free
            stop = last + 1
        for blk in range(start, stop):
            kpos = blk * BLOCK_N + cols
            k_ptrs = K_s + kpos.to(tl.int64)[:, None] * skt + d[None, :]
            v_ptrs = V_s + kpos.to(tl.int64)[:, None] * svt + d[None, :]
            if EVEN or part == 0:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=(kpos < seq)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(kpos < seq)[:, None], other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
            else:
                qk = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
            if part == 1:
                qk = tl.where(kpos[None, :] <= qi[:, None], qk, float("-inf"))
            m, l, acc = _scores_step(qk, v, m, l, acc, qk_scale, BLOCK_N, IEEE, PTX)
            if ((blk + 1) % BPS == 0) | (blk == last):
                big_m, big_l, big_acc, m, l, acc = _end_split(big_m, big_l, big_acc, m, l, acc, BLOCK_M, D, PTX)
    out = _finish(big_l, big_acc, PTX).to(O.dtype.element_ty)
    o_ptrs = O + (s.to(tl.int64) * sob + qi.to(tl.int64) * sot + h.to(tl.int64) * soh)[:, None] + d[None, :]
    if EVEN:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=valid[:, None])
    if HAS_LSE:
        _store_lse(WS_M, sh, ws_rows, tile, big_m, big_l, valid, BLOCK_M)


@fast
@triton.jit
def _attn_kernel(
    Q, K, V, O, WS_ACC, WS_M, WS_L, CU_Q, CU_K, KV_LEN, BT, MASK, BIAS,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, bt_stride,
    smb, smh, smq, smk, sbb, sbh, sbq, sbk,
    q_len_fixed, kv_len_fixed, qk_scale, win_left, win_right, page_size, ws_rows, bias_scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BPS: tl.constexpr, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_KV_LEN: tl.constexpr,
    PAGED: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, SPREAD: tl.constexpr, IEEE: tl.constexpr,
    PTX: tl.constexpr, HAS_MASK: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
    WHOLE: tl.constexpr = False, REVERSE: tl.constexpr = False, K_STARTS: tl.constexpr = False,
    HAS_LSE: tl.constexpr = False, DENSE_CAUSAL: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    if DENSE_CAUSAL:
        _causal_tile(Q, K, V, O, WS_M, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, q_len_fixed,
                     qk_scale, ws_rows, HKV, G, D, BLOCK_M, BLOCK_N, BPS, IEEE, PTX, REVERSE, HAS_LSE, EVEN)
    else:
        # REVERSE: the last (for causal masks the longest) tiles first; schedule only.
        if REVERSE:
            tile = tl.num_programs(0) - 1 - tl.program_id(0)
        else:
            tile = tl.program_id(0)
        sh = tl.program_id(1)
        s = sh // HKV
        hkv = sh % HKV
        q0, q_len, k0, kv_len = _seq_info(s, CU_Q, CU_K, KV_LEN, q_len_fixed, kv_len_fixed, VARLEN_Q, VARLEN_K, HAS_KV_LEN,
                                          K_STARTS)
        if tile * BLOCK_M >= q_len * G:
            return
        qi, g, valid, lo, hi = _rows(tile, q_len, kv_len, win_left, win_right, G, BLOCK_M, BOTTOM_RIGHT)
        k_lo, k_hi = _key_range(valid, lo, hi)
        blk_lo = k_lo // BLOCK_N
        blk_hi = k_hi // BLOCK_N
        if SPREAD:
            split = tl.program_id(2)
            blk_lo = tl.maximum(blk_lo, split * BPS)
            blk_hi = tl.minimum(blk_hi, split * BPS + BPS - 1)
            if (blk_lo > blk_hi) | (k_lo > k_hi):
                return
        d = tl.arange(0, D)
        h = hkv * G + g
        q_off = s.to(tl.int64) * sqb + (q0 + qi).to(tl.int64) * sqt + h.to(tl.int64) * sqh
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        # Element offsets of the rows' (batch, head, query) in the mask and bias.
        mask_rows = s.to(tl.int64) * smb + h.to(tl.int64) * smh + qi.to(tl.int64) * smq
        bias_rows = s.to(tl.int64) * sbb + h.to(tl.int64) * sbh + qi.to(tl.int64) * sbq
        if K_STARTS:
            # Their key axis is the buffer's: a sequence's keys start at k0 there.
            mask_rows += k0.to(tl.int64) * smk
            bias_rows += k0.to(tl.int64) * sbk

        big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        big_l = tl.zeros([BLOCK_M], tl.float32)
        big_acc = tl.zeros([BLOCK_M, D], tl.float32)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        cols = tl.arange(0, BLOCK_N)
        if WHOLE:
            # Blocks that every valid row sees whole, [w_lo, w_hi], run without the
            # bounds' selects (the same bits); the blocks before and after them with.
            w_lo = tl.maximum((tl.max(tl.where(valid, lo, 0), 0) + BLOCK_N - 1) // BLOCK_N, blk_lo)
            w_hi = tl.minimum((tl.min(tl.where(valid, hi, 1 << 30), 0) + 1) // BLOCK_N - 1, blk_hi)
            none = w_lo > w_hi
            w_lo = tl.where(none, blk_hi + 1, w_lo)
            w_hi = tl.where(none, blk_hi, w_hi)
        else:
            w_lo = blk_hi + 1
            w_hi = blk_hi
        for part in tl.static_range(3):
            if part == 0:
                start = blk_lo
                stop = w_lo
            elif part == 1:
                start = w_lo
                stop = w_hi + 1
            else:
                start = w_hi + 1
                stop = blk_hi + 1
            for blk in range(start, stop):
                m, l, acc = _block(q, K, V, m, l, acc, blk, s, k0, hkv, kv_len, lo, hi, BT, bt_stride, page_size,
                                   skb, skt, skh, svb, svt, svh, qk_scale, d, cols, valid, MASK, mask_rows, smk, BIAS,
                                   bias_rows, sbk, bias_scale, BLOCK_N, PAGED, IEEE, PTX, HAS_MASK, HAS_BIAS, part != 1)
                if not SPREAD:
                    # The end of a split (or of the tile's range): fold it in, start the next.
                    if ((blk + 1) % BPS == 0) | (blk == blk_hi):
                        big_m, big_l, big_acc, m, l, acc = _end_split(big_m, big_l, big_acc, m, l, acc, BLOCK_M, D,
                                                                      PTX)
        if SPREAD:
            _store_partial(WS_M, WS_L, WS_ACC, split, sh, ws_rows, tile, m, l, acc, valid, d, BLOCK_M, D)
        else:
            out = _finish(big_l, big_acc, PTX)
            o_off = s.to(tl.int64) * sob + (q0 + qi).to(tl.int64) * sot + h.to(tl.int64) * soh
            tl.store(O + o_off[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])
            if HAS_LSE:
                _store_lse(WS_M, sh, ws_rows, tile, big_m, big_l, valid, BLOCK_M)


@fast
@triton.jit
def _merge_kernel(
    O, WS_ACC, WS_M, WS_L, CU_Q, CU_K, KV_LEN,
    sob, sot, soh, q_len_fixed, kv_len_fixed, win_left, win_right, ws_rows,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BPS: tl.constexpr, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_KV_LEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, PTX: tl.constexpr, MERGE_STAGES: tl.constexpr = 4, K_STARTS: tl.constexpr = False,
    HAS_LSE: tl.constexpr = False,
):
    """Fold the splits' partials of one tile in split order, then the output
    (and with ``HAS_LSE`` the rows' statistics, over split 0's, which this
    program alone reads)."""
    tile = tl.program_id(0)
    sh = tl.program_id(1)
    s = sh // HKV
    hkv = sh % HKV
    q0, q_len, k0, kv_len = _seq_info(s, CU_Q, CU_K, KV_LEN, q_len_fixed, kv_len_fixed, VARLEN_Q, VARLEN_K, HAS_KV_LEN,
                                      K_STARTS)
    if tile * BLOCK_M >= q_len * G:
        return
    qi, g, valid, lo, hi = _rows(tile, q_len, kv_len, win_left, win_right, G, BLOCK_M, BOTTOM_RIGHT)
    k_lo, k_hi = _key_range(valid, lo, hi)
    d = tl.arange(0, D)
    row = (sh * ws_rows + tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    plane = (tl.num_programs(1) * ws_rows).to(tl.int64)
    big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    big_l = tl.zeros([BLOCK_M], tl.float32)
    big_acc = tl.zeros([BLOCK_M, D], tl.float32)
    # No visible key: k_lo > k_hi and the range is empty.
    for split in tl.range(k_lo // (BLOCK_N * BPS), k_hi // (BLOCK_N * BPS) + 1, num_stages=MERGE_STAGES):
        base_row = plane * split
        m = tl.load(WS_M + base_row + row, mask=valid, other=float("-inf"))
        l = tl.load(WS_L + base_row + row, mask=valid, other=0.0)
        acc = tl.load(WS_ACC + (base_row + row)[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
        big_m, big_l, big_acc = _fold(big_m, big_l, big_acc, m, l, acc, PTX)
    out = _finish(big_l, big_acc, PTX)
    h = hkv * G + g
    o_off = s.to(tl.int64) * sob + (q0 + qi).to(tl.int64) * sot + h.to(tl.int64) * soh
    tl.store(O + o_off[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])
    if HAS_LSE:
        _store_lse(WS_M, sh, ws_rows, tile, big_m, big_l, valid, BLOCK_M)


# --- launch ------------------------------------------------------------------


def _programs_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return sm_count(device)
    return contract.SPREAD_BELOW_PROGRAMS


def _empty_i32(device):
    return torch.zeros(1, dtype=torch.int32, device=device)


def launch(
    q, k, v, out, *, q_strides, k_strides, v_strides, o_strides, batch, hkv, group,
    q_len, kv_len, cu_q=None, cu_k=None, kv_lens=None, block_table=None, page_size=1,
    max_q_len, max_kv_len, scale_log2, window, bottom_right, split_kv=None, config=None,
    block_n=None, split_keys=None, merge_stages=4, mask=None, bias=None, whole=None,
    reverse=None, kv_starts=None, with_lse=False, dense_causal=None,
):
    """The kernels over every (tile, sequence x KV head[, split]); the one
    entry point under the public functions, and for tests and probes that
    need a given tile config (``config``), split strategy (``split_kv``) or
    loop structure (``whole``: blocks that every row of a tile sees whole run
    without the bounds' selects; default from the tile's rows), or tile order
    (``reverse``: the last tiles first; default for causal grids of up to
    ``REVERSE_UP_TO_PROGRAMS`` programs). Any config, either strategy, either
    structure and either order give the same bits.

    Strides are element strides (batch or page, token or slot, head) of the
    4-D views ``(B, L, H, D)``; the last dimension must be contiguous.
    ``mask`` (int16, nonzero: visible) and ``bias`` (float): dense forms only,
    ``(B, Hq, Lq, Lk)`` views (broadcast dimensions of stride 0).
    ``kv_starts`` (int32 ``(B,)``, dense keys only, not with ``cu_k``,
    ``kv_lens`` or a block table): sequence b's keys are its buffer's
    ``kv_starts[b]:kv_len``, counted from there as if they started the
    buffer; the mask and bias keep the buffer's key axis.
    ``with_lse``: return ``(out, lse)`` with each row's log2-sum-exp2 of its
    scaled scores, fp32 ``(batch * hkv, rows)`` in the tiles' row order
    (query-major, the group's heads inside), the same bits from either
    strategy (``dense_lse`` reorders it to query heads).
    ``dense_causal``: run a dense causal grid (as many queries as keys, no
    window on the left within the sequence, no mask, bias, lengths or pages,
    one program per tile) through the kernel's causal specialisation (True,
    default where it applies) or its general path (False); the same bits."""
    if kv_starts is not None and (cu_k is not None or kv_lens is not None or block_table is not None):
        raise ValueError("attention launch: kv_starts is for dense keys without kv_lens")
    d = q.shape[-1]
    score_bytes = sum(a.element_size() for a in (mask, bias) if a is not None)
    cfg = config or contract.tile_config(d, max_q_len * group, q.element_size(), score_bytes)
    tiles = cdiv(max(max_q_len * group, 1), cfg.block_m)
    block_n = block_n or contract.block_n(d)
    split_keys = split_keys or contract.SPLIT
    splits = -(-max_kv_len // split_keys)
    programs = tiles * batch * hkv
    if split_kv is None:
        spread = splits > 1 and programs < _programs_limit(q.device)
    else:
        spread = bool(split_kv) and splits > 1
    if whole is None:
        whole = cfg.block_m >= contract.WHOLE_BLOCKS_FROM_ROWS
    left, right = window
    if reverse is None:
        reverse = right == 0 and not spread and programs <= contract.REVERSE_UP_TO_PROGRAMS
    plain = (cu_q is None and cu_k is None and kv_lens is None and block_table is None and mask is None
             and bias is None and kv_starts is None)
    causal_fits = (plain and not spread and q_len == kv_len and right == 0 and left >= kv_len
                   and cfg.block_m % group == 0)
    if dense_causal is None:
        dense_causal = causal_fits and whole
    elif dense_causal and not causal_fits:
        raise ValueError("attention launch: dense_causal needs dense causal keys, as many as queries, "
                         "one program per tile and a tile of whole GQA groups")
    dev = q.device
    ws_rows = tiles * cfg.block_m
    if spread:
        ws_m = torch.empty((splits, batch * hkv, ws_rows), dtype=torch.float32, device=dev)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((splits, batch * hkv, ws_rows, d), dtype=torch.float32, device=dev)
    else:
        ws_m = ws_l = ws_acc = torch.empty(1, dtype=torch.float32, device=dev)
        if with_lse:
            ws_m = torch.empty((1, batch * hkv, ws_rows), dtype=torch.float32, device=dev)
    dummy = _empty_i32(dev)
    common = dict(
        HKV=hkv, G=group, D=d, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BPS=split_keys // block_n,
        VARLEN_Q=cu_q is not None, VARLEN_K=cu_k is not None, HAS_KV_LEN=kv_lens is not None,
        BOTTOM_RIGHT=bottom_right, PTX=not interpreting(), K_STARTS=kv_starts is not None,
        HAS_LSE=bool(with_lse),
    )
    if kv_starts is not None:
        cu_k = kv_starts
    _attn_kernel[(tiles, batch * hkv, splits if spread else 1)](
        q, k, v, out, ws_acc, ws_m, ws_l,
        cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
        kv_lens if kv_lens is not None else dummy, block_table if block_table is not None else dummy,
        mask if mask is not None else dummy, bias if bias is not None else dummy,
        *q_strides, *k_strides, *v_strides, *o_strides,
        block_table.stride(0) if block_table is not None else 0,
        *(mask.stride() if mask is not None else (0, 0, 0, 0)), *(bias.stride() if bias is not None else (0, 0, 0, 0)),
        q_len, kv_len, scale_log2, left, right, page_size, ws_rows, contract.LOG2E_F32,
        PAGED=block_table is not None, SPREAD=spread, IEEE=q.dtype == torch.float32,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, WHOLE=bool(whole), REVERSE=bool(reverse),
        DENSE_CAUSAL=bool(dense_causal),
        EVEN=bool(dense_causal) and q_len % (cfg.block_m // group) == 0 and q_len % block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    if spread:
        _merge_kernel[(tiles, batch * hkv)](
            out, ws_acc, ws_m, ws_l,
            cu_q if cu_q is not None else dummy, cu_k if cu_k is not None else dummy,
            kv_lens if kv_lens is not None else dummy,
            *o_strides, q_len, kv_len, left, right, ws_rows,
            num_warps=4, MERGE_STAGES=merge_stages, **common,
        )
    return (out, ws_m[0]) if with_lse else out


# --- checks --------------------------------------------------------------------


def _check_qkv(op, q, k, v, q_dims, kv_dims, names=("q", "k", "v")):
    for name, t in zip(names, (q, k, v)):
        check_float_tensor(name, t, op)
    group = contract.check_shapes(op, names, (q.shape, k.shape, v.shape), (str(q.dtype), str(k.dtype), str(v.dtype)),
                                  q_dims, kv_dims)
    for name, t in zip(names[1:], (k, v)):
        if t.device != q.device:
            raise ValueError(f"{op}: {names[0]} is on {q.device} but {name} is on {t.device}")
    check_launchable(op, q)
    check_no_autograd(op, q, k, v)
    return group


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _index_tensor(op, name, t, ndim, device, length=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of int32, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be an int32 tensor, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have {length} entries, got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the queries are on {device}")
    if t.dtype == torch.int64 and t.numel() and _host_sync_ok():
        # One host read: an int64 value past int32 must not wrap silently.
        lo, hi = (int(x) for x in torch.aminmax(t))
        if lo < -contract.INT32_MAX - 1 or hi > contract.INT32_MAX:
            raise ValueError(f"{op}: {name} holds values outside int32 ({lo}..{hi})")
    return t.to(torch.int32).contiguous()


def _host_sync_ok() -> bool:
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_cu(op, name, cu, total):
    """cu_seqlens: starts at 0, non-decreasing, ends at the token count (one host read)."""
    host = cu.cpu()
    if int(host[0]) != 0 or int(host[-1]) != total or bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{op}: {name} must start at 0, not decrease and end at {total} (the packed token "
                         f"count), got {host.tolist() if host.numel() <= 16 else '...'}")
    return int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0


# --- public API -------------------------------------------------------------------


def _score_mask(op, name, t, shape, device, boolean):
    """A boolean mask or additive bias broadcast to ``shape`` (B, Hq, Lq, Lk):
    a stride-0 view (a bool mask is copied once to int16, its broadcast
    dimensions left out)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the queries are on {device}")
    if not boolean and not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a bool or floating-point tensor, got {t.dtype}")
    check_no_autograd(op, t)
    try:
        view = t.expand(shape) if t.ndim <= 4 else None
    except RuntimeError:
        view = None
    if view is None:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to (B, Hq, L, S) = {tuple(shape)}")
    if not boolean:
        return view
    # Read as int16, not as its bytes: with an 8-bit tensor among the inputs of
    # the probabilities, Triton gives their product operands kWidth 4 instead
    # of 2, which regroups the keys of each tensor-core step, and a mask that
    # hides nothing would not give the unmasked kernel's bits (bench/NOTES.md,
    # "A mask that hides nothing"). Broadcast dimensions stay broadcast.
    base = view[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(view.shape, view.stride()))]
    return base.to(torch.int16).expand(shape)


def _first_visible(t, batch):
    """int32 (batch,): per sequence, the first key that some query sees
    through the mask or bias ``t`` (broadcasting to (B, Hq, Lq, Lk)); 0 where
    none is seen. A bias hides a key where the kernel's ``bias * log2(e)`` is
    -inf (a NaN bias shows it)."""
    t = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
    seen = t if t.dtype == torch.bool else t.float().mul(contract.LOG2E_F32) != float("-inf")
    seen = seen.any(dim=2)
    seen = seen.any(dim=1) if seen.shape[1] > 1 else seen[:, 0]
    first = seen.to(torch.int8).argmax(dim=-1).to(torch.int32)  # the first maximum: the first True
    return first if first.shape[0] == batch else first.expand(batch).contiguous()


def _dense(op, q, k, v, *, causal, scale, window, bottom_right, split_kv, q_lengths=None, kv_lengths=None,
           mask=None, bias=None, from_first_visible=False, with_lse=False):
    """(B, Lq, Hq, D) x (B, Lk, Hkv, D) -> (B, Lq, Hq, D); ``mask`` (bool) and
    ``bias`` (float) broadcast to (B, Hq, Lq, Lk). ``from_first_visible``:
    each sequence's keys counted from the first one its mask or bias shows
    (those before it are hidden, so they are left out). ``with_lse``: return
    ``(out, lse)``, ``lse`` each query's log2-sum-exp2 of its scaled scores,
    fp32 ``(B * Hq, Lq)`` (+inf where it sees no key), for the backward."""
    contract.check_split_kv(split_kv, op)
    contract.window_sides(causal, window, op)
    group = _check_qkv(op, q, k, v, 4, 4)
    b, lq, hq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{op}: batch sizes differ: q has {b}, k and v have {k.shape[0]}")
    lk, hkv = k.shape[1], k.shape[2]
    shape = (b, hq, lq, lk)  # checked before any early return, an empty batch too
    scores = mask if mask is not None else bias
    mask = None if mask is None else _score_mask(op, "attn_mask", mask, shape, q.device, True)
    bias = None if bias is None else _score_mask(op, "attn_mask", bias, shape, q.device, False)
    if from_first_visible and (kv_lengths is not None or causal or window is not None):
        raise ValueError(f"{op}: keys counted from the first visible one take the mask alone (no causal, "
                         "window or kv_lengths)")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty((b, lq, hq, d), dtype=q.dtype, device=q.device)
    if with_lse and (b == 0 or lq == 0 or lk == 0):
        lse = torch.full((b * hq, lq), float("inf"), dtype=torch.float32, device=q.device)
        return out.zero_(), lse
    if b == 0 or lq == 0:
        return out
    kv_lens = None
    if kv_lengths is not None:
        kv_lens = _index_tensor(op, "kv_lengths", kv_lengths, 1, q.device, b)
        if _host_sync_ok() and bool(((kv_lens < 0) | (kv_lens > lk)).any()):
            raise ValueError(f"{op}: kv_lengths must lie in [0, {lk}]")
    if q_lengths is not None:
        raise NotImplementedError(f"{op}: q_lengths is not supported here")
    if lk == 0 and kv_lens is None:
        return out.zero_()
    kv_starts = _first_visible(scores, b) if from_first_visible and scores is not None else None
    got = launch(
        q, k, v, out, q_strides=_strides(q), k_strides=_strides(k), v_strides=_strides(v), o_strides=_strides(out),
        batch=b, hkv=hkv, group=group, q_len=lq, kv_len=lk, kv_lens=kv_lens, max_q_len=lq, max_kv_len=lk,
        scale_log2=contract.qk_scale(scale, d, op), window=contract.window_sides(causal, window, op),
        bottom_right=bottom_right, split_kv=split_kv, mask=mask, bias=bias, kv_starts=kv_starts, with_lse=with_lse,
    )
    if not with_lse:
        return out
    # Tile rows (query, head of the group) of each (sequence, KV head) -> (sequence, query head) rows.
    rows = got[1][:, :lq * group].reshape(b, hkv, lq, group)
    return out, rows.permute(0, 1, 3, 2).reshape(b * hq, lq)


def _strides(t):
    """(batch, token, head) element strides of a (B, L, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, window=None,
              kv_lengths=None, split_kv: bool | None = None):
    """Batch-invariant attention over ``(batch, seq, heads, head_dim)`` tensors
    (flash-attn's ``flash_attn_func`` layout and semantics).

    Args:
        q: ``(B, Lq, Hq, D)``; k, v: ``(B, Lk, Hkv, D)``, ``Hq`` a multiple of
            ``Hkv`` (GQA, MQA). D is 64, 128 or 256; dtypes float16, bfloat16
            or float32 (fp32 products in IEEE fp32, slow).
        causal: query ``i`` sits at position ``Lk - Lq + i`` (aligned to the
            end of the keys, as in flash-attn and a KV cache) and sees keys up
            to its position.
        scale: the score scale, ``1/sqrt(D)`` by default.
        window: None, an int ``w`` (``(w, w)``) or ``(left, right)``: a query at
            position ``p`` sees keys ``p - left .. p + right`` (-1: unbounded).
        kv_lengths: optional int32 ``(B,)``: sequence b has its first
            ``kv_lengths[b]`` keys (the rest are padding), queries aligned to
            that length.
        split_kv: spread each query's keys over programs in fixed splits of
            ``bi_core.attention.SPLIT`` keys (True), walk them in one program
            (False), or choose by the grid's size (None). Same bits.

    Softmax statistics are fp32 and the output is rounded once; a query row
    that sees no key gives zeros. A row's bits depend only on that query and
    the keys and values it attends to (``bi_core.attention``).
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.attention(attention, q, k, v, causal, scale, window, kv_lengths, split_kv)
    key = _plan_key("attention", q, k, v, causal, scale, window, split_kv) if kv_lengths is None else None
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(q, k, v)
    if _grad.needed(q, k, v) and window is None:
        return _grad.attention(q, k, v, causal, scale, split_kv, kv_lengths)
    with recording() as launches:
        out = _dense("attention", q, k, v, causal=causal, scale=scale, window=window, bottom_right=True,
                     split_kv=split_kv, kv_lengths=kv_lengths)
    if key is not None:
        _PLANS.add(key, _attention_plan(launches, (q, k, v), out, transposed=False))
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False):
    """Batch-invariant ``torch.nn.functional.scaled_dot_product_attention`` for
    ``(B, H, L, E)`` tensors: ``is_causal`` masks as torch does (query ``i``
    sees keys ``0..i``, aligned at the start), ``enable_gqa`` lets ``Hq`` be a
    multiple of ``Hkv``.

    ``attn_mask`` broadcasts to ``(B, Hq, L, S)``: bool (True: the key takes
    part) or floating point (added to the scaled scores), as in torch; with
    ``is_causal`` the causal bound applies too. A query whose keys are all
    masked gives zeros; so does one whose every bias is so negative that
    ``bias * log2(e)`` overflows fp32 (``finfo(float32).min``): it counts as
    ``-inf``. A mask equal to the causal one gives ``is_causal``'s bits.

    Gradients (inputs that require grad): without ``attn_mask``, through
    ``bi_torch.attention``'s fused backward (causal: as many queries as
    keys); with a mask the call is forward-only (refused under autograd).

    Not supported (refused, never approximated): ``dropout_p > 0``, a mask
    that requires grad, and inputs that are not 4-D.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.scaled_dot_product_attention(scaled_dot_product_attention, query, key, value, attn_mask,
                                                    dropout_p, is_causal, scale, enable_gqa)
    op = "scaled_dot_product_attention"
    signature = _plan_key(op, query, key, value, is_causal, scale, enable_gqa) \
        if attn_mask is None and not dropout_p else None
    plan = _PLANS.get(signature) if signature is not None else None
    if plan is not None:
        return plan(query, key, value)
    if dropout_p:
        raise NotImplementedError(f"{op}: dropout_p={dropout_p} is not supported (inference only)")
    _check_bhle(op, query, key, value, enable_gqa)
    if _grad.needed(query, key, value) and attn_mask is None:
        # Training: the fused backward (bi_torch.attention's), whose causal
        # queries are aligned to the end of the keys: the same as torch's
        # alignment to their start where there are as many queries as keys.
        if is_causal and query.shape[2] != key.shape[2]:
            raise NotImplementedError(
                f"{op}: is_causal with {query.shape[2]} queries and {key.shape[2]} keys has no backward pass "
                "(training needs as many queries as keys, or no mask); call under torch.no_grad() for inference")
        out = _grad.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bool(is_causal),
                              scale, None)
        return out.transpose(1, 2)
    boolean = isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool
    with recording() as launches:
        out = _dense(op, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=is_causal,
                     scale=scale, window=None, bottom_right=False, split_kv=None,
                     mask=attn_mask if boolean else None, bias=None if boolean else attn_mask)
    if signature is not None:
        _PLANS.add(signature, _attention_plan(launches, (query, key, value), out, transposed=True))
    return out.transpose(1, 2)


_PLANS = _plan.Plans("attention")


def _plan_key(op, q, k, v, *options, mask=None, indices=()):
    """The signature of an attention call (None: no plan); ``mask``: a
    boolean mask, whose values a plan reads again at each call; ``indices``:
    the paged form's index tensors (read by the kernel). Options that a plan
    could not tell apart by value (a tensor scale, a list window) leave the
    call to the full path."""
    if not _plan.ENABLED or not _plan.plain(q, k, v, mask, *indices):
        return None
    for value in options:
        if value is not None and type(value) not in (bool, int, float) and not (
                type(value) is tuple and all(type(x) is int for x in value)):
            return None
    return (op, _plan.signature(q), _plan.signature(k), _plan.signature(v), _plan.signature(mask), options,
            tuple(_plan.signature(t) for t in indices), _plan.current_device())


# The attention kernel's pointer arguments: q, k, v, out, the split-KV
# workspace (acc, m, l), then cu_q, cu_k (or each sequence's first key),
# kv_len, the block table, the mask and the bias; the merge kernel's: out,
# the workspace, cu_q, cu_k and kv_len.
_ATTEND_POINTERS, _MERGE_POINTERS = 13, 7


_DENSE = {"HAS_MASK": False, "K_STARTS": False, "HAS_BIAS": False, "PAGED": False, "HAS_KV_LEN": False}


def _attention_plan(launches, given, out, *, transposed, flags=_DENSE, pointers=None):
    """A planned attention: the output (and split-KV's workspace), then the
    bound attention launch and, with split-KV, the bound merge; None unless
    the full path launched on the given q, k and v themselves, with the
    kernel ``flags`` given.

    ``pointers(stand_ins, *extra)``: the six pointer arguments after the
    workspace (cu_q, cu_k, kv_len, the block table, the mask, the bias) for
    the plan's extra arguments: tensors the caller passes, or computes again
    from them (a mask's values change between calls of one signature).
    Without it, the launch's own (stand-ins: unused)."""
    if not launches or len(launches) > 2 or launches[0].kernel is not _attn_kernel:
        return None
    first = launches[0]
    if not _plan.same_memory(*zip(given, first.args[:3])) or first.args[3].data_ptr() != out.data_ptr():
        return None
    if any(bool(first.kwargs.get(name)) != value for name, value in flags.items()):
        return None
    attend = _attn_kernel.bind(first, _ATTEND_POINTERS)
    shape, dtype, device = tuple(out.shape), out.dtype, out.device
    if pointers is None:
        def pointers(stand_ins, *extra):
            return stand_ins

    # The pointers a launch does not read get stand-ins made at each call, as
    # the full path makes them: a plan keeps no tensor of the call that made
    # it (under CUDA graph trees that call may allocate in the graph's pool,
    # which must not hold allocations it does not track).
    empty_int = _plan.allocator((1,), torch.int32, device)
    empty_out = _plan.allocator(shape, dtype, device)
    empty_one = _plan.allocator((1,), torch.float32, device)

    def stand_ins():
        return (empty_int(),) * 6

    if len(launches) == 1:
        def plan(q, k, v, *extra):
            o = empty_out()
            workspace = empty_one()  # one program per tile: no partials
            attend(q, k, v, o, workspace, workspace, workspace, *pointers(stand_ins(), *extra))
            return o.transpose(1, 2) if transposed else o
        return plan
    merge = _plan.single(launches[1:], _merge_kernel, _MERGE_POINTERS)
    if merge is None:
        return None
    acc_shape, stats_shape = tuple(first.args[4].shape), tuple(first.args[5].shape)

    empty_acc = _plan.allocator(acc_shape, torch.float32, device)
    empty_stats = _plan.allocator(stats_shape, torch.float32, device)

    def plan(q, k, v, *extra):
        o = empty_out()
        acc = empty_acc()
        m = empty_stats()
        l = empty_stats()
        rest = pointers(stand_ins(), *extra)
        attend(q, k, v, o, acc, m, l, *rest)
        merge(o, acc, m, l, *rest[:3])
        return o.transpose(1, 2) if transposed else o
    return plan


def _paged_pointers(stand_ins, cu_seqlens_q, cache_seqlens, block_table):
    """The paged kernel's index pointers: the caller's tensors (int32,
    contiguous: the full path launched on them as they are)."""
    cu_q, cu_k, _, _, mask, bias = stand_ins
    return (cu_q if cu_seqlens_q is None else cu_seqlens_q, cu_k, cache_seqlens, block_table, mask, bias)


def sdpa_from_first_visible(query, key, value, attn_mask, *, scale: float | None = None,
                            enable_gqa: bool = False):
    """``scaled_dot_product_attention(query, key, value, attn_mask)`` for a
    padded batch, with each sequence's keys counted from the first key its
    mask shows (to any query of any head): a left-padded sequence gets the
    bits it has without padding, wherever its keys sit in the buffer. The
    mask (bool or additive, required) carries every bound, causal included.
    Returns ``(B, Lq, Hq, E)``, contiguous (the layout of transformers'
    attention functions), not sdpa's ``(B, Hq, Lq, E)``."""
    op = "sdpa_from_first_visible"
    boolean = isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool
    signature = _plan_key(op, query, key, value, scale, enable_gqa, mask=attn_mask) if boolean else None
    plan = _PLANS.get(signature) if signature is not None else None
    if plan is not None:
        return plan(query, key, value, attn_mask)
    _check_bhle(op, query, key, value, enable_gqa)
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    with recording() as launches:
        out = _dense(op, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=False,
                     scale=scale, window=None, bottom_right=False, split_kv=None,
                     mask=attn_mask if boolean else None, bias=None if boolean else attn_mask,
                     from_first_visible=True)
    if signature is not None:
        b, hq, lq, _ = query.shape
        scores = (b, hq, lq, key.shape[2])

        def pointers(stand_ins, mask):  # the first keys and the int16 mask, as _dense computes them
            cu_q, _, kv_len, table, _, bias = stand_ins
            return (cu_q, _first_visible(mask, b), kv_len, table,
                    _score_mask(op, "attn_mask", mask, scores, mask.device, True), bias)
        flags = {**_DENSE, "HAS_MASK": True, "K_STARTS": True}
        _PLANS.add(signature, _attention_plan(launches, (query, key, value), out, transposed=False, flags=flags,
                                              pointers=pointers))
    return out


def _check_bhle(op, query, key, value, enable_gqa):
    """(B, H, L, E) query, key and value of sdpa's conventions."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float_tensor(name, t, op)
        if t.ndim != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, L, E), got shape {tuple(t.shape)}")
    if value.shape[-1] != query.shape[-1] or tuple(key.shape) != tuple(value.shape):
        raise ValueError(f"{op}: key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape, with "
                         f"query's head dim {query.shape[-1]} (a value head dim of its own is not supported)")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"{op}: query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True "
                         "for grouped-query attention")


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, *, causal: bool = False, scale: float | None = None,
                     window=None, split_kv: bool | None = None):
    """Batch-invariant attention over packed sequences (flash-attn's
    ``flash_attn_varlen_func``): q ``(total_q, Hq, D)``, k and v
    ``(total_k, Hkv, D)``; sequence b owns query tokens
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key tokens likewise. Causal
    queries are aligned to the end of their sequence's keys. ``max_seqlen_*``
    (host ints) avoid reading the lengths back from the device; without them
    the offsets are read (and checked) once.

    Gradients (inputs that require grad, no window): the fused backward of
    ``bi_torch.attention``, each program on its own sequence, so a
    sequence's gradients do not depend on the others packed with it.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.varlen_attention(varlen_attention, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, causal, scale, window, split_kv)
    if _grad.needed(q, k, v) and window is None:
        return _grad.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                      scale, split_kv)
    return _varlen("varlen_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   causal=causal, scale=scale, window=window, split_kv=split_kv)


def _varlen(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window,
            split_kv, with_lse=False):
    """``varlen_attention``'s checks and launch; ``with_lse``: return
    ``(out, lse, (cu_q, cu_k, max_seqlen_q, max_seqlen_k))``, ``lse`` fp32
    ``(B * Hq, max_seqlen_q)`` as ``_dense``'s, with the checked int32
    offsets and host maxima the backward takes."""
    contract.check_split_kv(split_kv, op)
    max_seqlen_q = contract.check_max_seqlen(max_seqlen_q, "max_seqlen_q", op)
    max_seqlen_k = contract.check_max_seqlen(max_seqlen_k, "max_seqlen_k", op)
    group = _check_qkv(op, q, k, v, 3, 3)
    total_q, hq, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    cu_q = _index_tensor(op, "cu_seqlens_q", cu_seqlens_q, 1, q.device)
    cu_k = _index_tensor(op, "cu_seqlens_k", cu_seqlens_k, 1, q.device)
    if cu_q.shape[0] != cu_k.shape[0] or cu_q.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    batch = cu_q.shape[0] - 1
    if max_seqlen_q is None or _host_sync_ok():
        mq = _check_cu(op, "cu_seqlens_q", cu_q, total_q)
        mk = _check_cu(op, "cu_seqlens_k", cu_k, total_k)
        if max_seqlen_q is not None and max_seqlen_q < mq or max_seqlen_k is not None and max_seqlen_k < mk:
            raise ValueError(f"{op}: max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the "
                             f"longest sequences ({mq}, {mk})")
        max_seqlen_q = mq if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = mk if max_seqlen_k is None else max_seqlen_k
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    sizes = (cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k or 0))
    if batch == 0 or total_q == 0 or (with_lse and total_k == 0):
        if not with_lse:
            return out
        lse = torch.full((batch * hq, sizes[2]), float("inf"), dtype=torch.float32, device=q.device)
        return out.zero_(), lse, sizes
    got = launch(
        q, k, v, out, q_strides=(0, q.stride(0), q.stride(1)), k_strides=(0, k.stride(0), k.stride(1)),
        v_strides=(0, v.stride(0), v.stride(1)), o_strides=(0, out.stride(0), out.stride(1)),
        batch=batch, hkv=hkv, group=group, q_len=0, kv_len=0, cu_q=cu_q, cu_k=cu_k,
        max_q_len=int(max_seqlen_q), max_kv_len=max(int(max_seqlen_k or 0), 1),
        scale_log2=contract.qk_scale(scale, d, op), window=contract.window_sides(causal, window, op),
        bottom_right=True, split_kv=split_kv, with_lse=with_lse,
    )
    if not with_lse:
        return got
    mq = sizes[2]
    rows = got[1][:, :mq * group].reshape(batch, hkv, mq, group)
    return out, rows.permute(0, 1, 3, 2).reshape(batch * hq, mq), sizes


def _paged_checks(op, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new,
                  split_kv, validate):
    """``paged_attention``'s checks of its arguments (with ``validate``, of
    the lengths and the block table on the host: one device read). Returns
    ``(packed, group, d, hkv, num_pages, page_size, batch, cu_q, bt, lens,
    total_q, max_seqlen_q, max_kv)``."""
    contract.check_split_kv(split_kv, op)
    max_seqlen_q = contract.check_max_seqlen(max_seqlen_q, "max_seqlen_q", op)
    packed = q.ndim == 3 if isinstance(q, torch.Tensor) else False
    group = _check_qkv(op, q, k_cache, v_cache, 3 if packed else 4, 4, ("q", "k_cache", "v_cache"))
    d = q.shape[-1]
    num_pages, page_size, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dimension (it is written in place)")
    if page_size < 1:
        raise ValueError(f"{op}: the cache's page size must be positive, got {page_size}")
    if packed:
        if cu_seqlens_q is None:
            raise ValueError(f"{op}: a 3-D q (total_q, Hq, D) needs cu_seqlens_q; pass q as (B, Lq, Hq, D) otherwise")
        cu_q = _index_tensor(op, "cu_seqlens_q", cu_seqlens_q, 1, q.device)
        batch = cu_q.shape[0] - 1
        if batch < 0:
            raise ValueError(f"{op}: cu_seqlens_q must have batch + 1 entries")
    else:
        if cu_seqlens_q is not None:
            raise ValueError(f"{op}: cu_seqlens_q is for a packed 3-D q; q has shape {tuple(q.shape)}")
        cu_q = None
        batch = q.shape[0]
    bt = _index_tensor(op, "block_table", block_table, 2, q.device, batch)
    lens = _index_tensor(op, "cache_seqlens", cache_seqlens, 1, q.device, batch)
    total_q = q.shape[0] if packed else batch * q.shape[1]
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: pass both k_new and v_new, or neither")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_float_tensor(name, t, op)
            want = q.shape[:-2] + (hkv, d)
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"{op}: {name} must have shape {tuple(want)} (q's layout with the cache's "
                                 f"{hkv} heads), got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{op}: {name} must match q's dtype and device ({q.dtype}, {q.device})")
    if validate:
        if not _host_sync_ok():
            raise RuntimeError(f"{op}: validate=True reads the lengths on the host, which a CUDA graph capture "
                               "forbids; pass validate=False (and max_seqlen_q for a packed q)")
        if packed:
            max_seqlen_q = _check_cu(op, "cu_seqlens_q", cu_q, total_q)
        q_lens = (cu_q[1:] - cu_q[:-1]) if packed else torch.full_like(lens, q.shape[1])
        kv_lens_now = lens + q_lens if k_new is not None else lens
        capacity = bt.shape[1] * page_size
        used = torch.arange(bt.shape[1], device=q.device)[None, :] < ((kv_lens_now + page_size - 1) // page_size)[:, None]
        bad = used & ((bt < 0) | (bt >= num_pages))
        # One host read for every check (each .any() would be a sync of its own).
        flags = torch.stack([((lens < 0) | (kv_lens_now > capacity)).any(), (kv_lens_now < q_lens).any(), bad.any(),
                             kv_lens_now.max() if batch else torch.zeros((), dtype=lens.dtype, device=q.device)])
        out_of_range, too_few, bad_page, max_kv = (int(x) for x in flags.tolist())
        if out_of_range:
            raise ValueError(f"{op}: cache lengths must lie in [0, {capacity}] (block table width x page size), "
                             f"new keys included; got {kv_lens_now.tolist() if batch <= 16 else 'more'}")
        if too_few:
            raise ValueError(f"{op}: every sequence needs at least as many keys as new queries "
                             "(cache_seqlens counts the queries' own keys when k_new is not given)")
        if bad_page:
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: block_table[{row}, {col}] = {int(bt[row, col])} is not a page of the cache "
                             f"(0..{num_pages - 1})")
    else:
        if packed and max_seqlen_q is None:
            raise ValueError(f"{op}: validate=False with a packed q needs max_seqlen_q")
        max_kv = bt.shape[1] * page_size
    return packed, group, d, hkv, num_pages, page_size, batch, cu_q, bt, lens, total_q, max_seqlen_q, max_kv


def paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, *, cu_seqlens_q=None,
                    max_seqlen_q: int | None = None, k_new=None, v_new=None, causal: bool = True,
                    scale: float | None = None, window=None, split_kv: bool | None = None,
                    validate: bool = True):
    """Batch-invariant attention of new queries against a paged KV cache
    (flash-attn's ``flash_attn_with_kvcache``): decode, chunked prefill and
    speculative verification, mixed in one launch.

    Args:
        q: ``(B, Lq, Hq, D)``, or ``(total_q, Hq, D)`` packed with
            ``cu_seqlens_q`` (``B + 1`` int32 offsets) for a different number
            of new queries per sequence.
        k_cache, v_cache: ``(num_pages, page_size, Hkv, D)``; any page size.
        block_table: int32 ``(B, pages_per_seq)``: the pages of sequence b, in
            key order (any page order in the cache).
        cache_seqlens: int32 ``(B,)``: keys already in the cache.
        k_new, v_new: optional, laid out as q with Hkv heads: the new queries'
            keys and values, written into the cache (in place) at positions
            ``cache_seqlens[b] ..`` before attending. Without them the cache
            must already hold the queries' keys (``cache_seqlens`` counts them).
        causal: the new queries are the last positions of their sequence and
            see keys up to their own (default True).
        validate: check the lengths and the block table's used entries on the
            host (one device read); must be False during CUDA graph capture.
            Without it, an entry past the cache reads (and ``k_new`` writes)
            outside it, and pages listed twice are overwritten by each other.

    Returns the output, laid out as q.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.paged_attention(paged_attention, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q,
                                       max_seqlen_q, k_new, v_new, causal, scale, window, split_kv, validate)
    op = "paged_attention"
    signature = None
    if not validate and k_new is None and v_new is None and isinstance(q, torch.Tensor):
        # Without checks or cache writes, a call is a function of its signature:
        # the kernel reads the lengths and the block table on the device.
        signature = _plan_key(op, q, k_cache, v_cache, causal, scale, window, split_kv, max_seqlen_q,
                              indices=(block_table, cache_seqlens, cu_seqlens_q))
        plan = _PLANS.get(signature) if signature is not None else None
        if plan is not None:
            return plan(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table)
    (packed, group, d, hkv, num_pages, page_size, batch, cu_q, bt, lens, total_q, max_seqlen_q,
     max_kv) = _paged_checks(op, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new,
                             v_new, split_kv, validate)
    if packed:
        max_q = int(max_seqlen_q)
    else:
        max_q = q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0 or batch == 0:
        return out
    q = _last_dim_contiguous(q)
    if k_new is not None:
        _write_cache(k_cache, v_cache, bt, lens, k_new, v_new, cu_q, page_size, batch, total_q)
        kv_lens = lens + ((cu_q[1:] - cu_q[:-1]) if packed else q.shape[1])
    else:
        kv_lens = lens
    kv_lens = kv_lens.to(torch.int32).contiguous()
    if packed:
        q_strides, o_strides = (0, q.stride(0), q.stride(1)), (0, out.stride(0), out.stride(1))
    else:
        q_strides, o_strides = _strides(q), _strides(out)
    with recording() as launches:
        launch(
            q, k_cache, v_cache, out, q_strides=q_strides, k_strides=_strides(k_cache), v_strides=_strides(v_cache),
            o_strides=o_strides, batch=batch, hkv=hkv, group=group, q_len=max_q, kv_len=0, cu_q=cu_q,
            kv_lens=kv_lens, block_table=bt, page_size=page_size, max_q_len=max_q, max_kv_len=max(max_kv, 1),
            scale_log2=contract.qk_scale(scale, d, op), window=contract.window_sides(causal, window, op),
            bottom_right=True, split_kv=split_kv,
        )
    if signature is not None and launches and _plan.same_memory(
            (cu_seqlens_q, cu_q), (cache_seqlens, kv_lens), (block_table, bt)):
        _PLANS.add(signature, _attention_plan(launches, (q, k_cache, v_cache), out, transposed=False,
                                              flags={**_DENSE, "PAGED": True, "HAS_KV_LEN": True},
                                              pointers=_paged_pointers))
    return out


def _write_cache(k_cache, v_cache, bt, lens, k_new, v_new, cu_q, page_size, batch, total_q):
    """Scatter the new keys and values to their pages (a copy: no arithmetic)."""
    page, slot = _new_slots(bt, lens, cu_q, page_size, batch, total_q, None if cu_q is not None else k_new.shape[1])
    k_cache[page, slot] = k_new.reshape(total_q, *k_new.shape[-2:])
    v_cache[page, slot] = v_new.reshape(total_q, *v_new.shape[-2:])


def _new_slots(bt, lens, cu_q, page_size, batch, total_q, lq):
    """The page and the slot of each new token (int64, ``(total_q,)``), past
    the ``lens`` keys of its sequence in the cache: ``lq`` per sequence, or
    packed by ``cu_q``."""
    dev = bt.device
    if cu_q is None:
        seq = torch.arange(batch, device=dev).repeat_interleave(lq)
        idx = torch.arange(lq, device=dev).repeat(batch)
    else:
        counts = (cu_q[1:] - cu_q[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(batch, device=dev), counts, output_size=total_q)
        idx = torch.arange(total_q, device=dev) - cu_q[:-1].long()[seq]
    pos = lens.long()[seq] + idx
    return bt.long()[seq, pos // page_size], pos % page_size


def paged_append_slots(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, *, cu_seqlens_q=None,
                       max_seqlen_q: int | None = None, validate: bool = True):
    """Where :func:`paged_attention` with ``k_new``/``v_new`` writes the new
    keys and values, after the same checks: each new token's page and slot
    (int64, ``(total_q,)``) and each sequence's key count with them (int32,
    ``(B,)``). ``paged_attention`` with those lengths and no ``k_new``, once
    ``k_cache[page, slot] = k_new`` (and the values) are written, is the
    appending call (``bi_torch.direct`` compiles it that way)."""
    op = "paged_attention"
    if k_new is None or v_new is None:
        raise ValueError(f"{op}: pass both k_new and v_new, or neither")
    packed, _, _, _, _, page_size, batch, cu_q, bt, lens, total_q, _, _ = _paged_checks(
        op, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new, None, validate)
    page, slot = _new_slots(bt, lens, cu_q, page_size, batch, total_q, None if packed else q.shape[1])
    q_lens = (cu_q[1:] - cu_q[:-1]) if packed else q.shape[1]
    return page, slot, (lens + q_lens).to(torch.int32)

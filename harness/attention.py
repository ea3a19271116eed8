"""Schedule properties of attention, for every framework: a query row's bits
must not depend on how the serving loop computes it.

Each ``check_*`` builds one set of sequences (numpy), runs two schedules
through a framework's bi_ functions (``Runner``) and compares the rows bit
for bit, raising ``harness.properties.BatchVarianceError`` with the first
differing row. Schedules: one causal prefill; chunked prefill with random
chunk boundaries; token-by-token decode against a paged cache (random page
size, pages in random order, other sequences in the batch); sequences packed
at random positions of a variable-length batch; split-KV on and off; each
tile config the dispatch may pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.bits import differing_rows, np_dtype, ulp_distance
from harness.properties import BatchVarianceError


@dataclass(frozen=True)
class Heads:
    hq: int
    hkv: int
    d: int


class Runner:
    """A framework's bi_ attention functions on numpy in, numpy out."""

    def __init__(self, framework: str):
        self.framework = framework
        if framework == "torch":
            import torch

            import bi_torch

            from harness.frameworks import adapter

            self._ad = adapter("torch")
            self._t, self._bi = torch, bi_torch
        else:
            import jax.numpy as jnp

            import bi_jax

            self._jnp, self._bi = jnp, bi_jax

    def _in(self, a):
        if self.framework == "torch":
            if a.dtype.kind in "iu":
                return self._t.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(self._ad.device)
            return self._ad.to_native(a)
        return self._jnp.asarray(a)

    def _out(self, t):
        if self.framework == "torch":
            return self._ad.to_numpy(t)
        return np.asarray(t)

    def prefill(self, q, k, v, causal=True, window=None, split_kv=None, config=None):
        """(B, Lq, H, D) queries aligned to the end of (B, Lk, Hkv, D) keys;
        ``config``: a tile config of ``bi_core.attention.tile_configs``
        instead of the dispatch's choice (through the kernels' launcher)."""
        if config is not None:
            return self._launch(q, k, v, causal, window, split_kv, config)
        return self._out(self._bi.attention(self._in(q), self._in(k), self._in(v), causal=causal, window=window,
                                            split_kv=split_kv))

    def _launch(self, q, k, v, causal, window, split_kv, config):
        from bi_core import attention as contract

        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        args = dict(batch=b, hkv=hkv, group=hq // hkv, q_len=lq, kv_len=lk, max_q_len=lq, max_kv_len=lk,
                    window=contract.window_sides(causal, window), bottom_right=True, split_kv=split_kv, config=config)
        tq, tk, tv = self._in(q), self._in(k), self._in(v)
        if self.framework == "torch":
            from bi_torch.ops import attention as ops

            out = self._t.empty_like(tq)
            ops.launch(tq, tk, tv, out, q_strides=ops._strides(tq), k_strides=ops._strides(tk),
                       v_strides=ops._strides(tv), o_strides=ops._strides(out), scale_log2=contract.qk_scale(None, d),
                       **args)
            return self._out(out)
        from bi_jax.ops import attention as ops

        qs, ks = ops._row_major_strides(q.shape), ops._row_major_strides(k.shape)
        return self._out(ops.launch(tq, tk, tv, q_strides=qs[:3], k_strides=ks[:3], v_strides=ks[:3],
                                    qk_scale=contract.qk_scale(None, d), **args))

    def masked(self, q, k, v, mask=None, bias=None, causal=False):
        """The drop-in signature (torch's SDPA, ``jax.nn.dot_product_attention``)
        with a boolean ``mask`` or an additive ``bias`` broadcasting to
        (B, Hq, Lq, Lk); (B, L, H, D) in and out."""
        if self.framework == "torch":
            t = [self._in(x).transpose(1, 2) for x in (q, k, v)]
            extra = mask if mask is not None else bias
            if extra is not None:
                extra = self._t.from_numpy(np.ascontiguousarray(extra)).to(self._ad.device)
            out = self._bi.scaled_dot_product_attention(*t, attn_mask=extra, is_causal=causal,
                                                        enable_gqa=q.shape[2] != k.shape[2])
            return self._out(out.transpose(1, 2))
        return self._out(self._bi.dot_product_attention(
            self._in(q), self._in(k), self._in(v), mask=None if mask is None else self._in(mask),
            bias=None if bias is None else self._in(bias), is_causal=causal))

    def varlen(self, q, k, v, cu_q, cu_k, causal=True, window=None):
        mq, mk = int(np.diff(cu_q).max()), int(np.diff(cu_k).max())
        return self._out(self._bi.varlen_attention(self._in(q), self._in(k), self._in(v), self._in(cu_q),
                                                   self._in(cu_k), mq, mk, causal=causal, window=window))

    def paged(self, q, k_cache, v_cache, block_table, cache_lens, cu_q, k_new, v_new, window=None, split_kv=None):
        """Packed new queries; their keys written into the cache first. Returns
        (out, k_cache, v_cache) in numpy."""
        kc, vc = self._in(k_cache), self._in(v_cache)
        args = dict(cu_seqlens_q=self._in(cu_q), max_seqlen_q=int(np.diff(cu_q).max()), k_new=self._in(k_new),
                    v_new=self._in(v_new), window=window, split_kv=split_kv)
        res = self._bi.paged_attention(self._in(q), kc, vc, self._in(block_table), self._in(cache_lens), **args)
        if self.framework == "torch":
            return self._out(res), self._out(kc), self._out(vc)
        return tuple(self._out(r) for r in res)


class SplitByCallControl:
    """A negative control with ``Runner``'s interface: fp32 attention whose
    keys are split into a number of chunks that follows the call (the number
    of queries in it, and ``split_kv``), their partials merged in turn: what a
    kernel whose split-KV heuristic looks at the launch does. The schedule
    properties must catch it."""

    framework = "numpy"

    def __init__(self, split_size: int | None = None):
        # With a split size, the splits sit at fixed key positions whatever
        # the call: the invariant design, which the properties must pass.
        self.split_size = split_size

    def _one(self, q, k, v, window, splits, causal=True, mask=None, bias=None):
        """One sequence: q (Lq, Hq, D) at the end of k, v (Lk, Hkv, D); keys
        in ``splits`` chunks, or (``size``) in chunks of ``size`` keys;
        ``mask`` and ``bias`` (Hq or 1, Lq, Lk)."""
        from bi_core.attention import window_sides

        lq, hq, d = q.shape
        lk, hkv = k.shape[0], k.shape[1]
        left, right = window_sides(causal, window)
        g = hq // hkv
        qf = q.astype(np.float32).reshape(lq, hkv, g, d)
        pos = np.arange(lq) + lk - lq
        kpos = np.arange(lk)
        seen = (kpos[None, :] >= pos[:, None] - left) & (kpos[None, :] <= pos[:, None] + right)
        # (hkv, g, lq, lk): the scores' layout below.
        seen = np.broadcast_to(seen, (hkv, g, lq, lk))
        if mask is not None:
            seen = seen & np.broadcast_to(mask, (hq, lq, lk)).reshape(hkv, g, lq, lk)
        add = 0 if bias is None else np.broadcast_to(bias, (hq, lq, lk)).reshape(hkv, g, lq, lk).astype(np.float32)
        kf, vf = k.astype(np.float32), v.astype(np.float32)
        num = den = top = None
        keys = np.arange(lk)
        size = self.split_size
        parts = (np.split(keys, np.arange(size, lk, size)) if size else
                 np.array_split(keys, min(splits, max(lk, 1))))
        for part in parts:
            # Every sum one term at a time, in index order: the bits of a row
            # depend on the split alone, not on numpy's blocking of a shape.
            s = np.zeros((hkv, g, lq, len(part)), np.float32)
            for j in range(d):
                s += qf[:, :, :, j].transpose(1, 2, 0)[:, :, :, None] * kf[part, :, j].T[:, None, None, :]
            s = np.where(seen[..., part], s * np.float32(d**-0.5) + (add[..., part] if bias is not None else 0),
                         -np.inf).astype(np.float32)
            m = np.maximum(s.max(axis=-1, keepdims=True), np.float32(-1e30))
            p = np.exp(s - m)
            acc = np.zeros((hkv, g, lq, d), np.float32)
            total = np.zeros((hkv, g, lq, 1), np.float32)
            for j, key in enumerate(part):
                acc += p[:, :, :, j : j + 1] * vf[key][:, None, None, :]
                total += p[:, :, :, j : j + 1]
            if top is None:
                top, den, num = m, total, acc
            else:
                c = np.exp(m - top)
                den, num = den + total * c, num + acc * c
        out = np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)
        return out.transpose(2, 0, 1, 3).reshape(lq, hq, d).astype(q.dtype)

    def prefill(self, q, k, v, causal=True, window=None, split_kv=None, config=None):
        splits = 1 + q.shape[0] * q.shape[1] % 3 + (1 if split_kv else 0) + (config.block_m // 16 if config else 0)
        return np.stack([self._one(q[b], k[b], v[b], window, splits) for b in range(q.shape[0])])

    def masked(self, q, k, v, mask=None, bias=None, causal=False):
        # Top-left alignment: the same as bottom-right for Lq == Lk (the checks' shapes).
        splits = 1 + q.shape[0] % 3
        pick = (lambda a, b: None if a is None else a[b % a.shape[0]])
        return np.stack([self._one(q[b], k[b], v[b], None, splits, causal, pick(mask, b), pick(bias, b))
                         for b in range(q.shape[0])])

    def varlen(self, q, k, v, cu_q, cu_k, causal=True, window=None):
        splits = 1 + q.shape[0] % 3
        return np.concatenate([self._one(q[a:b], k[c:e], v[c:e], window, splits)
                               for a, b, c, e in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])])

    def paged(self, q, k_cache, v_cache, block_table, cache_lens, cu_q, k_new, v_new, window=None, split_kv=None):
        k_cache, v_cache = k_cache.copy(), v_cache.copy()
        page = k_cache.shape[1]
        outs = []
        for i, (a, b) in enumerate(zip(cu_q, cu_q[1:])):
            pos = cache_lens[i] + np.arange(b - a)
            k_cache[block_table[i, pos // page], pos % page] = k_new[a:b]
            v_cache[block_table[i, pos // page], pos % page] = v_new[a:b]
            n = cache_lens[i] + b - a
            keys = np.arange(n)
            kk = k_cache[block_table[i, keys // page], keys % page]
            vv = v_cache[block_table[i, keys // page], keys % page]
            outs.append(self._one(q[a:b], kk, vv, window, 1 + q.shape[0] % 3))
        return np.concatenate(outs), k_cache, v_cache


def random_sequence(rng, n: int, heads: Heads, dtype: str):
    dt = np_dtype(dtype)
    return tuple(rng.standard_normal((n, h, heads.d), dtype=np.float32).astype(dt)
                 for h in (heads.hq, heads.hkv, heads.hkv))


def _compare(a, b, label: str, what: str):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise BatchVarianceError(f"{label}: {what}: shapes {a.shape} and {b.shape}")
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    bad = differing_rows(flat_a, flat_b)
    if bad.size:
        ulps = ulp_distance(flat_a[bad], flat_b[bad])
        raise BatchVarianceError(f"{label}: {what}: {bad.size} of {a.shape[0]} query rows differ (first: "
                                 f"position {int(bad[0])}); max ULP distance {int(ulps.max())} in {a.dtype}")


def check_mask_hiding_nothing(runner: Runner, rng, n: int, batch: int, heads: Heads, dtype: str, label: str,
                              slots: int):
    """A mask that hides no key the call would otherwise see changes no bit:
    a query over ``n`` keys with no mask == with an all-true mask == over a
    buffer of ``slots >= n`` keys whose slots past ``n`` hold other values and
    are masked out (a static or preallocated KV cache). Checked for one query
    (decode) and for ``n`` queries, causal by the mask against ``is_causal``."""
    q, k, v = (np.stack(x) for x in zip(*(random_sequence(rng, slots, heads, dtype) for _ in range(batch))))
    keys = slice(0, n)
    for what, queries in (("one query", slice(n - 1, n)), (f"{n} queries", slice(0, n))):
        lq = queries.stop - queries.start
        plain = runner.masked(q[:, queries], k[:, keys], v[:, keys], causal=lq > 1)
        visible = np.ones((1, 1, lq, n), bool) if lq == 1 else np.tril(np.ones((lq, n), bool))[None, None]
        _compare(runner.masked(q[:, queries], k[:, keys], v[:, keys], mask=visible), plain, label,
                 f"{what} over {n} keys: a mask of the visible keys vs {'is_causal' if lq > 1 else 'no mask'}")
        padded = np.zeros((1, 1, lq, slots), bool)
        padded[..., :n] = visible
        _compare(runner.masked(q[:, queries], k, v, mask=padded), plain, label,
                 f"{what} over {n} keys: {slots} slots, those past {n} masked out, vs the {n} keys alone")


def check_chunked_and_decode(runner: Runner, rng, n: int, heads: Heads, dtype: str, label: str, window=None,
                             others: int = 3, max_page: int = 40, max_steps: int | None = None):
    """One causal prefill of a sequence of ``n`` tokens == the same sequence
    in chunks of random sizes (each against the keys so far) == decoded
    token by token against a paged cache (random page size and page order,
    ``others`` unrelated sequences of random lengths in the same batch, the
    probe at a random slot). ``max_steps``: at most that many single-token
    steps per sequence after its first chunk (long sequences)."""
    q, k, v = random_sequence(rng, n, heads, dtype)
    full = runner.prefill(q[None], k[None], v[None], window=window)[0]
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(1, 5))), replace=False)) if n > 1 else []
    bounds = [0, *map(int, cuts), n]
    chunks = [runner.prefill(q[None, a:b], k[None, :b], v[None, :b], window=window)[0]
              for a, b in zip(bounds, bounds[1:])]
    _compare(np.concatenate(chunks), full, label, f"chunked prefill (chunks at {bounds}) vs one prefill")

    # Decode: every step appends one token per sequence; the others have
    # random lengths; pages of one random size, handed out in random order.
    page = int(rng.integers(1, max_page + 1))
    lens = [int(rng.integers(1, n + 1)) for _ in range(others)]
    slot = int(rng.integers(0, others + 1))
    lens.insert(slot, n)
    seqs = [(q, k, v) if i == slot else random_sequence(rng, m, heads, dtype) for i, m in enumerate(lens)]
    pages_per = [-(-m // page) for m in lens]
    total = sum(pages_per) + 2
    order = rng.permutation(total)
    table = np.zeros((len(lens), max(pages_per)), np.int32)
    nxt = 0
    for i, p in enumerate(pages_per):
        table[i, :p] = order[nxt : nxt + p]
        nxt += p
    dt = np_dtype(dtype)
    k_cache = np.zeros((total, page, heads.hkv, heads.d), dt)
    v_cache = np.zeros_like(k_cache)
    # A first chunk of random size per sequence (chunked prefill into the
    # cache), then one token per step; sequences finish at their lengths.
    low = [0 if max_steps is None else max(0, m - max_steps) for m in lens]
    first = [max(1, int(rng.integers(lo, m))) for lo, m in zip(low, lens)]
    done = [0] * len(lens)
    out = np.zeros_like(full)
    while any(d < m for d, m in zip(done, lens)):
        live = [i for i in range(len(lens)) if done[i] < lens[i]]
        sizes = [min(first[i] if done[i] == 0 else 1, lens[i] - done[i]) for i in live]
        pos = [done[i] for i in live]
        cu = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        new = [np.concatenate([seqs[i][j][p : p + s] for i, p, s in zip(live, pos, sizes)]) for j in range(3)]
        res, k_cache, v_cache = runner.paged(new[0], k_cache, v_cache, table[live], np.array(pos, np.int32), cu,
                                             new[1], new[2], window=window)
        for j, (i, p, s) in enumerate(zip(live, pos, sizes)):
            if i == slot:
                out[p : p + s] = res[cu[j] : cu[j] + s]
            done[i] = p + s
    _compare(out, full, label, f"paged decode (page size {page}, {others} other sequences, probe at slot {slot}) "
                               "vs one prefill")


def check_packed_position(runner: Runner, rng, n: int, heads: Heads, dtype: str, label: str, window=None):
    """A sequence alone == the same sequence at a random slot of a packed
    variable-length batch of random lengths."""
    q, k, v = random_sequence(rng, n, heads, dtype)
    alone = runner.prefill(q[None], k[None], v[None], window=window)[0]
    lens = [int(rng.integers(1, 2 * n + 1)) for _ in range(int(rng.integers(1, 5)))]
    slot = int(rng.integers(0, len(lens) + 1))
    lens.insert(slot, n)
    seqs = [(q, k, v) if i == slot else random_sequence(rng, m, heads, dtype) for i, m in enumerate(lens)]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    packed = runner.varlen(*(np.concatenate([s[j] for s in seqs]) for j in range(3)), cu, cu, window=window)
    _compare(packed[cu[slot] : cu[slot + 1]], alone, label, f"slot {slot} of a packed batch of lengths {lens} vs alone")


def check_split_kv(runner: Runner, rng, n: int, batch: int, heads: Heads, dtype: str, label: str, window=None):
    """Split-KV spread over programs == walked in one program (prefill and decode)."""
    q, k, v = (np.stack(x) for x in zip(*(random_sequence(rng, n, heads, dtype) for _ in range(batch))))
    for lq in (n, 1):
        on = runner.prefill(q[:, -lq:], k, v, window=window, split_kv=True)
        off = runner.prefill(q[:, -lq:], k, v, window=window, split_kv=False)
        _compare(on.reshape(-1, *on.shape[2:]), off.reshape(-1, *off.shape[2:]), label,
                 f"split-KV on vs off ({lq} queries against {n} keys)")


def check_tile_configs(runner: Runner, rng, n: int, batch: int, heads: Heads, dtype: str, label: str, window=None):
    """Every tile config the dispatch may pick for the head dim and dtype,
    with or without a mask or bias, gives the bits of the first (prefill and
    decode, split-KV off)."""
    from bi_core.attention import tile_configs

    itemsize = np_dtype(dtype).itemsize
    configs = tuple(dict.fromkeys(c for b in (0, 1, 4, 5) for c in tile_configs(heads.d, itemsize, b)))
    q, k, v = (np.stack(x) for x in zip(*(random_sequence(rng, n, heads, dtype) for _ in range(batch))))
    for lq in (n, 1):
        ref = runner.prefill(q[:, -lq:], k, v, window=window, split_kv=False, config=configs[0])
        for cfg in configs[1:]:
            out = runner.prefill(q[:, -lq:], k, v, window=window, split_kv=False, config=cfg)
            _compare(out.reshape(-1, *out.shape[2:]), ref.reshape(-1, *ref.shape[2:]), label,
                     f"tile {cfg} vs {configs[0]} ({lq} queries against {n} keys)")


def check_masks(runner: Runner, rng, n: int, batch: int, heads: Heads, dtype: str, label: str):
    """With a boolean mask or an additive bias of its own per sequence (the
    drop-in signatures), each sequence of a batch == the same sequence alone;
    and a boolean mask equal to the causal one == ``is_causal``."""
    q, k, v = (np.stack(x) for x in zip(*(random_sequence(rng, n, heads, dtype) for _ in range(batch))))
    mask = rng.random((batch, heads.hq, n, n)) < 0.7
    bias = rng.standard_normal((batch, 1, n, n), dtype=np.float32)
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    for kind, extra in (("mask", mask), ("bias", bias)):
        full = runner.masked(q, k, v, **{kind: extra})
        for b in range(batch):
            alone = runner.masked(q[b : b + 1], k[b : b + 1], v[b : b + 1], **{kind: extra[b : b + 1]})
            _compare(full[b], alone[0], label, f"sequence {b} of {batch} with a {kind} of its own vs alone")
    tril = np.tril(np.ones((n, n), bool))[None, None]
    _compare(runner.masked(q, k, v, mask=tril).reshape(-1, heads.hq, heads.d),
             runner.masked(q, k, v, causal=True).reshape(-1, heads.hq, heads.d), label,
             "a boolean mask equal to the causal one vs is_causal")

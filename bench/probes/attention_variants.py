"""What the attention forward's contract costs in speed (GPU)::

    python -m bench.probes.attention_variants [--out DIR] [--shapes 1x4096,64x1024]

A stand-alone causal prefill kernel (bf16, head dim 128, 32 query / 8 KV
heads, 128-row tiles of 8 warps, 128-key blocks, the blocks every row sees
whole without the causal select) whose arithmetic is switched piece by piece
from the contract's (``bi_core.attention``) toward the usual flash-attention
form, each piece a constexpr:

* ``acc_in_dot``: ``acc = dot(p, v, acc * alpha)`` instead of the contract's
  product from zero followed by ``acc * alpha + pv`` (other bits);
* ``one_acc``: no split-level fold (one running state for the whole row, no
  second fp32 accumulator; other bits);
* ``sum``: the row sum as ``tl.sum`` instead of the product with a block of
  ones (bits that follow the register layout);
* ``plain``: the exponentials, products and sums as Triton ops instead of the
  contract's PTX (bits that follow the compiler);
* ``block_fold``: every block its own split (its partial from its own
  maximum, folded in block order): one fp32 accumulator and the same
  split-KV property as the contract, with 128-key splits (other bits);
* ``per_head``: a tile of 128 queries of one head instead of 32 queries of
  the 4 heads of a GQA group.

Each variant is timed with ``triton.testing.do_bench_cudagraph`` beside
``bi_torch.attention`` (its dense causal specialisation), the library kernel's
general path on the same inputs (``bi_torch general``) and SDPA
(``enable_gqa``), and checked against SDPA's output (largest difference) and,
for the contract's form and the general path, against ``bi_torch.attention``'s
bits. ``--jax``: also ``bi_jax.attention``, its general path, its dense causal
specialisation and ``jax.nn.dot_product_attention`` (cuDNN), timed by
``bench.timing.time_jax``,
with their bits against ``bi_torch.attention``'s. One JSON line per point.
Only speed is the question here: no variant is a kernel of the library.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
import triton.language as tl

import bi_torch
from bi_core import attention as contract
from bench.probes._log import jsonl_emitter
from bi_torch._checks import interpreting
from bi_torch.ops.attention import _add, _exp2_diff, _exp2_fma, _finish, _fma, _fold, _mul

H, HKV, D = 32, 8, 128
BLOCK_M, BLOCK_N, WARPS, STAGES = 128, 128, 8, 2


@triton.jit
def _variant_block(q, K, V, m, l, acc, blk, b, hkv, qi, seq, qk_scale, d, cols, ones,
                   HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   ACC_IN_DOT: tl.constexpr, SUM: tl.constexpr, PTX: tl.constexpr, BLOCK_FOLD: tl.constexpr):
    kpos = blk * BLOCK_N + cols
    off = ((b.to(tl.int64) * seq + kpos) * HKV + hkv) * D
    k = tl.load(K + off[:, None] + d[None, :])
    v = tl.load(V + off[:, None] + d[None, :])
    qk = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    if MASKED:
        qk = tl.where(kpos[None, :] <= qi[:, None], qk, float("-inf"))
    if BLOCK_FOLD:
        # Each block its own split: its partial from its own maximum, folded in.
        m_b = _mul(tl.max(qk, 1), qk_scale, PTX)
        p = _exp2_fma(qk, qk_scale, -tl.where(m_b == float("-inf"), 0.0, m_b)[:, None], PTX).to(v.dtype)
        l_b = tl.max(tl.dot(p, ones, out_dtype=tl.float32), 1)
        return _fold(m, l, acc, m_b, l_b, tl.dot(p, v, out_dtype=tl.float32), PTX)
    new_m = tl.maximum(m, _mul(tl.max(qk, 1), qk_scale, PTX))
    base = tl.where(new_m == float("-inf"), 0.0, new_m)
    p = _exp2_fma(qk, qk_scale, -base[:, None], PTX).to(v.dtype)
    alpha = _exp2_diff(m, base, PTX)
    if SUM:
        row_sum = tl.sum(p.to(tl.float32), 1)
    else:
        row_sum = tl.max(tl.dot(p, ones, out_dtype=tl.float32), 1)
    l = _fma(l, alpha, row_sum, PTX)
    if ACC_IN_DOT:
        acc = tl.dot(p, v, _mul(acc, tl.broadcast_to(alpha[:, None], acc.shape), PTX), out_dtype=tl.float32)
    else:
        acc = _add(_mul(acc, tl.broadcast_to(alpha[:, None], acc.shape), PTX), tl.dot(p, v, out_dtype=tl.float32),
                   PTX)
    return new_m, l, acc


@triton.jit
def _variant_kernel(Q, K, V, O, seq, qk_scale,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BPS: tl.constexpr, PER_HEAD: tl.constexpr, ACC_IN_DOT: tl.constexpr,
                    ONE_ACC: tl.constexpr, SUM: tl.constexpr, PTX: tl.constexpr, BLOCK_FOLD: tl.constexpr):
    G: tl.constexpr = H // HKV
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest tiles first
    r = tl.arange(0, BLOCK_M)
    if PER_HEAD:
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H + r * 0
        hkv = tl.program_id(1) % H // G
        qi = tile * BLOCK_M + r
    else:
        b = tl.program_id(1) // HKV
        hkv = tl.program_id(1) % HKV
        qi = tile * (BLOCK_M // G) + r // G
        h = hkv * G + r % G
    d = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    q = tl.load(Q + ((b.to(tl.int64) * seq + qi) * H + h)[:, None] * D + d[None, :])
    ones = tl.full([BLOCK_N, 16], 1.0, tl.float32).to(q.dtype)
    free = (tl.min(qi, 0) + 1) // BLOCK_N  # blocks [0, free) every row sees whole
    last = tl.max(qi, 0) // BLOCK_N
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    big_l = tl.zeros([BLOCK_M], tl.float32)
    big_acc = tl.zeros([BLOCK_M, D], tl.float32)
    for part in tl.static_range(2):
        if part == 0:
            start = 0
            stop = free
        else:
            start = free
            stop = last + 1
        for blk in range(start, stop):
            m, l, acc = _variant_block(q, K, V, m, l, acc, blk, b, hkv, qi, seq, qk_scale, d, cols, ones,
                                       HKV, D, BLOCK_N, part == 1, ACC_IN_DOT, SUM, PTX, BLOCK_FOLD)
            if not ONE_ACC:
                if ((blk + 1) % BPS == 0) | (blk == last):
                    big_m, big_l, big_acc = _fold(big_m, big_l, big_acc, m, l, acc, PTX)
                    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    l = tl.zeros([BLOCK_M], tl.float32)
                    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if ONE_ACC:
        out = _finish(l, acc, PTX)
    else:
        out = _finish(big_l, big_acc, PTX)
    tl.store(O + ((b.to(tl.int64) * seq + qi) * H + h)[:, None] * D + d[None, :], out.to(O.dtype.element_ty))


# name: (per_head, acc_in_dot, one_acc, sum, plain, block_fold)
VARIANTS = {
    "contract": (False, False, False, False, False, False),
    "block_fold": (False, False, True, False, False, True),
    "acc_in_dot": (False, True, False, False, False, False),
    "one_acc": (False, False, True, False, False, False),
    "acc_in_dot+one_acc": (False, True, True, False, False, False),
    "acc_in_dot+one_acc+sum": (False, True, True, True, False, False),
    "acc_in_dot+one_acc+sum+plain": (False, True, True, True, True, False),
    "acc_in_dot+one_acc+sum+plain+per_head": (True, True, True, True, True, False),
}


def variant(name, q, k, v):
    per_head, acc_in_dot, one_acc, row_sum, plain, block_fold = VARIANTS[name]
    b, seq = q.shape[:2]
    if seq % BLOCK_M:
        raise ValueError(f"sequence length {seq} is not a multiple of {BLOCK_M}")
    o = torch.empty_like(q)
    grid = (seq // BLOCK_M, b * H) if per_head else (seq * H // HKV // BLOCK_M, b * HKV)
    _variant_kernel[grid](q, k, v, o, seq, contract.qk_scale(None, D), H=H, HKV=HKV, D=D, BLOCK_M=BLOCK_M,
                          BLOCK_N=BLOCK_N, BPS=contract.SPLIT // BLOCK_N, PER_HEAD=per_head, ACC_IN_DOT=acc_in_dot,
                          ONE_ACC=one_acc, SUM=row_sum, PTX=not (plain or interpreting()), BLOCK_FOLD=block_fold, num_warps=WARPS, num_stages=STAGES)
    return o


def _general(framework, q, k, v, dense_causal=False):
    """The library forward's general path (``dense_causal=False``), or its
    dense causal specialisation (True), on dense causal inputs of the probe's
    heads."""
    b, seq = q.shape[:2]
    args = dict(batch=b, hkv=HKV, group=H // HKV, q_len=seq, kv_len=seq, max_q_len=seq, max_kv_len=seq,
                window=contract.window_sides(True, None), bottom_right=True, dense_causal=dense_causal)
    if framework == "torch":
        from bi_torch.ops import attention as ops

        out = torch.empty_like(q)
        return ops.launch(q, k, v, out, q_strides=ops._strides(q), k_strides=ops._strides(k),
                          v_strides=ops._strides(v), o_strides=ops._strides(out),
                          scale_log2=contract.qk_scale(None, D), **args)
    from bi_jax.ops import attention as ops

    qs, ks = ops._row_major_strides(q.shape), ops._row_major_strides(k.shape)
    return ops.launch(q, k, v, q_strides=qs[:3], k_strides=ks[:3], v_strides=ks[:3],
                      qk_scale=contract.qk_scale(None, D), **args)


def _jax_rows(shape, q, k, v, ref, flops, emit):
    """bi_jax's forward (specialised and general) and cuDNN's on the torch
    inputs, with JAX's timer; bits against ``bi_torch.attention``'s."""
    import jax
    import numpy as np

    import bi_jax
    from bench.timing import time_jax

    jq, jk, jv = (jax.dlpack.from_dlpack(t) for t in (q, k, v))
    fns = {"jax cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                    implementation="cudnn"),
           "bi_jax.attention": lambda q, k, v: bi_jax.attention(q, k, v, causal=True),
           "bi_jax general": lambda q, k, v: _general("jax", q, k, v),
           "bi_jax dense causal": lambda q, k, v: _general("jax", q, k, v, dense_causal=True)}
    times = time_jax(fns, [dict(q=jq, k=jk, v=jv)])
    want = ref.view(torch.int16).cpu().numpy()
    for name, fn in fns.items():
        out = np.asarray(jax.jit(fn)(jq, jk, jv)).view(np.int16)
        ms = times[name].median_us / 1e3
        emit({"shape": shape, "impl": name, "ms": ms, "tflops": flops / ms * 1e-9,
              "differing_vs_bi_torch": int((out != want).sum())})


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_variants", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--shapes", default="1x4096,4x4096,64x1024,1x16384", help="BxL, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, or none")
    p.add_argument("--jax", action="store_true", help="also bi_jax's forward and cuDNN's through JAX")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_variants")
    bench = triton.testing.do_bench_cudagraph
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for shape in args.shapes.split(","):
        b, seq = (int(x) for x in shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q = torch.randn(b, seq, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, seq, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, seq, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        flops = 4 * b * seq * seq * D * H / 2
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        want = sdpa(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
        ref = bi_torch.attention(q, k, v, causal=True)
        fns = {"sdpa": lambda: sdpa(qt, kt, vt, is_causal=True, enable_gqa=True),
               "bi_torch.attention": lambda: bi_torch.attention(q, k, v, causal=True),
               "bi_torch general": lambda: _general("torch", q, k, v)}
        names = [] if args.variants == "none" else args.variants.split(",")
        fns.update({name: (lambda name=name: variant(name, q, k, v)) for name in names})
        for name, fn in fns.items():
            out = fn()
            out = out.transpose(1, 2) if name == "sdpa" else out
            ms = bench(fn)
            row = {"shape": shape, "impl": name, "ms": ms, "tflops": flops / ms * 1e-9,
                   "max_abs_diff_vs_sdpa": float((out.float() - want.float()).abs().max())}
            if name in ("contract", "bi_torch general"):
                row["differing_vs_bi_torch"] = int((out.view(torch.int16) != ref.view(torch.int16)).sum())
            emit(row)
        if args.jax:
            _jax_rows(shape, q, k, v, ref, flops, emit)


if __name__ == "__main__":
    main()

"""Attention: causal prefill (``attention``) and one-token decode against a
cache (``attention_decode``), both in the ``(batch, seq, heads, head_dim)``
layout of ``bi_torch.attention`` / ``bi_jax.attention``.

A feature size is the sequence (prefill) or cache (decode) length with the
properties' small heads (4 query heads, 1 KV head, head dim 64), or a tuple
``(length, query heads, KV heads, head dim)`` (the benchmark's Llama-3
shapes). The schedule properties (chunks, pages, packing, split-KV) are in
``harness.attention``.
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.opspec import Bench, DefaultVaries, Impl, OpSpec, Tolerance, lazy_jit

SMALL = (4, 1, 64)  # query heads, KV heads, head dim of the properties
LLAMA = (32, 8, 128)


def _dims(features):
    if isinstance(features, tuple):
        return features
    return (features, *SMALL)


def features_of(inputs):
    """(key length, query heads, KV heads, head dim) of a set of inputs."""
    q, k = inputs["q"], inputs["k"]
    return (k.shape[1], q.shape[2], k.shape[2], q.shape[3])


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(dtype))


def make_prefill(rng: np.random.Generator, batch: int, features, dtype: str):
    s, hq, hkv, d = _dims(features)
    return {"q": _randn(rng, (batch, s, hq, d), dtype), "k": _randn(rng, (batch, s, hkv, d), dtype),
            "v": _randn(rng, (batch, s, hkv, d), dtype)}


def make_decode(rng: np.random.Generator, batch: int, features, dtype: str):
    n, hq, hkv, d = _dims(features)
    return {"q": _randn(rng, (batch, 1, hq, d), dtype), "k": _randn(rng, (batch, n, hkv, d), dtype),
            "v": _randn(rng, (batch, n, hkv, d), dtype)}


def reference(inputs, causal: bool = True) -> np.ndarray:
    """float64 attention, causal queries aligned to the end of the keys."""
    q, k, v = (inputs[n].astype(np.float64) for n in ("q", "k", "v"))
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, lq, hkv, g, d)
    s = np.einsum("bqhgd,bkhd->bhgqk", qg, k, optimize=True) / np.sqrt(d)
    if causal:
        pos = np.arange(lq) + lk - lq
        s = np.where(np.arange(lk)[None, :] <= pos[:, None], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhgqk,bkhd->bqhgd", p, v, optimize=True)
    return out.reshape(b, lq, hq, d)


def _grads(inputs, g, causal: bool = True):
    """float64 gradients (q, k, v) of the attention for the cotangent ``g``."""
    q, k, v = (inputs[n] for n in ("q", "k", "v"))
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    grp = hq // hkv
    qg, gg = q.reshape(b, lq, hkv, grp, d), g.reshape(b, lq, hkv, grp, d)
    s = np.einsum("bqhgd,bkhd->bhgqk", qg, k, optimize=True) / np.sqrt(d)
    if causal:
        s = np.where(np.arange(lk)[None, :] <= (np.arange(lq) + lk - lq)[:, None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = np.einsum("bqhgd,bkhd->bhgqk", gg, v, optimize=True)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) / np.sqrt(d)
    dq = np.einsum("bhgqk,bkhd->bqhgd", ds, k, optimize=True).reshape(q.shape)
    dk = np.einsum("bhgqk,bqhgd->bkhd", ds, qg, optimize=True)
    dv = np.einsum("bhgqk,bqhgd->bkhd", p, gg, optimize=True)
    return dq, dk, dv


def _torch_sdpa(q, k, v, causal=True):
    """torch's SDPA, fastest backend first (cuDNN, flash, efficient, math)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    # Lq = 1 (decode) attends to every key: not causal in SDPA's top-left sense.
    is_causal = causal and q.shape[1] == k.shape[1]
    with sdpa_kernel(order, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2)


@lazy_jit
def _jax_xla_or_cudnn(q, k, v):
    import jax

    return jax.nn.dot_product_attention(q, k, v, is_causal=q.shape[1] == k.shape[1],
                                        implementation="cudnn" if jax.default_backend() == "gpu" else None)


def _jax_default(q, k, v, causal=True):
    return _jax_xla_or_cudnn(q, k, v)


def _split_kv_by_batch(xp):
    """Split-KV attention whose split count follows the batch
    (``harness.controls.splits``), partials merged in turn: what a decode
    heuristic tuned per batch does. Not masked: a control only has to vary."""
    from harness.controls import splits

    def attention(q, k, v, causal=True):
        b, lq, hq, d = q.shape
        lk, hkv = k.shape[1], k.shape[2]
        g = hq // hkv
        qr = xp.f32(q).reshape(b, lq, hkv, g, d).swapaxes(1, 2).reshape(b, hkv, lq * g, d)
        kr, vr = xp.f32(k).swapaxes(1, 2), xp.f32(v).swapaxes(1, 2)
        big_m = big_l = big_acc = None
        for kp, vp in zip(xp.split(kr, splits(b), 2), xp.split(vr, splits(b), 2)):
            s = xp.matmul_f32(qr, kp.swapaxes(2, 3)) * (1.0 / d**0.5)
            m = xp.amax(s, -1, keepdims=True)
            p = xp.exp(s - m)
            l, acc = xp.sum(p, -1, keepdims=True), xp.matmul_f32(p, vp)
            if big_m is None:
                big_m, big_l, big_acc = m, l, acc
                continue
            # Rescaled to the first split's maximum (inputs are N(0, 1)).
            c = xp.exp(m - big_m)
            big_l, big_acc = big_l + l * c, big_acc + acc * c
        out = (big_acc / big_l).reshape(b, hkv, lq, g, d).swapaxes(1, 2).reshape(b, lq, hq, d)
        return xp.cast(out, q)

    return attention


def _prefill_flops(batch: int, features, dtype: str) -> float:
    s, hq, _, d = _dims(features)
    return 4.0 * batch * hq * d * s * s / 2  # two products over the causal half


def _decode_bytes(batch: int, features, dtype: str) -> float:
    n, hq, hkv, d = _dims(features)
    size = np_dtype(dtype).itemsize
    return float(batch * size * (2 * n * hkv * d + 2 * hq * d))  # keys, values; query and output


_TOLERANCES = {
    # fp32 softmax statistics; p rounded to the value dtype before its product.
    "float32": Tolerance(rtol=2e-5, atol=2e-5),
    "bfloat16": Tolerance(rtol=2e-2, atol=2e-2),
    "float16": Tolerance(rtol=4e-3, atol=4e-3),
}
_IMPLS = {
    "torch": Impl("attention", _torch_sdpa, "torch SDPA (cuDNN first)"),
    "jax": Impl("attention", _jax_default, "jax.nn.dot_product_attention (cudnn)"),
}

# What the two specs share: q batched with its keys and values, the
# reference, tolerances, implementations, the control, the batch budget.
_COMMON = dict(
    batch_arg="q",
    batched=("k", "v"),
    reference=reference,
    tolerances=_TOLERANCES,
    impls=_IMPLS,
    kwargs={"causal": True},
    controls={"split_kv_by_batch": _split_kv_by_batch},
    # A batch row of length s counts 32 s elements of the profile's budget
    # (CPU: a few rows at 64).
    row_elements=lambda s: 32 * s,
    features_of=features_of,
)

ATTENTION = OpSpec(
    name="attention",
    make_inputs=make_prefill,
    # Both kernels have a backward (composed of bi_ products and softmax).
    grads={name: (lambda i, g, n=n: _grads(i, g)[n]) for n, name in enumerate(("q", "k", "v"))},
    bench=Bench(
        features=tuple((s, *LLAMA) for s in (1024, 4096, 16384)),
        bound="compute",
        work=_prefill_flops,
        max_batch=lambda f: max(1, 65536 // _dims(f)[0]),  # up to 64k tokens
        batch_axis="sequences (batch)",
        shape_note="S x Hq x Hkv x D",
        length_axis="sequence length S",
    ),
    max_features=2048,  # sequence lengths of the properties
    # The backward recomputes (4 heads, s, s) scores per sequence: its time, and the test problems, grow as s^2.
    grad_row_elements=lambda s: 4 * s * s,
    cross_features=(1, 100, 1000, 4096),
    **{**_COMMON, "impls": {"torch": Impl("attention", _torch_sdpa, "torch SDPA (cuDNN first)", grad=True),
                            "jax": Impl("attention", _jax_default, "jax.nn.dot_product_attention (cudnn)", grad=True)}},
)

ATTENTION_DECODE = OpSpec(
    name="attention_decode",
    make_inputs=make_decode,
    bench=Bench(
        features=tuple((n, *LLAMA) for n in (1024, 4096, 16384, 32768)),
        bound="memory",
        work=_decode_bytes,
        # Keys and values up to 16 GB: batch 256 at 4096 keys, 64 at 32768.
        max_batch=lambda f: max(1, int(16e9 // _decode_bytes(1, f, "bfloat16"))),
        # Split-KV off (one program walks all of a query's keys), as the
        # invariant peers run: the same bits, slower at small batch.
        variants={"nosplit": {"split_kv": False}},
        batch_axis="sequences (batch)",
        shape_note="keys x Hq x Hkv x D",
        plot_throughput=True,
    ),
    # On the H200 (bf16, 32/8 heads, 4096 keys) request 0 alone differed from
    # the same request in a batch of 32 for SDPA's flash, cuDNN and math
    # backends and for jax.nn.dot_product_attention's cudnn and xla.
    default_varies=DefaultVaries(features=(4096, *LLAMA), batch=32, sizes=8),
    max_features=32768,
    cross_features=(1, 700, 5000, 16384),
    **_COMMON,
)

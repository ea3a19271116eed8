"""Matrix products: ``matmul`` (2-D), ``linear`` (N-D input, transposed weight,
bias) and ``bmm`` (per-sequence operands, both batched).

The drawn feature size is K. The output width N follows from K: N = K for
even K (16-byte aligned rows, so the GPU runs the TMA kernel too) and an odd
width otherwise (the pointer kernel, with masked tile edges). The benchmark
passes ``(K, N)`` weight shapes instead.
"""

from __future__ import annotations

import numpy as np

from harness.bits import np_dtype
from harness.controls import split_product
from harness.opspec import Bench, DefaultVaries, Impl, OpSpec, Tolerance, lazy_jit

# fp32 accumulation, one rounding to the output dtype: the output's rounding
# dominates. fp32 runs in full precision (FMA), so K-long sums stay within
# ~sqrt(K) ULPs of fp32 relative to the O(1) outputs.
TOLERANCES = {
    "float32": Tolerance(rtol=1e-5, atol=1e-4),
    "bfloat16": Tolerance(rtol=8e-3, atol=2e-3),
    "float16": Tolerance(rtol=1e-3, atol=2e-4),
}

# (K, N) of Llama-style weights: Llama-3-8B's projections and MLP, and
# Llama-3-70B's square projection and MLP down projection.
BENCH_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (8192, 8192), (28672, 8192))

BMM_HEADS, BMM_QUERIES = 2, 5  # per batch row: a (heads, queries, D), b (heads, D, D + 3)


def weight_shape(features) -> tuple[int, int]:
    """``(K, N)`` for a drawn K, or the given pair."""
    if isinstance(features, tuple):
        return features
    k = int(features)
    return k, (k if k % 2 == 0 else (3 * k) // 4 + 5)


def _normal(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    # Scaled so that outputs stay O(1) for any K.
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np_dtype(dtype))


def _flops(batch: int, features, dtype: str) -> float:
    k, n = weight_shape(features)
    return 2.0 * batch * k * n


def _f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def _torch_matmul(a, b):
    import torch

    return torch.matmul(a, b)


def _torch_linear(x, weight, bias):
    import torch

    return torch.nn.functional.linear(x, weight, bias)


@lazy_jit
def _jax_dot(a, b):
    import jax.numpy as jnp

    return jnp.dot(a, b)


@lazy_jit
def _jax_matmul(a, b):
    import jax.numpy as jnp

    return jnp.matmul(a, b)


@lazy_jit
def _jax_linear(x, weight, bias):
    return x @ weight.T + bias


def _split_matmul(xp):
    def matmul(a, b):
        return xp.cast(split_product(xp, a, b), a)

    return matmul


def _split_matmul_grad(xp):
    """The gradient of ``a`` (cotangent: the output) with its reduction over N
    split by the batch size."""
    def grad_a(a, b):
        out = xp.cast(xp.matmul_f32(xp.f32(a), xp.f32(b)), a)
        return xp.cast(split_product(xp, out, b.T), a)

    return grad_a


# --- matmul: a (M, K) @ b (K, N) --------------------------------------------------


def make_matmul(rng: np.random.Generator, batch: int, features, dtype: str):
    k, n = weight_shape(features)
    return {"a": _normal(rng, (batch, k), dtype), "b": _normal(rng, (k, n), dtype, 1 / np.sqrt(k))}


MATMUL = OpSpec(
    name="matmul",
    batch_arg="a",
    make_inputs=make_matmul,
    reference=lambda i: _f64(i["a"]) @ _f64(i["b"]),
    tolerances=TOLERANCES,
    impls={
        "torch": Impl("matmul", _torch_matmul, "cuBLAS (torch.matmul)", grad=True),
        "jax": Impl("matmul", _jax_dot, "XLA (jnp.dot)", grad=True),
    },
    bench=Bench(features=BENCH_SHAPES, bound="compute", work=_flops, extra_m=(16384, 65536)),
    controls={"split_by_batch": _split_matmul},
    grads={"a": lambda i, g: g @ i["b"].T, "b": lambda i, g: i["a"].T @ g},
    grad_controls={"split_by_batch": _split_matmul_grad},
    # cuBLAS changes algorithm at a few batch sizes only (on an H100, bf16
    # 4096x4096, M = 16 among the powers of two), which random draws can miss:
    # every decode-sized batch against a batch of 8192 instead.
    default_varies=DefaultVaries(features=4096, batch=8192, sizes=64),
    max_features=16384,
    row_elements=lambda k: k,
    sweeps={"bfloat16": ((4096, 4096), (8192, 28672)), "float32": ((4096, 4096),)},
    sweep_batch=8192,
    host_features=(2048, 5632),
)


# --- linear: x (M, S, K) @ weight (N, K).T + bias (N,) ----------------------------

LINEAR_SEQ = 2


def make_linear(rng: np.random.Generator, batch: int, features, dtype: str):
    k, n = weight_shape(features)
    return {
        "x": _normal(rng, (batch, LINEAR_SEQ, k), dtype),
        "weight": _normal(rng, (n, k), dtype, 1 / np.sqrt(k)),
        "bias": _normal(rng, (n,), dtype),
    }


LINEAR = OpSpec(
    name="linear",
    batch_arg="x",
    make_inputs=make_linear,
    reference=lambda i: _f64(i["x"]) @ _f64(i["weight"]).T + _f64(i["bias"]),
    tolerances=TOLERANCES,
    impls={
        "torch": Impl("linear", _torch_linear, "torch.nn.functional.linear", grad=True),
        "jax": Impl("linear", _jax_linear, "XLA (x @ w.T + b)", grad=True),
    },
    grads={"x": lambda i, g: g @ i["weight"], "weight": lambda i, g: np.einsum("msn,msk->nk", g, i["x"]),
           "bias": lambda i, g: g.sum(axis=(0, 1))},
    max_features=16384,
    row_elements=lambda k: LINEAR_SEQ * k,
    host_features=(2048, 5632),
)


# --- bmm: a (M, H, Q, D) @ b (M, H, D, T): both operands belong to the sequence ---


def make_bmm(rng: np.random.Generator, batch: int, features, dtype: str):
    d = int(features)
    return {
        "a": _normal(rng, (batch, BMM_HEADS, BMM_QUERIES, d), dtype),
        "b": _normal(rng, (batch, BMM_HEADS, d, d + 3), dtype, 1 / np.sqrt(d)),
    }


BMM = OpSpec(
    name="bmm",
    batch_arg="a",
    batched=("b",),
    make_inputs=make_bmm,
    reference=lambda i: _f64(i["a"]) @ _f64(i["b"]),
    tolerances=TOLERANCES,
    impls={
        "torch": Impl("matmul", _torch_matmul, "torch.matmul", grad=True),
        "jax": Impl("matmul", _jax_matmul, "XLA (jnp.matmul)", grad=True),
    },
    grads={"a": lambda i, g: g @ np.swapaxes(i["b"], -1, -2), "b": lambda i, g: np.swapaxes(i["a"], -1, -2) @ g},
    max_features=256,
    row_elements=lambda d: BMM_HEADS * (BMM_QUERIES * d + d * (d + 3)),
    host_features=128,
)

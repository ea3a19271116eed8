"""Tiles and launch settings of the fused torch attention backward
(``bi_torch.ops.attention_grad``) on the GPU::

    python -m bench.probes.attention_grad_tune [--out DIR]

bf16, causal, 32 query / 8 KV heads, head dim 128. For each candidate launch
of the dK/dV kernel and of the dQ kernel (the other kernels at their
defaults): the backward's time (``triton.testing.do_bench``) and how many
elements of dQ, dK, dV differ from the default launches' bits. Beside them,
PyTorch's SDPA forward + backward, SDPA's forward and bi_'s forward, for
scale, and the backward with its mask-free tiles on and off
(``bi_core.attention.MASK_FREE_FROM``; the same bits, compared). The same for
the Pallas twin (``--frameworks jax``). One JSON line per point.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import triton
import triton.testing

from bench.probes._log import jsonl_emitter
from bi_core.attention import BackwardLaunch as Launch
from bi_core.attention import backward_launches as launches
from bi_torch.ops.attention_grad import attention_backward

H, HKV, D = 32, 8, 128
SHAPES = ((64, 1024), (4, 4096))  # (sequences, length): the benchmark's shape, and a long one
# Pallas: fewer candidates (each compiles through XLA too).
JAX_CANDIDATES = {
    "dkdv": [*(Launch(64, 64, w, s) for w, s in itertools.product((4, 8), (1, 2, 3))), Launch(32, 128, 8, 2)],
    "dq": [*(Launch(64, 64, w, s) for w, s in itertools.product((4, 8), (1, 2, 3))), Launch(128, 32, 8, 2)],
}
CANDIDATES = {
    "dkdv": [Launch(m, n, w, s) for (m, n), w, s in
             itertools.product(((64, 64), (32, 64), (32, 128), (64, 128)), (4, 8), (2, 3))],
    "dq": [Launch(m, n, w, s) for (m, n), w, s in
           itertools.product(((64, 64), (128, 32), (128, 64), (64, 32)), (4, 8), (2, 3))],
}


def _differing(a, b) -> int:
    return sum(int((x.view(torch.int16) != y.view(torch.int16)).sum()) for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_grad_tune",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--kernels", default="dkdv,dq", help="of dkdv, dq")
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--shapes", type=_shapes, default=SHAPES, help="sequences x length, comma-separated "
                   "(default: 64x1024,4x4096)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another version of bi_torch/ops/attention_grad.py (say, from an older commit), timed "
                        "beside this one")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_grad_tune")
    kernels = [k for k in args.kernels.split(",") if k]  # --kernels '': the default launches alone
    if "torch" in args.frameworks:
        torch_part(emit, kernels, args.baseline, args.shapes)
    if "jax" in args.frameworks:
        jax_part(emit, kernels)


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(n) for n in item.split("x", 1)) for item in text.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are sequences x length, such as 64x1024: {text!r}") from None


def _load_baseline(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention_grad_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention_backward


def torch_part(emit, kernels, baseline=None, shapes=SHAPES) -> None:
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40)  # noqa: E731

    from bi_core import attention as contract
    from bi_torch import attention
    from bi_torch.ops.attention import _dense

    torch.manual_seed(0)
    for b, seq in shapes:
        q = torch.randn(b, seq, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, seq, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = attention(q, k, v, causal=True)
        g = torch.randn_like(out)
        flops = b * H * 7 * 2 * seq * seq * D / 2  # the seven recomputed or gradient products, causal half
        shape = {"b": b, "seq": seq}

        def sdpa():
            qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, (qt, kt, vt), g.transpose(1, 2))

        emit({**shape, "what": "sdpa forward+backward", "ms": bench(sdpa)})
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        emit({**shape, "what": "sdpa forward", "ms": bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True))})
        emit({**shape, "what": "bi_ forward", "ms": bench(lambda: attention(q, k, v, causal=True))})
        ref = attention_backward(q, k, v, out, g, True)
        ms = bench(lambda: attention_backward(q, k, v, out, g, True))
        emit({**shape, "what": "bi_ backward (default launches)", "launches": {n: list(c) for n, c in
                                                                              launches(D).items()},
              "ms": ms, "tflops": round(flops / ms / 1e9, 1)})
        # Autograd's path: the forward keeps the softmax statistics, the backward skips their QK^T.
        lse = _dense("attention", q, k, v, causal=True, scale=None, window=None, bottom_right=True,
                     split_kv=None, with_lse=True)[1]
        ref_lse = attention_backward(q, k, v, out, g, True, lse=lse)
        ms = bench(lambda: attention_backward(q, k, v, out, g, True, lse=lse))
        emit({**shape, "what": "bi_ backward from the forward's statistics", "ms": ms,
              "tflops": round(flops * 6 / 7 / ms / 1e9, 1)})
        threshold = contract.MASK_FREE_FROM
        try:  # the tiles that see every key with and without the mask (the same bits), interleaved twice
            for _ in range(2):
                for mask_free in (True, False):
                    contract.MASK_FREE_FROM = 1 if mask_free else 1 << 40
                    emit({**shape, "what": f"bi_ backward from the forward's statistics, mask-free tiles "
                                           f"{'on' if mask_free else 'off'}",
                          "ms": bench(lambda: attention_backward(q, k, v, out, g, True, lse=lse)),
                          "differing": _differing(ref_lse, attention_backward(q, k, v, out, g, True, lse=lse))})
        finally:
            contract.MASK_FREE_FROM = threshold
        if baseline is not None:
            old = _load_baseline(baseline)
            for _ in range(2):  # interleaved with this version's, twice
                got = old(q, k, v, out, g, True, lse=lse)
                emit({**shape, "what": f"baseline {baseline.name}: backward from the forward's statistics",
                      "ms": bench(lambda: old(q, k, v, out, g, True, lse=lse)),
                      "differing": _differing(got, attention_backward(q, k, v, out, g, True, lse=lse))})
                emit({**shape, "what": "bi_ backward from the forward's statistics (again)",
                      "ms": bench(lambda: attention_backward(q, k, v, out, g, True, lse=lse))})
        emit({**shape, "what": "bi_ forward keeping the statistics", "ms": bench(lambda: _dense(
            "attention", q, k, v, causal=True, scale=None, window=None, bottom_right=True, split_kv=None,
            with_lse=True))})
        for kernel in kernels:
            for cand in CANDIDATES[kernel]:
                rec = {**shape, "kernel": kernel, "launch": list(cand)}
                config = {kernel: cand}
                try:
                    got = attention_backward(q, k, v, out, g, True, config=config)
                    rec["differing"] = _differing(got, ref)
                    rec["ms"] = bench(lambda: attention_backward(q, k, v, out, g, True, config=config))
                    rec["tflops"] = round(flops / rec["ms"] / 1e9, 1)
                except triton.runtime.errors.OutOfResources as e:
                    rec["error"] = repr(e)[:200]
                emit(rec)


def jax_part(emit, kernels) -> None:
    """The Pallas backward (``bi_jax.ops.attention_grad``) under ``jax.jit``:
    each candidate launch's wall time (median of 20 synchronised calls) and
    bits against the default launches'; cuDNN's forward + backward through
    ``jax.nn.dot_product_attention`` for scale."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import bi_jax
    from bi_jax.ops.attention_grad import attention_backward as jax_backward

    def wall_ms(fn, *xs):
        jax.block_until_ready(fn(*xs))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    # The first call's wall time (tracing, XLA and Triton compiles) per dtype:
    # every new sequence length compiles the Pallas kernels again.
    for dtype in (jnp.bfloat16, jnp.float32):
        for seq in (500, 501):
            q = jnp.asarray(rng.standard_normal((2, seq, H, D)), dtype)
            k = jnp.asarray(rng.standard_normal((2, seq, HKV, D)), dtype)
            t0 = time.perf_counter()
            jax.block_until_ready(jax.jit(lambda q, k: jax_backward(q, k, k, q, q, causal=True))(q, k))
            emit({"framework": "jax", "what": "first call (compile)", "dtype": jnp.dtype(dtype).name, "seq": seq,
                  "s": round(time.perf_counter() - t0, 2)})
    for b, seq in SHAPES[:1]:  # every new shape compiles each candidate again
        q = jnp.asarray(rng.standard_normal((b, seq, H, D)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((b, seq, HKV, D)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((b, seq, HKV, D)), jnp.bfloat16)
        out = bi_jax.attention(q, k, v, causal=True)
        g = jnp.asarray(rng.standard_normal(out.shape), jnp.bfloat16)
        flops = b * H * 7 * 2 * seq * seq * D / 2
        shape = {"framework": "jax", "b": b, "seq": seq}

        @jax.jit
        def cudnn(q, k, v, g):
            f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            o, pull = jax.vjp(f, q, k, v)
            return pull(g)

        try:
            emit({**shape, "what": "jax.nn.dot_product_attention forward+backward", "ms": wall_ms(cudnn, q, k, v, g)})
        except Exception as e:  # reported: the default may refuse a shape
            emit({**shape, "what": "jax.nn.dot_product_attention forward+backward", "error": repr(e)[:200]})

        def backward(config):
            return jax.jit(lambda q, k, v, o, g: jax_backward(q, k, v, o, g, causal=True, config=config))

        ref = backward(None)(q, k, v, out, g)
        ms = wall_ms(backward(None), q, k, v, out, g)
        emit({**shape, "what": "bi_ backward (default launches)", "ms": ms, "tflops": round(flops / ms / 1e9, 1)})
        for kernel in kernels:
            for cand in JAX_CANDIDATES[kernel]:
                rec = {**shape, "kernel": kernel, "launch": list(cand)}
                try:
                    fn = backward({kernel: cand})
                    got = fn(q, k, v, out, g)
                    rec["differing"] = sum(int(jnp.sum(jax.lax.bitcast_convert_type(x, jnp.int16) !=
                                                       jax.lax.bitcast_convert_type(y, jnp.int16)))
                                           for x, y in zip(got, ref))
                    rec["ms"] = wall_ms(fn, q, k, v, out, g)
                    rec["tflops"] = round(flops / rec["ms"] / 1e9, 1)
                except Exception as e:  # a launch past the shared memory: reported
                    rec["error"] = repr(e)[:200]
                emit(rec)


if __name__ == "__main__":
    main()

"""Tensor parallelism (``bi_torch.distributed``, ``bi_jax.distributed``): the
ranks' partial sums are added in rank order, so a row's bits do not depend on
the batch, every rank gets the same bits, and a control whose order follows
the message size (as a collective's choice of algorithm does) is caught.

In the CPU interpreters: 4 gloo processes (torch) and 4 host devices (JAX),
each in processes of their own. Several GPUs: ``bench/tp_check.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests_profile import PROFILE

WORLD = 4
ROWS, K, N = 6, 4 * 32, 40
# The control's order switches at this many elements (a collective's size
# threshold): 1-row partials (40) sum in one order, 6-row ones (240) in another.
CONTROL_SWITCH = 100

pytestmark = pytest.mark.skipif(PROFILE.native, reason="the CPU processes of the interpreters; several GPUs: "
                                "bench/tp_check.py")


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((ROWS, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32) / 8,
            rng.standard_normal(N, dtype=np.float32))


def _size_dependent_sum(parts):
    """A control: a tree ``(p0 + p1) + (p2 + p3)`` for large messages, the
    rank order for small ones."""
    if parts[0].size > CONTROL_SWITCH:
        return (parts[0] + parts[1]) + (parts[2] + parts[3])
    return ((parts[0] + parts[1]) + parts[2]) + parts[3]


def _torch_worker(rank, port):
    os.environ["TRITON_INTERPRET"] = "1"  # a spawned process: set before bi_torch is imported
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        import bi_torch
        from bi_torch import distributed as tp

        x, w, b = (torch.from_numpy(a) for a in _inputs())
        cols = slice(rank * K // WORLD, (rank + 1) * K // WORLD)
        rows_of = {"all": slice(0, ROWS), "one": slice(2, 3), "middle": slice(1, 5)}
        got = {n: tp.row_parallel_linear(x[r, cols], w[:, cols], b) for n, r in rows_of.items()}
        for n, r in rows_of.items():
            assert torch.equal(got[n], got["all"][r]), f"rank {rank}: rows {n} differ from the full batch"
        want = x.double() @ w.double().t() + b.double()
        torch.testing.assert_close(got["all"].double(), want, rtol=1e-5, atol=1e-5)
        every = tp.all_gather(got["all"][None], 0)  # every rank's result: the same bits
        assert all(torch.equal(every[0], e) for e in every), "ranks got different bits"
        # Column-parallel, gathered: the full bi_ linear's bits.
        n_r = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        assert torch.equal(tp.column_parallel_linear(x, w[n_r], b[n_r], gather=True), bi_torch.linear(x, w, b))

        # The control: the same partials, summed in an order that follows the size.
        def control(part):
            gathered = [torch.empty_like(part) for _ in range(WORLD)]
            dist.all_gather(gathered, part.contiguous())
            return _size_dependent_sum([g.numpy() for g in gathered])

        partial = {n: bi_torch.matmul(x[r, cols], w[:, cols].t()) for n, r in rows_of.items()}
        caught = not np.array_equal(control(partial["one"]), control(partial["all"])[rows_of["one"]])
        assert caught, "the size-dependent control was not caught"
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            tp.all_reduce(x.numpy())

        # A Llama decoder layer sharded over the ranks: a probe sequence's
        # bits alone and among others.
        from bench.tp_check import llama_layer_weights, sharded_llama_layer

        shape = dict(heads=8, kv_heads=4, head_dim=64)
        w = llama_layer_weights(96, intermediate=128, dtype=torch.float32, device="cpu", **shape)
        seqs = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
        batch = sharded_llama_layer(seqs, w, rank=rank, world=WORLD, **shape)
        alone = sharded_llama_layer(seqs[1:2], w, rank=rank, world=WORLD, **shape)
        assert torch.equal(alone, batch[1:2]), f"rank {rank}: the probe sequence alone differs"
        every = tp.all_gather(batch[None], 0)
        assert all(torch.equal(every[0], e) for e in every), "ranks got different layer outputs"
        torch.testing.assert_close(batch, _plain_llama_layer(seqs, w, **shape), rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()


def _plain_llama_layer(x, w, heads, kv_heads, head_dim):
    """The same layer on one device with PyTorch's own ops (the accuracy reference)."""
    import torch
    import torch.nn.functional as F

    b, length, _ = x.shape
    h = F.rms_norm(x, (x.shape[-1],), w["attn_norm"], 1e-5)
    q, k, v = (F.linear(h, w[n]).view(b, length, -1, head_dim).transpose(1, 2) for n in "qkv")
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    x = x + F.linear(attn.reshape(b, length, -1), w["o"])
    h = F.rms_norm(x, (x.shape[-1],), w["mlp_norm"], 1e-5)
    return x + F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_invariance_torch_row_parallel_linear_over_gloo():
    import torch.multiprocessing as mp

    mp.spawn(_torch_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_torch_all_reduce_refuses_without_a_process_group():
    import torch

    from bi_torch import distributed as tp

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        tp.all_reduce(torch.ones(3))


_JAX_SCRIPT = textwrap.dedent(f"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={WORLD}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    import bi_jax
    from bi_jax import distributed as tp
    from tests.test_distributed import _inputs, _size_dependent_sum, ROWS, K, N, WORLD

    x, w, b = (jnp.asarray(a) for a in _inputs())
    mesh = Mesh(np.array(jax.devices()[:WORLD]), ("tp",))

    def sharded(f, in_specs):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False))

    row = sharded(lambda x, w, b: tp.row_parallel_linear(x, w, b, axis_name="tp"), (P(None, "tp"), P(None, "tp"), P()))
    full = np.asarray(row(x, w, b))
    for r in (slice(2, 3), slice(1, 5)):
        assert np.array_equal(np.asarray(row(x[r], w, b)), full[r]), f"rows {{r}} differ from the full batch"
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5)
    col = sharded(lambda x, w, b: tp.column_parallel_linear(x, w, b, axis_name="tp", gather=True),
                  (P(), P("tp", None), P("tp")))
    assert np.array_equal(np.asarray(col(x, w, b)), np.asarray(bi_jax.linear(x, w, b)))
    # The control: the same partials gathered, summed in an order that follows the size.
    parts = sharded(lambda x, w: jax.lax.all_gather(bi_jax.matmul(x, w.T), "tp"), (P(None, "tp"), P(None, "tp")))
    one = _size_dependent_sum(list(np.asarray(parts(x[2:3], w))))
    every = _size_dependent_sum(list(np.asarray(parts(x, w))))
    assert not np.array_equal(one, every[2:3]), "the size-dependent control was not caught"

    # A Llama decoder layer sharded over the devices: a probe sequence alone and in a batch.
    import torch
    from bench.tp_check import jax_layer_specs, llama_layer_weights, sharded_llama_layer_jax
    from tests.test_distributed import _plain_llama_layer
    w_t = llama_layer_weights(96, heads=8, kv_heads=4, head_dim=64, intermediate=128, dtype=torch.float32,
                              device="cpu")
    seqs_t = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
    w, seqs = {{n: jnp.asarray(t.numpy()) for n, t in w_t.items()}}, jnp.asarray(seqs_t.numpy())
    layer = jax.jit(jax.shard_map(lambda x, w: sharded_llama_layer_jax(x, w, 64, "tp"), mesh=mesh,
                                  in_specs=(P(), jax_layer_specs()), out_specs=P(), check_vma=False))
    batch = np.asarray(layer(seqs, w))
    assert np.array_equal(np.asarray(layer(seqs[1:2], w)), batch[1:2]), "the probe sequence alone differs"
    want = _plain_llama_layer(seqs_t, w_t, heads=8, kv_heads=4, head_dim=64).numpy()
    np.testing.assert_allclose(batch, want, rtol=1e-4, atol=1e-4)
    print("ok")
""")


def test_invariance_jax_row_parallel_linear_over_host_devices():
    pytest.importorskip("jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:] + run.stderr[-5000:]

"""Tensor parallelism on several GPUs (``bi_torch.distributed`` over NCCL,
``bi_jax.distributed`` under ``shard_map``): whether a row's bits depend on
the batch, for the fixed-order all-reduce and for the collectives' own
(``torch.distributed.all_reduce``, ``jax.lax.psum``), and the fixed-order
all-reduce's time against NCCL's at decode message sizes::

    python -m bench.tp_check [--out DIR] [--gpus N]

One JSON line per result (``<out>/tp_check.jsonl``). NVLink multicast stays
off (``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"

HIDDEN = (4096, 8192)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, repeats=50) -> float:
    import torch
    import torch.distributed as dist

    for _ in range(5):
        fn()
    samples = []
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


def _torch_worker(rank, world, port, out):
    import torch
    import torch.distributed as dist

    from bench.probes._log import jsonl_emitter

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    from bi_torch import distributed as tp

    emit = jsonl_emitter(Path(out) if out else None, "tp_check") if rank == 0 else (lambda rec: None)
    gen = torch.Generator(device="cuda").manual_seed(0)  # the same inputs on every rank
    for hidden in HIDDEN:
        x = torch.randn(256, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(hidden, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(torch.bfloat16)
        cols = slice(rank * hidden // world, (rank + 1) * hidden // world)
        ref = tp.row_parallel_linear(x[:, cols], w[:, cols])
        ours, nccl = [], []
        for batch in BATCHES:
            got = tp.row_parallel_linear(x[:batch, cols], w[:, cols])
            ours.append(torch.equal(got, ref[:batch]))
            partial = torch.matmul(x[:batch, cols], w[:, cols].t()).float()
            dist.all_reduce(partial)
            full = torch.matmul(x[:, cols], w[:, cols].t()).float()
            dist.all_reduce(full)
            nccl.append(torch.equal(partial, full[:batch]))
        emit({"framework": "torch", "hidden": hidden, "world": world, "batches": BATCHES,
              "fixed_order_rows_equal": ours, "nccl_all_reduce_rows_equal": nccl})
        for batch in BATCHES:
            msg = torch.randn(batch, hidden, device="cuda", generator=gen).to(torch.bfloat16)
            ours_us = _timed(lambda: tp.all_reduce(msg))
            nccl_us = _timed(lambda: dist.all_reduce(msg.clone()))
            emit({"framework": "torch", "op": "all_reduce", "hidden": hidden, "batch": batch, "dtype": "bfloat16",
                  "fixed_order_us": ours_us, "nccl_us": nccl_us, "ratio": nccl_us / ours_us})
    dist.destroy_process_group()


def _jax(world, out):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from bench.probes._log import jsonl_emitter
    from bi_jax import distributed as tp

    emit = jsonl_emitter(Path(out) if out else None, "tp_check_jax")
    mesh = Mesh(np.array(jax.devices()[:world]), ("tp",))
    rng = np.random.default_rng(0)
    for hidden in HIDDEN:
        x = jnp.asarray(rng.standard_normal((256, hidden), dtype=np.float32), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((hidden, hidden), dtype=np.float32) / hidden ** 0.5, jnp.bfloat16)
        specs = (P(None, "tp"), P(None, "tp"))
        ours = jax.jit(jax.shard_map(lambda x, w: tp.row_parallel_linear(x, w, axis_name="tp"), mesh=mesh,
                                     in_specs=specs, out_specs=P(), check_vma=False))
        psum = jax.jit(jax.shard_map(lambda x, w: jax.lax.psum(jnp.dot(x, w.T, preferred_element_type=jnp.float32),
                                                               "tp"), mesh=mesh, in_specs=specs, out_specs=P()))
        ref_ours, ref_psum = np.asarray(ours(x, w)), np.asarray(psum(x, w))
        emit({"framework": "jax", "hidden": hidden, "world": world, "batches": BATCHES,
              "fixed_order_rows_equal": [bool(np.array_equal(np.asarray(ours(x[:b], w)), ref_ours[:b])) for b in BATCHES],
              "psum_rows_equal": [bool(np.array_equal(np.asarray(psum(x[:b], w)), ref_psum[:b])) for b in BATCHES]})


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tp_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: every visible GPU)")
    p.add_argument("--frameworks", default="torch,jax")
    args = p.parse_args()
    import torch

    world = args.gpus or torch.cuda.device_count()
    if world < 2:
        raise SystemExit(f"bench.tp_check needs at least 2 GPUs, this machine has {torch.cuda.device_count()}")
    if "torch" in args.frameworks:
        import torch.multiprocessing as mp

        mp.spawn(_torch_worker, args=(world, _port(), str(args.out) if args.out else None), nprocs=world, join=True)
    if "jax" in args.frameworks:
        _jax(world, args.out)


if __name__ == "__main__":
    main()


def llama_layer_weights(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, dtype, device,
                        seed: int = 0) -> dict:
    """A Llama decoder layer's full weights, drawn from ``seed`` (the same on
    every rank)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, scale):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    return {"attn_norm": 1 + draw(hidden, scale=0.1), "mlp_norm": 1 + draw(hidden, scale=0.1),
            "q": draw(heads * head_dim, hidden, scale=hidden ** -0.5),
            "k": draw(kv_heads * head_dim, hidden, scale=hidden ** -0.5),
            "v": draw(kv_heads * head_dim, hidden, scale=hidden ** -0.5),
            "o": draw(hidden, heads * head_dim, scale=(heads * head_dim) ** -0.5),
            "gate": draw(intermediate, hidden, scale=hidden ** -0.5),
            "up": draw(intermediate, hidden, scale=hidden ** -0.5),
            "down": draw(hidden, intermediate, scale=intermediate ** -0.5)}


def sharded_llama_layer(x, w: dict, heads: int, kv_heads: int, head_dim: int, rank: int, world: int, group=None):
    """One Llama decoder layer (no RoPE: the sharding is the point) over
    ``x`` (B, L, hidden), tensor-parallel over ``world`` ranks: the query and
    KV heads and the MLP's intermediate features split in rank order,
    column-parallel in, row-parallel out (``bi_torch.distributed``); norms
    and residuals replicated. Every rank returns the same (B, L, hidden)."""
    import bi_torch
    from bi_torch import distributed as tp

    b, length, hidden = x.shape

    def rows(name, parts):  # this rank's rows of a weight split in ``parts`` equal blocks
        n = w[name].shape[0] // world
        return w[name][rank * n:(rank + 1) * n]

    def cols(name):
        n = w[name].shape[1] // world
        return w[name][:, rank * n:(rank + 1) * n]

    hq, hkv = heads // world, kv_heads // world
    h = bi_torch.rms_norm(x, w["attn_norm"], 1e-5)
    q = tp.column_parallel_linear(h, rows("q", world), group=group).view(b, length, hq, head_dim)
    k = tp.column_parallel_linear(h, rows("k", world), group=group).view(b, length, hkv, head_dim)
    v = tp.column_parallel_linear(h, rows("v", world), group=group).view(b, length, hkv, head_dim)
    attn = bi_torch.attention(q, k, v, causal=True).reshape(b, length, hq * head_dim)
    x = x + tp.row_parallel_linear(attn, cols("o"), group=group)
    h = bi_torch.rms_norm(x, w["mlp_norm"], 1e-5)
    gate = tp.column_parallel_linear(h, rows("gate", world), group=group).float()
    up = tp.column_parallel_linear(h, rows("up", world), group=group).float()
    act = (gate / (1.0 + (-gate).exp()) * up).to(x.dtype)
    return x + tp.row_parallel_linear(act, cols("down"), group=group)


def sharded_llama_layer_jax(x, w: dict, head_dim: int, axis_name):
    """:func:`sharded_llama_layer` in JAX, inside ``jax.shard_map``: ``w``
    holds this device's shards (the rows of q, k, v, gate and up, the columns
    of o and down; the norms whole), ``x`` (B, L, hidden) is replicated."""
    import jax.numpy as jnp

    import bi_jax
    from bi_jax import distributed as tp

    b, length, _ = x.shape
    h = bi_jax.rms_norm(x, w["attn_norm"], eps=1e-5)
    q, k, v = (tp.column_parallel_linear(h, w[n], axis_name=axis_name).reshape(b, length, -1, head_dim)
               for n in "qkv")
    attn = bi_jax.attention(q, k, v, causal=True).reshape(b, length, -1)
    x = x + tp.row_parallel_linear(attn, w["o"], axis_name=axis_name)
    h = bi_jax.rms_norm(x, w["mlp_norm"], eps=1e-5)
    gate = tp.column_parallel_linear(h, w["gate"], axis_name=axis_name).astype(jnp.float32)
    up = tp.column_parallel_linear(h, w["up"], axis_name=axis_name).astype(jnp.float32)
    act = (gate / (1.0 + jnp.exp(-gate)) * up).astype(x.dtype)
    return x + tp.row_parallel_linear(act, w["down"], axis_name=axis_name)


def jax_layer_specs():
    """``shard_map`` in_specs of :func:`sharded_llama_layer_jax`'s weights
    over the mesh axis ``"tp"``."""
    from jax.sharding import PartitionSpec as P

    rows, cols = P("tp", None), P(None, "tp")
    return {"attn_norm": P(), "mlp_norm": P(), "q": rows, "k": rows, "v": rows, "o": cols, "gate": rows,
            "up": rows, "down": cols}

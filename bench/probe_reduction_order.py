"""Diagnostic: why bi_torch and bi_jax differ where they do (rms_norm, tf32).

Part 1 (rms_norm): both frameworks run a copy of their own rms_norm kernel that
also stores the fp32 sum of squares of each row. (Before the kernels wrote out
their reduction tree, ``tl.sum`` did it: the replay showed triton 3.6 adding a
thread's registers in sequence and jaxlib's Triton in pairs.) Saves the inputs and both
sums to ``rms_sums.npz`` so that candidate reduction trees can be replayed
offline (``--replay FILE``), and checks that the copies give the library's bits.

Part 2 (tf32): bi_torch and bi_jax at tf32 on raw fp32 operands, on operands
rounded to tf32 (to nearest, ties away) and on operands truncated to tf32.
Reports which pairs of launches agree bitwise, which tells where each
framework rounds the operands.

    BI_DEVICE=gpu python -m bench.probe_reduction_order --out DIR
    python -m bench.probe_reduction_order --replay DIR/rms_sums.npz
"""

from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import numpy as np


def tf32_round(x: np.ndarray, mode: str) -> np.ndarray:
    """fp32 array with its mantissa cut to tf32's 10 bits."""
    bits = x.astype(np.float32).view(np.uint32)
    if mode == "rna":
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def _rms_probe(out: Path) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    import triton
    import triton.language as tl
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    import bi_jax
    import bi_torch
    from bi_core.rms_norm import rms_norm_config, rstd_asm, sum_tree
    from bi_jax.ops import rms_norm as jmod
    from bi_torch.ops import rms_norm as tmod

    @triton.jit
    def torch_kernel(x_ptr, w_ptr, y_ptr, s_ptr, n_cols, RSTD_ASM: tl.constexpr, INV_N: tl.constexpr,
                     EPS: tl.constexpr, BLOCK: tl.constexpr, REPS: tl.constexpr, THREADS: tl.constexpr,
                     VEC: tl.constexpr, EXPLICIT: tl.constexpr, LANES: tl.constexpr, WARPS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        sumsq = tmod._sum_tree(tmod._square(x, True), REPS, THREADS, VEC, EXPLICIT, LANES, WARPS)
        y = x * tmod._rstd(sumsq, RSTD_ASM, INV_N, EPS, True) * w
        tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row + tl.arange(0, 1), sumsq)

    def jax_kernel(x_ref, w_ref, y_ref, s_ref, *, n, block, tree, inv_n, eps):
        row = pl.program_id(0)
        cols = jnp.arange(block)
        mask = cols < n
        x = pltriton.load(x_ref.at[row, cols], mask=mask, other=0.0).astype(jnp.float32)
        w = pltriton.load(w_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
        sumsq = jmod._sum_tree(jmod._square(x, True), tree)
        y = x * jmod._rstd(sumsq, inv_n, eps, True) * w
        pltriton.store(y_ref.at[row, cols], y.astype(y_ref.dtype), mask=mask)
        pltriton.store(s_ref.at[pl.ds(row, 1)], sumsq)

    rows, eps = 512, 1e-6
    saved_rows = 128  # enough rows to replay; keeps the file small
    saved = {}
    for dtype in ("float32", "bfloat16"):
        for n in (1024, 4096, 8192):
            cfg = rms_norm_config(n)
            tree = sum_tree(cfg.block, cfg.num_warps, 4 if dtype == "float32" else 2, n)
            rng = np.random.default_rng(n)
            x = rng.standard_normal((rows, n), dtype=np.float32)
            w = rng.standard_normal(n, dtype=np.float32)
            tdt = getattr(torch, dtype)
            xt = torch.from_numpy(x).cuda().to(tdt)
            wt = torch.from_numpy(w).cuda().to(tdt)
            yt = torch.empty_like(xt)
            st = torch.empty(rows, device="cuda", dtype=torch.float32)
            compiled = torch_kernel[(rows,)](xt, wt, yt, st, n, RSTD_ASM=rstd_asm(cfg.inv_n, eps), INV_N=cfg.inv_n,
                                             EPS=eps, BLOCK=cfg.block, REPS=tree.reps, THREADS=tree.threads,
                                             VEC=tree.vec, EXPLICIT=tree.explicit_threads, LANES=tree.lanes,
                                             WARPS=tree.warps, num_warps=cfg.num_warps)
            if n == 4096 and dtype == "bfloat16":
                (out / f"torch_sums_{dtype}_{n}.ttgir").write_text(compiled.asm["ttgir"])
                (out / f"torch_sums_{dtype}_{n}.ptx").write_text(compiled.asm["ptx"])
            xj, wj = jnp.asarray(xt.float().cpu().numpy()).astype(dtype), jnp.asarray(wt.float().cpu().numpy()).astype(dtype)
            yj, sj = pl.pallas_call(
                functools.partial(jax_kernel, n=n, block=cfg.block, tree=tree, inv_n=cfg.inv_n, eps=eps),
                grid=(rows,),
                out_shape=(jax.ShapeDtypeStruct((rows, n), xj.dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)),
                compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
            )(xj, wj)

            def bits(a):
                if isinstance(a, torch.Tensor):
                    return a.cpu().contiguous().view(torch.uint8).numpy().reshape(rows, -1)
                return np.asarray(a).view(np.uint8).reshape(rows, -1)

            faithful_t = bool((bits(bi_torch.rms_norm(xt, wt, eps)) == bits(yt)).all())
            faithful_j = bool((bits(bi_jax.rms_norm(xj, wj, eps)) == bits(yj)).all())
            s_t, s_j = st.cpu().numpy(), np.asarray(sj)
            rows_y = int((bits(yt) != bits(yj)).any(1).sum())
            rows_s = int((s_t.view(np.uint32) != s_j.view(np.uint32)).sum())
            print(f"rms {dtype} N={n} warps={cfg.num_warps}: sums differ in {rows_s}/{rows} rows, outputs in "
                  f"{rows_y}/{rows}; copies faithful torch={faithful_t} jax={faithful_j}", flush=True)
            key = f"{dtype}_{n}"
            saved[f"x_{key}"] = xt.float().cpu().numpy()[:saved_rows]
            saved[f"st_{key}"] = s_t[:saved_rows]
            saved[f"sj_{key}"] = s_j[:saved_rows]
            saved[f"warps_{key}"] = np.array(cfg.num_warps)
    np.savez_compressed(out / "rms_sums.npz", **saved)


def _tf32_probe(out: Path) -> None:
    import jax.numpy as jnp
    import torch

    import bi_jax
    import bi_torch

    torch.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.default_rng(0)
    for m, k, n, kmajor in [(128, 4096, 1024, False), (128, 4096, 1024, True), (1, 1000, 300, False)]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if kmajor else (k, n), dtype=np.float32)
        results = {}
        for mode in ("raw", "rna", "trunc"):
            a2, b2 = (a, b) if mode == "raw" else (tf32_round(a, mode), tf32_round(b, mode))
            bt = torch.from_numpy(b2).cuda()
            ot = (bi_torch.linear(torch.from_numpy(a2).cuda(), bt) if kmajor
                  else bi_torch.matmul(torch.from_numpy(a2).cuda(), bt))
            results[f"torch-{mode}"] = ot.cpu().numpy()
            f = bi_jax.linear if kmajor else bi_jax.matmul
            results[f"jax-{mode}"] = np.asarray(f(jnp.asarray(a2), jnp.asarray(b2), precision="tensorfloat32"))
        ref = a.astype(np.float64) @ (b.T if kmajor else b).astype(np.float64)
        print(f"tf32 M={m} K={k} N={n} kmajor={kmajor}", flush=True)
        for name, val in results.items():
            print(f"  {name}: max |err| vs fp64 of raw operands {np.abs(val - ref).max():.3g}", flush=True)
        for p, q in itertools.combinations(results, 2):
            same = results[p].view(np.uint32) == results[q].view(np.uint32)
            print(f"  {p} == {q}: {int(same.sum())}/{same.size} elements equal", flush=True)


def _replay(path: Path) -> None:
    """Replay candidate reduction trees in fp32 and count exact matches."""
    data = np.load(path)
    for key in sorted(k[2:] for k in data if k.startswith("x_")):
        x = data[f"x_{key}"].astype(np.float32)
        sq = x * x
        warps = int(data[f"warps_{key}"])
        found = {"t": [], "j": []}
        for vec, inner, lanes, cross in itertools.product((1, 2, 4, 8, 16), ("seq", "tree"), ("down", "up"),
                                                         ("seq", "down", "up")):
            got = _tree(sq, vec, warps, inner, lanes, cross)
            if got is None:
                continue
            for fw in found:
                hit = float((got.view(np.uint32) == data[f"s{fw}_{key}"].view(np.uint32)).mean())
                if hit > 0.99:
                    found[fw].append(f"vec={vec} inner={inner} lanes={lanes} cross={cross} ({hit:.3f})")
        for fw, name in (("t", "torch"), ("j", "jax")):
            print(f"{key} {name}: " + ("; ".join(found[fw]) if found[fw] else "no candidate matches"))


def _butterfly(v: np.ndarray, order: str) -> np.ndarray:
    """xor-shuffle sum over the last axis (every lane ends with the same value)."""
    width = v.shape[-1]
    steps = [width >> i for i in range(1, width.bit_length()) if width >> i]
    if order == "up":
        steps.reverse()
    idx = np.arange(width)
    for s in steps:
        v = (v + v[..., idx ^ s]).astype(np.float32)
    return v[..., 0]


def _tree_sum(v: np.ndarray) -> np.ndarray:
    """Adjacent pairs over the last axis until one value is left."""
    while v.shape[-1] > 1:
        v = (v[..., 0::2] + v[..., 1::2]).astype(np.float32)
    return v[..., 0]


def _tree(sq: np.ndarray, vec: int, warps: int, inner: str, lanes: str, cross: str) -> np.ndarray | None:
    """Sum of each row for a blocked layout: ``vec`` contiguous elements per
    thread, repeated; registers summed per thread, then lanes, then warps."""
    threads = 32 * warps
    rows, n = sq.shape
    if n % (vec * threads):
        return None
    # (rows, threads, registers) with registers in [rep][v] order.
    regs = sq.reshape(rows, n // (vec * threads), threads, vec).transpose(0, 2, 1, 3).reshape(rows, threads, -1)
    if inner == "seq":
        acc = regs[..., 0]
        for r in range(1, regs.shape[-1]):
            acc = (acc + regs[..., r]).astype(np.float32)
    else:
        acc = _tree_sum(regs)
    warp_sums = _butterfly(acc.reshape(rows, warps, 32), lanes)
    if warps == 1:
        return warp_sums[:, 0]
    if cross == "seq":
        total = warp_sums[:, 0]
        for w in range(1, warps):
            total = (total + warp_sums[:, w]).astype(np.float32)
        return total
    return _butterfly(warp_sums, cross)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("probe-out"))
    p.add_argument("--replay", type=Path)
    p.add_argument("--parts", default="rms,tf32")
    args = p.parse_args()
    if args.replay:
        _replay(args.replay)
        return
    from harness.devices import configure

    configure()
    args.out.mkdir(parents=True, exist_ok=True)
    if "rms" in args.parts:
        _rms_probe(args.out)
    if "tf32" in args.parts:
        _tf32_probe(args.out)


if __name__ == "__main__":
    main()

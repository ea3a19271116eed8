"""Where bi_torch and bi_jax attention part bits on the GPU: element
differences per case (one block, one split, several splits; decode and
prefill; each head dim), the rows and ULP distances of those that differ, and
the instruction census of each framework's compiled kernels (wgmma or
mma.sync, shuffles, ex2), from Triton's PTX (torch) and XLA's dumped PTX
(JAX)::

    python -m bench.probes.attention_bits [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

_DUMP = Path(tempfile.mkdtemp(prefix="bi-xla-dump-"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP}").strip()

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import bi_jax  # noqa: E402
import bi_torch  # noqa: E402
from bi_torch.ops import attention as torch_attention  # noqa: E402
from bench.probes._log import jsonl_emitter  # noqa: E402

H, HKV = 8, 2
# (batch, query length, key length, causal, split_kv)
CASES = [
    (1, 64, 100, False, None), (1, 128, 128, False, None), (1, 256, 300, False, None), (1, 256, 300, True, None),
    (2, 1, 300, False, None), (2, 1, 1000, False, False), (2, 1, 1000, False, True), (1, 1000, 1000, True, None),
    (1, 1000, 1000, False, None),
]
CENSUS = {
    "wgmma": r"wgmma\.mma_async", "mma.sync": r"\bmma\.sync", "shfl.bfly": r"shfl\.sync\.bfly",
    "ex2": r"ex2\.approx", "ldmatrix": r"ldmatrix", "tma": r"cp\.async\.bulk\.tensor", "cp.async": r"cp\.async\.ca|cp\.async\.cg",
    "add.f32": r"\badd\.(rn\.)?f32", "fma.f32": r"\bfma\.rn\.f32", "bar.sync": r"bar\.sync|barrier\.sync",
}


def census(ptx: str) -> dict:
    return {name: len(re.findall(rx, ptx)) for name, rx in CENSUS.items()}


def torch_ptx() -> list[dict]:
    out = []
    for fn in (torch_attention._attn_kernel, torch_attention._merge_kernel):
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for compiled in cache.values():
                ptx = compiled.asm.get("ptx", "")
                meta = {k: getattr(compiled.metadata, k, None) for k in ("num_warps", "num_stages", "shared")}
                meta.update({k: getattr(compiled, k, None) for k in ("n_regs", "n_spills")})
                consts = getattr(getattr(compiled, "src", None), "constants", None) or {}
                meta["constants"] = {str(k): v for k, v in consts.items() if isinstance(v, (int, bool))}
                out.append({"kernel": fn.__name__, **meta, **census(ptx)})
    return out


def jax_ptx() -> list[dict]:
    out = []
    for path in sorted(_DUMP.glob("*.ptx")):
        ptx = path.read_text(errors="replace")
        if "bi_attention" not in ptx and "attn" not in ptx:
            continue
        for entry in re.split(r"\n(?=\.visible \.entry|\.entry)", ptx)[1:]:
            name = re.match(r"\S*\s*\.entry\s+(\S+?)\(", entry) or re.match(r"\.visible \.entry (\S+?)\(", entry)
            out.append({"file": path.name, "kernel": name.group(1) if name else "?", **census(entry)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.attention_bits", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "attention_bits")

    rng = np.random.default_rng(0)
    for d in (64, 128, 256):
        for b, lq, lk, causal, split in CASES:
            q, k, v = (rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16)
                       for s in ((b, lq, H, d), (b, lk, HKV, d), (b, lk, HKV, d)))
            rec = {"head_dim": d, "case": [b, lq, lk, causal, split]}
            try:
                tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda() for x in (q, k, v))
                ot = bi_torch.attention(tq, tk, tv, causal=causal, split_kv=split).view(torch.int16).cpu().numpy()
                oj = np.asarray(bi_jax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                                                 split_kv=split)).view(np.int16)
                diff = ot != oj
                rec["differing"] = int(diff.sum())
                rec["of"] = int(diff.size)
                if diff.any():
                    ulps = np.abs(ot.astype(np.int32) - oj.astype(np.int32))[diff]
                    where = np.argwhere(diff)
                    rec["max_ulp"] = int(ulps.max())
                    rec["rows"] = sorted({(int(w[1]), int(w[2])) for w in where})[:12]
                    rec["cols"] = sorted({int(w[3]) for w in where})[:12]
                    rec["whole_rows"] = int(sum(diff[tuple(w[:3])].all() for w in np.unique(where[:, :3], axis=0)))
            except Exception as e:  # a probe: report and go on
                rec["error"] = repr(e)[:800]
            emit({"cross": rec})
    for rec in torch_ptx():
        emit({"torch_ptx": rec})
    for rec in jax_ptx():
        emit({"jax_ptx": rec})


if __name__ == "__main__":
    main()

"""Registers and spills of the torch attention forward kernel, compiled for a
Hopper GPU on any machine (no GPU needed: Triton compiles for the target and
``ptxas -v`` reports the resources)::

    python -m bench.probes.kernel_resources [--out DIR] [--arch 90] [--configs 128,8,2/64,4,2] [--lse]

bf16, head dim 128, 8 KV heads of 4 queries, dense keys, causal (bottom
right), for each tile config of ``bi_core.attention.tile_configs`` and the
loop forms that give the same bits (``WHOLE``: the blocks that every row
sees whole in a loop of their own; ``DENSE_CAUSAL``: the dense causal
specialisation, full tiles and blocks; ``HAS_LSE``: the statistics kept for
the backward). One JSON line per point: registers per thread, stack frame and
spill bytes. A spill is a trip to local memory (L1/L2) inside the key loop.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from bench.probes._log import jsonl_emitter
from bi_core import attention as contract
from bi_torch.ops import attention as ops

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "WS_ACC": "*fp32", "WS_M": "*fp32",
             "WS_L": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "KV_LEN": "*i32", "BT": "*i32", "MASK": "*i32",
             "BIAS": "*i32"}
_FLOATS = {"qk_scale", "bias_scale"}


def resources(arch: int, cfg, whole: bool, lse: bool, dense_causal: bool = False) -> dict:
    fn = ops._attn_kernel.kernel  # the jitted function under the cached launcher
    d = 128
    consts = dict(HKV=8, G=4, D=d, BLOCK_M=cfg.block_m, BLOCK_N=contract.block_n(d),
                  BPS=contract.SPLIT // contract.block_n(d), VARLEN_Q=False, VARLEN_K=False, HAS_KV_LEN=False,
                  PAGED=False, BOTTOM_RIGHT=True, SPREAD=False, IEEE=False, PTX=True, HAS_MASK=False,
                  HAS_BIAS=False, WHOLE=whole, REVERSE=False, K_STARTS=False, HAS_LSE=lse,
                  DENSE_CAUSAL=dense_causal, EVEN=dense_causal)
    signature = {name: "constexpr" if name in consts else _POINTERS.get(name, "fp32" if name in _FLOATS else "i32")
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None

    return {"registers": number(r"Used (\d+) registers"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"), "shared_bytes": compiled.metadata.shared}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.kernel_resources", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    p.add_argument("--configs", default=None,
                   help="tile configs ROWS,WARPS,STAGES separated by /; default the dispatch's for head dim 128")
    p.add_argument("--lse", action="store_true", help="also with the statistics kept for the backward")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "kernel_resources")
    configs = contract.tile_configs(128) if args.configs is None else [
        contract.TileConfig(*map(int, c.split(","))) for c in args.configs.split("/")]
    for cfg in configs:
        for whole, dense_causal in ((True, False), (False, False), (True, True)):
            for lse in (False, True) if args.lse else (False,):
                emit({"kernel": "attention forward", "config": [cfg.block_m, cfg.num_warps, cfg.num_stages],
                      "whole": whole, "dense_causal": dense_causal, "lse": lse,
                      **resources(args.arch, cfg, whole, lse, dense_causal)})


if __name__ == "__main__":
    main()

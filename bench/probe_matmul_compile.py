"""Diagnostic: compile time of every bi_torch matmul config on the proof shapes.

Launches each config that the dispatch can pick (bf16 and fp16) on the shapes
of ``tests/test_matmul.py::test_every_config_gives_the_same_bits``, printing
each launch before it starts and its wall time after, so that a compile that
does not finish names itself in the log.

    BI_DEVICE=gpu timeout 300 python -m bench.probe_matmul_compile
"""

from __future__ import annotations

import time

from harness.devices import configure


def main() -> None:
    configure()
    import torch

    from bi_core import matmul as contract
    from bi_torch.ops.matmul import _launch

    for dtype in (torch.bfloat16, torch.float16):
        for k, n in ((4096, 4096), (1000, 3000), (1001, 77)):
            a = torch.randn(2000, k, device="cuda").to(dtype)
            for kmajor in (False, True):
                b = torch.randn(n, k, device="cuda").to(dtype).t() if kmajor else torch.randn(k, n, device="cuda").to(dtype)
                for out_dtype in (dtype, torch.float32):
                    for cfg in contract.configs(str(dtype).removeprefix("torch."), "ieee"):
                        for m in (1, 33, 300, 2000):
                            label = f"{dtype} K={k} N={n} kmajor={kmajor} out={out_dtype} {cfg} M={m}"
                            print("start", label, flush=True)
                            t = time.perf_counter()
                            out = torch.empty(m, n, dtype=out_dtype, device="cuda")
                            _launch(a[:m][None], b[None], None, out[None], cfg)
                            torch.cuda.synchronize()
                            dt = time.perf_counter() - t
                            if dt > 5:
                                print(f"SLOW {dt:.1f}s {label}", flush=True)


if __name__ == "__main__":
    main()

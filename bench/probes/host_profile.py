"""Where the host time of a bi_ call at decode sizes goes: ``cProfile`` over
repeated calls of each op (bf16, 32 rows), the functions with the most time
of their own; with ``--generate``, also of a whole ``generate`` of the host-cost
Llama (B = 32, 24 new tokens) under the process-wide switch; with
``--backward``, of the training steps that ``python -m bench --backward`` times
(torch, M = 256: forward and ``torch.autograd.grad``), default and bi_, with
each step's mean host time::

    python -m bench.probes.host_profile [--out DIR] [--calls N] [--generate] [--backward]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path

import torch

import bi_torch


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.host_profile", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--generate", action="store_true")
    p.add_argument("--backward", action="store_true")
    args = p.parse_args()
    if args.backward:
        report = io.StringIO()
        _profile_backward(report, args.calls)
        text = report.getvalue()
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "host_profile_backward.txt").write_text(text)
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(5632, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    h = torch.randn(2048, device="cuda", dtype=torch.bfloat16, generator=g)
    logits = torch.randn(32, 32000, device="cuda", dtype=torch.bfloat16, generator=g)
    ops = {"linear": lambda: bi_torch.linear(x, w), "rms_norm": lambda: bi_torch.rms_norm(x, h, 1e-6),
           "softmax": lambda: bi_torch.softmax(logits, -1), "mean": lambda: bi_torch.mean(x, -1),
           "F.rms_norm under the switch": lambda: torch.nn.functional.rms_norm(x, (2048,), h, 1e-6)}
    report = io.StringIO()
    with torch.no_grad():
        for name, fn in ops.items():
            switch = bi_torch.enable_batch_invariant_mode() if "switch" in name else None
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            if switch is not None:
                switch.__exit__(None, None, None)
            report.write(f"=== {name}: {args.calls} calls\n")
            pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(22)
    if args.generate:
        _profile_generate(report)
    text = report.getvalue()
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_profile.txt").write_text(text)


def _profile_backward(report, calls: int) -> None:
    import time

    import numpy as np

    from bench.backward import _torch_step
    from harness import registry
    from harness.frameworks import adapter

    ad = adapter("torch")
    for spec in registry.all_specs():
        if not spec.grads or spec.bench is None or spec.name == "attention":
            continue
        inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), 256, spec.bench.features[0], "bfloat16"))
        for name, fn in (("default", ad.default(spec)), ("bi", ad.kernel(spec))):
            step = _torch_step(fn, inputs, spec.call_kwargs("torch"), tuple(spec.grads))
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                step()
            host = (time.perf_counter() - start) / calls * 1e6
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                step()
            prof.disable()
            torch.cuda.synchronize()
            report.write(f"=== backward step {spec.name} {name}: {host:.1f} us of host per step\n")
            if name == "bi":
                pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(25)


def _profile_generate(report) -> None:
    import bi_torch.hf as bhf
    from bench.host_cost import _llama

    ids = torch.randint(1, 32000, (32, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    model = bhf.batch_invariant(_llama("sdpa"), process_wide=True)
    try:
        with torch.no_grad():
            run = lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                         min_new_tokens=24, do_sample=False)
            run()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            run()
            torch.cuda.synchronize()
            prof.disable()
    finally:
        bi_torch.disable_batch_invariant_mode()
    report.write("=== generate under the switch (B = 32, 24 new tokens)\n")
    stats = pstats.Stats(prof, stream=report)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()

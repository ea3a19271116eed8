"""Where the time of compiled generation goes (the host-cost Llama, B = 32,
24 new tokens, transformers' static cache with ``reduce-overhead``): the
default against the process-wide switch, each also with one static cache
kept across ``generate`` calls (``bench.host_cost``: its CUDA graphs replay
instead of recording again), and the switch with its static
cache run eagerly (``disable_compile``) to compare bits with. Per variant:
wall time, Dynamo/Inductor counters (recompiles, graph breaks, CUDA graph
skips), the ops with the most GPU time and the most host time in one
profiled ``generate``, and whether its tokens equal the other variants'::

    python -m bench.probes.compiled_generation [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import bi_torch
import bi_torch.hf as bhf
from bench.host_cost import KEPT, _generate_options, _llama, _switch_with


def _variants():
    static = {"cache_implementation": "static"}
    switch = lambda: _switch_with("reduce-overhead")(bhf.batch_invariant(_llama("sdpa"), process_wide=True))  # noqa: E731
    return {
        "default, compiled, cache kept": (lambda: _llama("sdpa"), {"past_key_values": KEPT}),
        "switch, compiled, cache kept": (switch, {"past_key_values": KEPT}),
        "switch, compiled, cache kept, fuse=True": (
            lambda: _switch_with("reduce-overhead", fuse=True)(bhf.batch_invariant(_llama("sdpa"), process_wide=True)),
            {"past_key_values": KEPT}),
        "default, compiled": (lambda: _llama("sdpa"), static),
        "switch, compiled": (lambda: _switch_with("reduce-overhead")(bhf.batch_invariant(_llama("sdpa"),
                                                                                       process_wide=True)), static),
        "switch, static cache eager": (lambda: bhf.batch_invariant(_llama("sdpa"), process_wide=True),
                                       {**static, "disable_compile": True}),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.compiled_generation",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from torch._dynamo.utils import counters

    torch._logging.set_logs(recompiles=True, graph_breaks=True, perf_hints=True)
    ids = torch.randint(1, 32000, (32, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    report, tokens = [], {}
    for name, (build, options) in _variants().items():
        torch._dynamo.reset()
        counters.clear()
        model = build()
        try:
            with torch.no_grad():
                def run():
                    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                          min_new_tokens=24, do_sample=False,
                                          **_generate_options(model, options, 64 + 24))
                for _ in range(2):
                    run()
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = run()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    run()
                    torch.cuda.synchronize()
        finally:
            bi_torch.disable_batch_invariant_mode()
        tokens[name] = out[:, 64:].cpu()
        averages = prof.key_averages()
        report.append(f"=== {name}: {ms:.1f} ms; counters "
                      + str({k: dict(v) for k, v in counters.items() if k in ("stats", "inductor", "graph_break")}))
        report.append(averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
        report.append(averages.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=70))
        model = None
        torch.cuda.empty_cache()
    names = list(tokens)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = torch.equal(tokens[a], tokens[b])
            rows = (tokens[a] != tokens[b]).any(1).sum().item()
            report.append(f"tokens {a!r} vs {b!r}: equal={same} (rows that differ: {rows})")
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compiled_generation.txt").write_text(text)


if __name__ == "__main__":
    main()

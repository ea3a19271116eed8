"""Host cost of the torch drop-in paths, and end-to-end generation in both
frameworks (``python -m bench --host-cost``, GPU only).

Per call at decode sizes (bf16, each spec's ``host_features`` for 32 batch
rows): the default op, the bi_ function called directly (by its plan, and by
its full path with plans off, ``bi_torch._plan``), the default op under the
per-thread dispatch mode (``set_batch_invariant_mode``) and under the
process-wide switch (``enable_batch_invariant_mode``), plus an unrelated small
op under each.
Host time is the wall time of a loop of calls with no synchronisation in it,
over the calls (the GPU runs behind; the loop is shorter than the launch
queue), the median of several loops, the variants of an op taken in turn
(ABBA rounds), so that a drifting host shifts them alike.

End to end: a transformers ``LlamaForCausalLM`` (hidden 2048, 4 layers,
16/8 heads of 128, bf16, weights from a seed) generating 24 tokens greedily
for 32 prompts of 64 tokens: the default (``sdpa``), with the bi_ attention
under the dispatch mode, and under the process-wide switch; then compiled:
transformers' static cache, whose decoding steps ``generate`` compiles
(``reduce-overhead``, CUDA graphs), for the default and under the switch
(``bi_torch.compile_backend(mode="reduce-overhead")``). Transformers makes
a new static cache in every ``generate``, whose new tensors CUDA graphs
record again (the bi_ ops' Python runs while they record); the "cache kept"
variants pass one static cache, reset before each ``generate``, as a server
keeps its KV cache, so the graphs recorded once replay. Wall time of
``generate`` with a synchronisation at its end, the median of a few runs.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

CALLS, LOOPS = 200, 7


def _loop_us(fn) -> float:
    """Host time per call of ``fn`` over CALLS calls, no synchronisation among
    them (the GPU drained after)."""
    import torch

    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    per_call = (time.perf_counter() - start) / CALLS * 1e6
    torch.cuda.synchronize()
    return per_call


def _host_us(variants: dict) -> dict[str, float]:
    """The median host time per call of each ``{name: (fn, context)}`` (its
    call inside ``context()``), measured in LOOPS rounds that take the
    variants in turn (ABBA), so that a host whose speed drifts during the
    measurement shifts every variant alike (this timing moved by up to 1.6x
    between runs taken one variant after another)."""
    from bench.timing import interleave

    def sampler(fn, context):
        def sample():
            with context():
                return [_loop_us(fn)]
        return sample

    for fn, context in variants.values():  # warm-up: plans, compiled kernels, the allocator
        with context():
            for _ in range(20):
                fn()
    samples = interleave({name: sampler(*variant) for name, variant in variants.items()}, LOOPS)
    return {name: statistics.median(times) for name, times in samples.items()}


def _ops():
    """(label, default call, bi_ call) for every op whose spec names a
    decode-sized call, then an op that nothing routes."""
    import numpy as np
    import torch

    from harness import registry
    from harness.frameworks import adapter
    from harness.opspec import HOST_BATCH

    torch_ = adapter("torch")
    rows = []
    for spec in registry.all_specs():
        if spec.host_features is None or spec.impl("torch") is None:
            continue
        inputs = torch_.natives(spec.make_inputs(np.random.default_rng(0), HOST_BATCH, spec.host_features, "bfloat16"))
        kwargs = spec.call_kwargs("torch")
        default, kernel = torch_.default(spec), torch_.kernel(spec)
        shapes = " ".join("x".join(map(str, t.shape)) for t in inputs.values())
        rows.append((f"{spec.name} {shapes}", lambda f=default, i=inputs, k=kwargs: f(**i, **k),
                     lambda f=kernel, i=inputs, k=kwargs: f(**i, **k)))
    small = torch.randn(8, 8, device="cuda", dtype=torch.bfloat16)
    rows.append(("add 8x8 (not routed)", lambda: small + small, None))
    return rows


@contextlib.contextmanager
def plans_off():
    """The bi_ ops' full paths: no plans made or run while the block runs."""
    from bi_torch import _plan

    enabled, _plan.ENABLED = _plan.ENABLED, False
    try:
        yield
    finally:
        _plan.ENABLED = enabled


def measure_ops() -> list[dict]:
    import torch

    import bi_torch

    rows = []
    with torch.no_grad():
        for name, default, direct in _ops():
            variants = {"default_us": (default, contextlib.nullcontext)}
            if direct is not None:
                variants["bi_direct_us"] = (direct, contextlib.nullcontext)
                variants["bi_full_path_us"] = (direct, plans_off)
            variants["dispatch_mode_us"] = (default, bi_torch.set_batch_invariant_mode)
            variants["process_wide_us"] = (default, bi_torch.enable_batch_invariant_mode)
            row = {"op": name, **_host_us(variants)}
            for key in ("bi_direct_us", "bi_full_path_us", "dispatch_mode_us", "process_wide_us"):
                if key in row:
                    row[key.replace("_us", "_ratio")] = row[key] / row["default_us"]
            rows.append(row)
    return rows


def _llama(implementation):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                                   max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
                                   eos_token_id=None, attn_implementation=implementation)
    return transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def _switch_with(backend_mode, fuse=False):
    """The process-wide switch, with compiled calls on the batch-invariant
    backend in ``backend_mode`` (``fuse``: Inductor fuses the pointwise ops)."""
    import bi_torch

    def build(model):
        bi_torch.enable_batch_invariant_mode(compile_backend=bi_torch.compile_backend(mode=backend_mode, fuse=fuse))
        return model

    return build


QUICK_VARIANTS = ("default (sdpa)", "process-wide switch", "default (sdpa), compiled",
                  "process-wide switch, compiled", "default (sdpa), compiled, cache kept",
                  "process-wide switch, compiled, cache kept", "process-wide switch, compiled, cache kept, fuse=True",
                  "process-wide switch, compiled, cache kept, fuse='exact'")
KEPT = "kept"  # ``past_key_values``: one static cache for every generate of a variant


def _generate_options(model, options, length):
    """``generate``'s keyword arguments for one call: ``options``, with a
    ``past_key_values`` of ``KEPT`` replaced by the variant's one static cache
    (made at the first call, reset at each)."""
    if options.get("past_key_values") != KEPT:
        return options
    import transformers

    cache = getattr(model, "_bench_kept_cache", None)
    if cache is None:
        cache = model._bench_kept_cache = transformers.StaticCache(config=model.config, max_cache_len=length)
    cache.reset()
    return {**options, "past_key_values": cache}


def measure_generation(batch: int = 32, prompt: int = 64, new: int = 24, runs: int = 3,
                       progress=None, only=None) -> list[dict]:
    """Eager (dynamic cache) and compiled (transformers' static cache, whose
    decoding steps ``generate`` compiles with CUDA graphs) generation, the
    defaults against the bi_ paths; each compiled variant is timed after a
    first run that compiles."""
    import torch

    import bi_torch
    import bi_torch.hf as bhf

    ids = torch.randint(1, 32000, (batch, prompt), device="cuda", generator=torch.Generator(device="cuda")
                        .manual_seed(1))
    mask = torch.ones_like(ids)
    variants = {
        "default (sdpa)": (lambda: _llama("sdpa"), {}),
        "dispatch mode": (lambda: bhf.batch_invariant(_llama("sdpa")), {}),
        "process-wide switch": (lambda: bhf.batch_invariant(_llama("sdpa"), process_wide=True), {}),
        "process-wide switch, plans off": (lambda: bhf.batch_invariant(_llama("sdpa"), process_wide=True), {}),
        "default (sdpa), compiled": (lambda: _llama("sdpa"), {"cache_implementation": "static"}),
        "process-wide switch, compiled": (
            lambda: _switch_with("reduce-overhead")(bhf.batch_invariant(_llama("sdpa"), process_wide=True)),
            {"cache_implementation": "static"}),
        "default (sdpa), compiled, cache kept": (lambda: _llama("sdpa"), {"past_key_values": KEPT}),
        "process-wide switch, compiled, cache kept": (
            lambda: _switch_with("reduce-overhead")(bhf.batch_invariant(_llama("sdpa"), process_wide=True)),
            {"past_key_values": KEPT}),
        # Inductor's own pointwise kernels: fewer launches, invariant, but not eager's bits.
        "process-wide switch, compiled, fuse=True": (
            lambda: _switch_with("reduce-overhead", fuse=True)(bhf.batch_invariant(_llama("sdpa"),
                                                                                   process_wide=True)),
            {"cache_implementation": "static"}),
        "process-wide switch, compiled, cache kept, fuse=True": (
            lambda: _switch_with("reduce-overhead", fuse=True)(bhf.batch_invariant(_llama("sdpa"),
                                                                                   process_wide=True)),
            {"past_key_values": KEPT}),
        "process-wide switch, compiled, cache kept, fuse='exact'": (
            lambda: _switch_with("reduce-overhead", fuse="exact")(bhf.batch_invariant(_llama("sdpa"),
                                                                                      process_wide=True)),
            {"past_key_values": KEPT}),
    }
    rows, tokens = [], {}
    for name, (build, options) in variants.items():
        if only is not None and name not in only:
            continue
        torch._dynamo.reset()
        row = {"variant": name, "batch": batch, "new_tokens": new, **options}
        try:
            model = build()
            times = []
            with torch.no_grad(), plans_off() if "plans off" in name else contextlib.nullcontext():
                for i in range(runs + 1):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                         min_new_tokens=new, do_sample=False,
                                         **_generate_options(model, options, prompt + new))
                    torch.cuda.synchronize()
                    if i:  # the first run compiles the kernels (and the graphs)
                        times.append(time.perf_counter() - start)
            tokens[name] = out[:, prompt:].clone()
            row["ms"] = statistics.median(times) * 1e3
        except Exception as error:  # reported in the table, the other variants still run
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        finally:
            bi_torch.disable_batch_invariant_mode()  # process_wide switched it on
            model = None
            torch.cuda.empty_cache()
        rows.append(row)
        if progress is not None:
            progress(rows)
    def kind(row):  # the default each variant is compared with: eager, compiled, compiled with the cache kept
        return "compiled" in row["variant"], row.get("past_key_values") == KEPT

    baselines = {kind(r): r.get("ms") for r in rows if r["variant"].startswith("default")}
    for row in rows:
        base = baselines.get(kind(row))
        if "ms" in row and base:
            row["ratio"] = row["ms"] / base
    # Bits: the eager switch against the dispatch mode, every other switch
    # variant against the eager switch (a compiled model gives eager's tokens).
    for name in tokens:
        ref = "dispatch mode" if name == "process-wide switch" else "process-wide switch"
        if name.startswith("process-wide switch") and ref in tokens:
            next(r for r in rows if r["variant"] == name)["same_tokens_as"] = {
                ref: bool(torch.equal(tokens[ref], tokens[name]))}
    return rows


def run(out: Path, console, frameworks=("torch", "jax"), quick: bool = False) -> list[Path]:
    """The torch per-call host cost, the JAX decoder's generation
    (``bench.jax_generation``) and the torch Llama's generation, each where
    its framework is asked for and sees the GPU; ``host_cost.json`` is
    rewritten after each part and each generation variant (a run cut short
    keeps what it measured). ``quick``: the generation variants that the
    targets compare only (the defaults and the switch, eager and compiled)."""
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    path = out / "host_cost.json"
    result: dict = {}

    def save():
        path.write_text(json.dumps(result, indent=1))

    if "torch" in frameworks:
        import torch

        result.update(torch=torch.__version__, device=torch.cuda.get_device_name())
        ops = measure_ops()
        result["ops"] = ops
        save()
        table = Table(title=f"host cost per call, us (torch {torch.__version__}, {torch.cuda.get_device_name()})")
        for col in ("op", "default", "bi_ direct", "bi_ full path", "dispatch mode", "process-wide"):
            table.add_column(col, justify="left" if col == "op" else "right")
        for r in ops:
            def cell(key):
                return f"{r[key + '_us']:.1f} ({r[key + '_ratio']:.2f}x)" if key + "_us" in r else "-"
            table.add_row(r["op"], f"{r['default_us']:.1f}", cell("bi_direct"), cell("bi_full_path"),
                          cell("dispatch_mode"), cell("process_wide"))
        console.print(table)
    if "jax" in frameworks:
        import jax

        if jax.default_backend() != "gpu":
            console.print(f"JAX generation skipped: JAX runs on {jax.default_backend()} here (install the cuda13 "
                          "extra for its GPU plugin)")
        else:
            from bench import jax_generation

            rows = jax_generation.measure()
            result.update(jax=jax.__version__, jax_device=str(jax.devices()[0]), jax_generation=rows)
            save()
            table = Table(title=f"JAX decoder generation (hidden 2048, 4 layers, bf16), B = 32, 24 new tokens "
                                f"(jax {jax.__version__})")
            for col in ("variant", "ms", "min-max", "ratio", "same tokens as jit"):
                table.add_column(col, justify="left" if col == "variant" else "right")
            for r in rows:
                table.add_row(r["variant"], f"{r['ms']:.1f}", "{:.1f}-{:.1f}".format(*r["spread_ms"]),
                              f"{r['ratio']:.2f}x" if "ratio" in r else "-", str(r.get("same_tokens_as_jit", "-")))
            console.print(table)
    if "torch" in frameworks:
        def progress(rows):
            result["generation"] = rows
            save()

        gen = measure_generation(progress=progress, only=QUICK_VARIANTS if quick else None)
        table = Table(title="Llama generation (hidden 2048, 4 layers, bf16), B = 32, 24 new tokens")
        for col in ("variant", "ms", "ratio", "same tokens as"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in gen:
            table.add_row(r["variant"], f"{r['ms']:.1f}" if "ms" in r else r["error"],
                          f"{r['ratio']:.2f}x" if "ratio" in r else "-",
                          ", ".join(f"{k}: {v}" for k, v in r.get("same_tokens_as", {}).items()) or "-")
        console.print(table)
    save()
    return [path]

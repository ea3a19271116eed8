"""Every Triton kernel that the torch ops launch passes Triton's front end
for a Hopper target, with the arguments and constants it is launched with;
every bi_jax op lowers for a CUDA H100 (its Pallas kernels to Triton IR).

The CPU suite runs the kernels in Triton's interpreter, which executes the
kernel's Python as Python: code that the compiler refuses (a kernel reading a
plain global, a Python construct Triton does not lower) passes there and
fails only on a GPU. This test records each launch the ops make in the
interpreter (forward and backward of every op spec, and the attention entry
points the specs do not reach) and lowers each distinct one to Triton IR
(``ASTSource.make_ir``, no GPU needed) in a process without the interpreter,
which patches ``triton.language`` for itself. It covers the constants that
small problems select; paths only large problems take (split rows, TMA
descriptors) are left to the GPU run.

For JAX the same holds of the Pallas interpreter; there each op (forward,
and backward through ``jax.vjp``) is lowered with ``lowering_platforms=
("cuda",)`` under an abstract H100 (``jax.sharding.AbstractDevice``), with the
kernels' interpreter switched off, in a process of its own: Pallas lowers
each kernel to Triton IR (or Mosaic GPU) there, no GPU needed. (Which matmul
kernel runs is chosen as on a GPU:
the Mosaic GPU one for bf16/fp16 products past 32 rows, lowered too.)
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests_profile import PROFILE

pytestmark = pytest.mark.skipif(PROFILE.native, reason="the GPU compiles every launch itself")

_POINTER = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int32": "i32",
            "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid"}


def _describe(fn, args, kwargs) -> dict | None:
    """A launch as (module, kernel, signature, constants); None for an
    argument this test cannot describe (tensor descriptors)."""
    import torch

    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
    bound.apply_defaults()
    signature, constants = {}, {}
    for name, value in bound.arguments.items():
        if "constexpr" in str(params[name].annotation) or value is None:
            signature[name] = "constexpr"
            constants[name] = value.value if hasattr(value, "value") else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            return None
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constants": constants}


def _launches() -> tuple[list[dict], set[tuple[str, str]]]:
    """The distinct launches of the torch ops on small problems, and the
    module-level kernels (``*_kernel``) of ``bi_torch.ops``."""
    import importlib
    import pkgutil

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import bi_torch
    import bi_torch.ops
    from harness import grads, registry
    from harness.frameworks import adapter

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        rec = _describe(self.fn, args, kwargs)
        if rec is not None:
            seen.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        ad = adapter("torch")
        for spec in registry.all_specs():
            if spec.impl("torch") is None:
                continue
            for features in (8, 257):
                features = min(features, spec.max_features or features)
                for dtype in ("float32", "bfloat16"):
                    inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), 3, features, dtype))
                    ad.kernel(spec)(**inputs, **spec.call_kwargs("torch"))
        for op, wrt, framework in grads.cases():
            if framework != "torch":
                continue
            spec = registry.get(op)
            inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), 2, min(40, spec.max_features or 40),
                                                 "bfloat16"))
            grads.grad_function(ad, spec, wrt)(**inputs, **spec.call_kwargs("torch"))
        _other_entry_points(torch, bi_torch)
    finally:
        InterpretedFunction.run = run

    from bi_torch._launch import fast

    kernels = set()
    for info in pkgutil.iter_modules(bi_torch.ops.__path__):
        module = importlib.import_module(f"bi_torch.ops.{info.name}")
        for name, value in vars(module).items():
            fn = getattr(value.kernel if isinstance(value, fast) else value, "fn", None)
            if name.endswith("_kernel") and fn is not None and fn.__module__ == module.__name__:
                kernels.add((module.__name__, name))
    return list(seen.values()), kernels


def _other_entry_points(torch, bi_torch) -> None:
    """What the op specs do not call: paged (decode, chunked prefill with new
    keys), varlen and masked SDPA attention, split keys, segmented rows, the
    embedding's gradient."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 48, generator=gen).to(torch.bfloat16).requires_grad_()
    ids = torch.tensor([[3, 1, 3], [0, 9, 3]])
    torch.autograd.grad(bi_torch.embedding(ids, rows), rows, torch.ones(2, 3, 48, dtype=torch.bfloat16))
    hq, hkv, d, page = 4, 2, 64, 16
    kc, vc = (torch.randn(6, page, hkv, d, generator=gen, dtype=torch.float32).to(torch.bfloat16) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([20, 33], dtype=torch.int32)
    q = torch.randn(2, 1, hq, d, generator=gen).to(torch.bfloat16)
    bi_torch.paged_attention(q, kc, vc, table, lens)
    q3 = torch.randn(2, 3, hq, d, generator=gen).to(torch.bfloat16)
    new = torch.randn(2, 3, hkv, d, generator=gen).to(torch.bfloat16)
    bi_torch.paged_attention(q3, kc, vc, table, lens, k_new=new, v_new=new.clone())
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    qv = torch.randn(12, hq, d, generator=gen).to(torch.bfloat16)
    kv = torch.randn(12, hkv, d, generator=gen).to(torch.bfloat16)
    bi_torch.varlen_attention(qv, kv, kv.clone(), cu, cu, 7, 7, causal=True)
    qs = torch.randn(1, hq, 9, d, generator=gen)
    ks = torch.randn(1, hq, 9, d, generator=gen)
    mask = torch.rand(1, 1, 9, 9, generator=gen) > 0.3
    bi_torch.scaled_dot_product_attention(qs, ks, ks.clone(), attn_mask=mask)
    bi_torch.scaled_dot_product_attention(qs, ks, ks.clone(), attn_mask=torch.randn(1, hq, 9, 9, generator=gen))
    # Keys in two splits, each program writing a partial for the merge kernel.
    kl = torch.randn(1, 600, hkv, d, generator=gen).to(torch.bfloat16)
    bi_torch.attention(q[:1], kl, kl.clone(), split_kv=True)
    # softmax and log_softmax by segments (the long rows' strategy), forced on short rows.
    from bi_torch.ops import rows

    x = torch.randn(1, 17000, generator=gen)  # three chunks of 8192
    for op in ("softmax", "log_softmax"):
        rows.launch(op, x, torch.empty_like(x), split=True)


_LOWER = """
import importlib, json, sys
import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from bi_torch._launch import fast

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})
failures = []
for rec in json.load(sys.stdin):
    obj = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    fn = obj.kernel if isinstance(obj, fast) else obj
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    try:
        source = ASTSource(fn=fn, signature=rec["signature"], constexprs=rec["constants"])
        source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                       context)
    except Exception as e:
        failures.append(f"{rec['module']}.{rec['kernel']} {rec['constants']}: {str(e)[-800:]}")
print(json.dumps(failures))
"""


# Kernels that take TMA tensor descriptors, which only a GPU makes: the GPU
# suite's matmul properties compile them.
_GPU_ONLY = {("bi_torch.ops.matmul", "_matmul_tma_kernel")}


def test_every_torch_kernel_lowers_for_hopper():
    pytest.importorskip("torch")
    pytest.importorskip("triton.backends.nvidia.compiler")
    launches, kernels = _launches()
    launched = {(rec["module"], rec["kernel"]) for rec in launches}
    assert kernels and kernels - _GPU_ONLY <= launched, f"kernels no small problem launches: {sorted(kernels - launched)}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _LOWER], input=json.dumps(launches), capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    failures = json.loads(run.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)


_LOWER_JAX = """
import numpy as np

import sys

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh

import bi_jax
import bi_jax.ops.attention_grad
import bi_jax.ops.embedding
from harness import grads, registry
from harness.frameworks import adapter

for name, module in list(sys.modules.items()):  # compiled kernels: the interpreter off wherever it is asked
    if name.startswith("bi_jax") and hasattr(module, "interpret_mode"):
        module.interpret_mode = lambda op: False
bi_jax.ops.matmul._num_sms = lambda: 132  # the H100's (the Mosaic GPU matmul's persistent grid)

h100 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                                          platform="cuda"))
ad = adapter("jax")
failures, lowered = [], 0


def lower(label, fn, *args, kernel=True):
    global lowered
    try:
        with jax.sharding.use_abstract_mesh(h100):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        if kernel and "triton" not in text and "mosaic_gpu" not in text:
            failures.append(f"{label}: no GPU kernel in the lowered module")
        lowered += 1
    except Exception as e:
        failures.append(f"{label}: {type(e).__name__}: {str(e)[:600]}")


for spec in registry.all_specs():
    if spec.impl("jax") is None:
        continue
    kw = spec.call_kwargs("jax")
    for features in (8, 257):
        features = min(features, spec.max_features or features)
        for dtype in ("float32", "bfloat16"):
            inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), 40, features, dtype))
            # (embedding's forward is XLA's gather: no kernel of its own)
            lower(f"{spec.name} {features} {dtype}", lambda inp, fn=ad.kernel(spec): fn(**inp, **kw), inputs,
                  kernel=spec.name != "embedding")
for op, wrt, framework in grads.cases():
    if framework != "jax":
        continue
    spec = registry.get(op)
    kw = spec.call_kwargs("jax")
    inputs = ad.natives(spec.make_inputs(np.random.default_rng(0), 3, min(40, spec.max_features or 40), "bfloat16"))
    lower(f"{op} grad {wrt}", lambda inp, fn=grads.grad_function(ad, spec, wrt): fn(**inp, **kw), inputs)
ids = jnp.asarray([[3, 1, 3], [0, 9, 3]], jnp.int32)
table = jnp.ones((10, 48), jnp.bfloat16)
lower("embedding grad", lambda t: jax.vjp(lambda t: bi_jax.embedding(ids, t), t)[1](jnp.ones((2, 3, 48), t.dtype)),
      table)
cache = jnp.ones((6, 16, 2, 64), jnp.bfloat16)
q = jnp.ones((2, 3, 4, 64), jnp.bfloat16)
table_ = jnp.asarray([[0, 1, 2], [3, 4, 5]], jnp.int32)
lens = jnp.asarray([20, 33], jnp.int32)
lower("paged_attention", lambda q: bi_jax.paged_attention(q, cache, cache, table_, lens), q)
cu = jnp.asarray([0, 5, 12], jnp.int32)
packed = jnp.ones((12, 4, 64), jnp.bfloat16)
lower("varlen_attention", lambda x: bi_jax.varlen_attention(x, x[:, :2], x[:, :2], cu, cu, 7, 7, causal=True), packed)
lower("dot_product_attention mask", lambda x: bi_jax.dot_product_attention(
    x, x, x, mask=jnp.tril(jnp.ones((9, 9), bool))[None, None]), jnp.ones((1, 9, 4, 64), jnp.float32))
print("LOWERED", lowered)
import json
print(json.dumps(failures))
"""


def test_every_jax_op_lowers_for_a_cuda_h100():
    pytest.importorskip("jax")
    env = {k: v for k, v in os.environ.items() if k != "BI_JAX_INTERPRET"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, "-c", _LOWER_JAX], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    failures = json.loads(lines[-1])
    assert not failures, "\n".join(failures)
    assert int(lines[-2].split()[1]) > 20

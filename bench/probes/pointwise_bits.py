"""Do Inductor's fused pointwise kernels give eager's bits? (GPU)::

    python -m bench.probes.pointwise_bits [--out DIR]

``bi_torch.compile_backend(fuse=False)`` runs every op that no bi_ kernel
takes through its own ATen kernel, so that a compiled model gives eager's
bits; in a decode step that is most of the graph's kernels (an HF Llama
layer: about 40 nodes against about 15 fused). ``fuse=True`` lets Inductor
fuse them. Pointwise ops are invariant in the batch either way; the question
is their rounding. For each op and composite of a Llama layer, each input
dtype, and each Inductor setting below: the number of elements whose bits
differ between eager and the compiled function, over every bf16 / fp16 value
(all 65536 bit patterns, NaNs included) and 2**22 random fp32 values with
the specials. Settings: ``fused``, ``compile_backend(fuse=True)`` without
``eager_numerics.division_rounding`` (``div_rn``) and ``disable_ftz``
(``emulate_precision_casts`` on, so no FMA contraction); ``eager-div``,
``fuse=True`` as it is (with them); ``exact``, ``fuse="exact"`` (the ops of
``bi_torch.compile._EXACT_POINTWISE`` fused, the rest on ATen).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bi_torch
from bench.probes._log import jsonl_emitter

SETTINGS = {  # setting: compile_backend's arguments
    "fused": {"fuse": True, "options": {"eager_numerics.division_rounding": False,
                                        "eager_numerics.disable_ftz": False}},
    "eager-div": {"fuse": True},
    "exact": {"fuse": "exact"},
}


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _hf_rms_norm(x, w):
    # transformers' LlamaRMSNorm.forward (the mean runs bi_'s kernel in both)
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + 1e-6)
    return w * h.to(x.dtype)


def _rope(q, cos, sin):
    return q * cos + _rotate_half(q) * sin


def _rope_tables(pos, inv_freq, dtype):
    # transformers' rotary embedding: the angles in fp32, cos and sin cast to the activations' dtype
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


UNARY = {
    "exp": torch.exp, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "sin": torch.sin, "cos": torch.cos,
    "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu, "tanh": torch.tanh, "log": torch.log,
    "reciprocal": torch.reciprocal, "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "div_by_3": lambda x: x / 3.0, "mul_add": lambda x: x * 1.7 + 0.3,
}


def _every_value(dtype, device):
    if dtype == torch.float32:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1 << 22, device=device, generator=g) * torch.exp2(
            torch.randint(-40, 40, (1 << 22,), device=device, generator=g).float())
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-38],
                                device=device)
        return torch.cat((x, specials))
    bits = torch.arange(-32768, 32768, dtype=torch.int32, device=device).to(torch.int16)
    return bits.view(dtype)


def _differing(a, b) -> int:
    """Elements whose bits differ, a NaN against a NaN of another payload or
    sign not counted."""
    bits = {2: torch.int16, 4: torch.int32}[a.dtype.itemsize]
    return int(((a.view(bits) != b.view(bits)) & ~(a.isnan() & b.isnan())).sum())


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.pointwise_bits", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    args = p.parse_args()
    emit = jsonl_emitter(args.out, "pointwise_bits")
    dev = args.device
    torch.manual_seed(0)
    for setting in args.settings.split(","):
        backend = bi_torch.compile_backend(**SETTINGS[setting])
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = _every_value(dtype, dev)
            for name, fn in UNARY.items():
                torch._dynamo.reset()
                try:
                    got = torch.compile(fn, backend=backend, fullgraph=True)(x)
                    emit({"setting": setting, "dtype": str(dtype), "op": name, "elements": x.numel(),
                          "differing": _differing(fn(x), got)})
                except Exception as e:  # noqa: BLE001 - reported, the other ops still run
                    emit({"setting": setting, "dtype": str(dtype), "op": name, "error": repr(e)[:300]})
            if dtype == torch.float32:
                continue
            # The composites of a Llama decode step, at its sizes (32 rows of 2048; 32 heads of 128).
            h = torch.randn(32, 2048, device=dev, dtype=dtype) * 3
            w = torch.randn(2048, device=dev, dtype=dtype)
            q = torch.randn(32, 32, 128, device=dev, dtype=dtype)
            pos = torch.arange(32, device=dev) * 37
            inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
            cos, sin = _rope_tables(pos, inv_freq, dtype)
            gate, up = torch.randn(2, 32, 5632, device=dev, dtype=dtype) * 4
            composites = {
                "hf_rms_norm": (_hf_rms_norm, (h, w)),
                "rope_tables": (lambda p_, f_: _rope_tables(p_, f_, dtype), (pos, inv_freq)),
                "rope": (_rope, (q, cos[:, None], sin[:, None])),
                "swiglu": (lambda g_, u_: torch.nn.functional.silu(g_) * u_, (gate, up)),
                "residual_add": (torch.add, (h, h * 0.5)),
            }
            for name, (fn, inputs) in composites.items():
                torch._dynamo.reset()
                try:
                    # (the switch compiles with its own backend: this one)
                    with bi_torch.enable_batch_invariant_mode(compile_backend=backend):
                        want = fn(*inputs)
                        got = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
                    want, got = (t if isinstance(t, tuple) else (t,) for t in (want, got))
                    emit({"setting": setting, "dtype": str(dtype), "op": name,
                          "elements": sum(t.numel() for t in want),
                          "differing": sum(_differing(a, b) for a, b in zip(want, got))})
                except Exception as e:  # noqa: BLE001
                    emit({"setting": setting, "dtype": str(dtype), "op": name, "error": repr(e)[:300]})


if __name__ == "__main__":
    main()

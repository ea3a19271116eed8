"""``silu_and_mul``: SwiGLU's gated activation ``SiLU(g) * u`` of a fused
``[g | u]`` input, with the arithmetic of ``bi_core.activation`` (the same
bits as ``bi_jax.silu_and_mul`` on the GPU).

Each output element depends on its own gate and up values only, so the
batch cannot change it; the kernel exists to fix the exponential, the
division and the roundings, which torch's eager kernels and XLA's fusions
choose differently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bi_core.activation import (
    NEG_LOG2E,
    SILU_MUL_ASM,
    SILU_MUL_GRAD_GATE_ASM,
    SILU_MUL_GRAD_UP_ASM,
    block_for,
    check_gated_width,
)
from bi_torch import direct as _direct
from bi_torch._checks import canonical, check_float_tensor, check_launchable, interpreting
from bi_torch._launch import cdiv, fast

__all__ = ["silu_and_mul"]

_SILU_MUL_ASM = tl.constexpr(SILU_MUL_ASM)
_NEG_LOG2E = tl.constexpr(NEG_LOG2E)
_GRAD_GATE_ASM = tl.constexpr(SILU_MUL_GRAD_GATE_ASM)
_GRAD_UP_ASM = tl.constexpr(SILU_MUL_GRAD_UP_ASM)


@triton.jit
def _silu_mul(g, u, PTX: tl.constexpr):
    """``g / (1 + 2 ** (g * -log2 e)) * u`` in fp32 (bi_core.activation)."""
    if PTX:
        return tl.inline_asm_elementwise(_SILU_MUL_ASM, "=r,r,r", [g, u], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return g / (1.0 + tl.exp2(g * _NEG_LOG2E)) * u


@fast
@triton.jit
def _silu_and_mul_kernel(X, Y, n, BLOCK: tl.constexpr, PTX: tl.constexpr):
    """Program (row, c): outputs ``c * BLOCK ...`` of one row of ``X``
    (rows of ``2 n``: gate then up) into ``Y`` (rows of ``n``)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    x_row = X + row * (2 * n)
    g = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_row + n + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * n + cols, _silu_mul(g, u, PTX).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _grads(g, u, c, PTX: tl.constexpr):
    """The gradients of ``g`` and ``u`` for the output gradient ``c``
    (bi_core.activation)."""
    if PTX:
        dg = tl.inline_asm_elementwise(_GRAD_GATE_ASM, "=r,r,r,r", [g, u, c], dtype=tl.float32, is_pure=True, pack=1)
        du = tl.inline_asm_elementwise(_GRAD_UP_ASM, "=r,r,r", [g, c], dtype=tl.float32, is_pure=True, pack=1)
    else:
        d = 1.0 + tl.exp2(g * _NEG_LOG2E)
        s = 1.0 / d
        dg = (c * u) * (s * (1.0 + g * (1.0 - s)))
        du = c * (g / d)
    return dg, du


@fast
@triton.jit
def _silu_and_mul_grad_kernel(X, C, DX, n, BLOCK: tl.constexpr, PTX: tl.constexpr):
    """Program (row, c): the gradients of one row's ``[g | u]`` columns
    ``c * BLOCK ...`` (and ``n + ...``) for the output gradient ``C``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(X + row * (2 * n) + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * (2 * n) + n + cols, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + row * n + cols, mask=ok, other=0.0).to(tl.float32)
    dg, du = _grads(g, u, c, PTX)
    tl.store(DX + row * (2 * n) + cols, dg.to(DX.dtype.element_ty), mask=ok)
    tl.store(DX + row * (2 * n) + n + cols, du.to(DX.dtype.element_ty), mask=ok)


def _launch_options(n: int) -> tuple[int, dict]:
    block = block_for(n)
    return block, {"BLOCK": block, "PTX": not interpreting(), "num_warps": 4 if block >= 512 else 1}


def launch(x2d: torch.Tensor, out: torch.Tensor) -> None:
    """The kernel over ``x2d`` (rows, 2 n), contiguous and aligned, into
    ``out`` (rows, n)."""
    rows, n = out.shape
    if rows == 0 or n == 0:
        return
    block, options = _launch_options(n)
    _silu_and_mul_kernel[(rows, cdiv(n, block))](x2d, out, n, **options)


def _forward(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    if n == 0 or x.numel() == 0:
        return x.new_empty((*x.shape[:-1], n))
    x2d = canonical(x.reshape(-1, 2 * n))
    out = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=x.device)
    launch(x2d, out)
    return out.reshape(*x.shape[:-1], n)


def silu_and_mul_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to ``x = [g | u]`` of ``silu_and_mul(x)`` for
    the output gradient ``grad``: ``[grad * u * s * (1 + g * (1 - s)) |
    grad * silu(g)]`` with ``s = sigmoid(g)``, in fp32 with
    ``bi_core.activation``'s arithmetic (bi_jax's bits), rounded once to
    ``x``'s dtype. Elementwise, so no batch (and no run) changes it."""
    n = x.shape[-1] // 2
    if n == 0 or x.numel() == 0:
        return torch.zeros_like(x)
    x2d = canonical(x.reshape(-1, 2 * n))
    c2d = canonical(grad.reshape(-1, n))
    dx = torch.empty_like(x2d)
    rows = x2d.shape[0]
    if rows:
        block, options = _launch_options(n)
        _silu_and_mul_grad_kernel[(rows, cdiv(n, block))](x2d, c2d, dx, n, **options)
    return dx.reshape(x.shape)


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return silu_and_mul_backward(x, grad)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of a fused ``[gate | up]`` input: for ``x`` of shape
    ``(..., 2 n)``, ``silu(x[..., :n]) * x[..., n:]`` of shape ``(..., n)`` in
    ``x``'s dtype (float32, bfloat16 or float16), computed in fp32 and
    rounded once (``F.silu(g) * u`` in bf16 rounds twice).

    The arithmetic is ``bi_core.activation``'s, so on the GPU the bits equal
    ``bi_jax.silu_and_mul``'s for the same input. Differentiable: the
    backward is an elementwise kernel with the same property
    (:func:`silu_and_mul_backward`)."""
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.silu_and_mul(silu_and_mul, x)
    check_float_tensor("x", x, "silu_and_mul")
    check_gated_width("silu_and_mul", tuple(x.shape))
    check_launchable("silu_and_mul", x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SiluAndMul.apply(x)
    return _forward(x)

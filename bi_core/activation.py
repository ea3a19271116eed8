"""Contract of the gated activation ``silu_and_mul``: SwiGLU's ``SiLU(g) * u``.

The input's last axis holds the gate and the up projection side by side,
``x = [g | u]`` (the fused gate-up product of a Llama MLP); each output
element is computed from its own ``g`` and ``u`` alone, so there is nothing
the batch could change. What this contract fixes is the arithmetic, so that
bi_torch and bi_jax give the same bits: the frameworks' own compilers write
``g / (1 + exp(-g)) * u`` with different exponentials, divisions and
roundings (on an H100, torch's eager kernels and XLA's fusion differed in
one element of 1310 x 14336 in a Llama-3-8B layer, and the two engines' tokens
parted after it).

In fp32, with the inputs widened exactly and one rounding to the output
dtype at the end::

    t = g * (-log2 e)         mul.rn
    e = 2 ** t                ex2.approx
    d = e + 1                 add.rn
    s = g / d                 div.rn  (SiLU(g))
    y = s * u                 mul.rn

written as one PTX block (``SILU_MUL_ASM``) so that both Triton compilers
emit the same instructions. The backward (``SILU_MUL_GRAD_*_ASM``) is written
the same way, so gradients agree between the frameworks too: for the output
gradient ``c``, ``dg = (c * u) * (s * (1 + g * (1 - s)))`` with ``s`` the
correctly rounded reciprocal of the forward's ``d``, and ``du = c * SiLU(g)``
with the forward's ``SiLU(g)``. Under the CPU interpreters the same steps run in
numpy/XLA with their own exponential: bitwise agreement between the
frameworks is a GPU property.
"""

from __future__ import annotations

from bi_core.rms_norm import f32_hex

NEG_LOG2E = -1.4426950408889634
NEG_LOG2E_HEX = f32_hex(NEG_LOG2E)
ONE_HEX = f32_hex(1.0)

# $0 = $1 / (1 + 2 ** ($1 * -log2 e)) * $2
SILU_MUL_ASM = (
    "{ .reg .f32 t; "
    f"mul.rn.f32 t, $1, {NEG_LOG2E_HEX}; ex2.approx.f32 t, t; add.rn.f32 t, t, {ONE_HEX}; "
    "div.rn.f32 t, $1, t; mul.rn.f32 $0, t, $2; }"
)

# The backward, for the output gradient c, with s = 1 / (1 + 2 ** (g * -log2 e))
# (rcp.rn of the forward's denominator):
# $0 = ($3 * $2) * (s * (1 + g * (1 - s))), the gate's gradient ($1 = g, $2 = u, $3 = c)
SILU_MUL_GRAD_GATE_ASM = (
    "{ .reg .f32 t, s, r; "
    f"mul.rn.f32 t, $1, {NEG_LOG2E_HEX}; ex2.approx.f32 t, t; add.rn.f32 t, t, {ONE_HEX}; rcp.rn.f32 s, t; "
    f"sub.rn.f32 t, {ONE_HEX}, s; mul.rn.f32 t, $1, t; add.rn.f32 t, t, {ONE_HEX}; mul.rn.f32 t, s, t; "
    "mul.rn.f32 r, $3, $2; mul.rn.f32 $0, r, t; }"
)
# $0 = $2 * (g / (1 + 2 ** (g * -log2 e))), the up projection's gradient: the
# forward's SiLU(g) exactly ($1 = g, $2 = c)
SILU_MUL_GRAD_UP_ASM = (
    "{ .reg .f32 t; "
    f"mul.rn.f32 t, $1, {NEG_LOG2E_HEX}; ex2.approx.f32 t, t; add.rn.f32 t, t, {ONE_HEX}; "
    "div.rn.f32 t, $1, t; mul.rn.f32 $0, $2, t; }"
)

# Output columns per program (both frameworks; speed only).
BLOCK = 1024


def block_for(n: int) -> int:
    """Columns per program for rows of ``n`` outputs: a power of two, at most
    ``BLOCK``."""
    return min(BLOCK, 1 << max(n - 1, 0).bit_length())


# A launch grid's second axis holds at most 65535 programs of BLOCK outputs.
MAX_WIDTH = 65535 * BLOCK


def check_gated_width(op: str, shape) -> int:
    """The output width ``n`` of an input of ``shape`` (..., 2 n)."""
    if len(shape) == 0:
        raise ValueError(f"{op}: x must have at least one dimension ([gate | up] on the last), got a 0-d input")
    if shape[-1] % 2:
        raise ValueError(f"{op}: the last dimension holds [gate | up] and must be even, got shape {tuple(shape)}")
    if shape[-1] // 2 > MAX_WIDTH:
        raise ValueError(f"{op}: gate and up widths of {shape[-1] // 2} are too wide (at most {MAX_WIDTH}: the "
                         "launch grid's column axis)")
    return shape[-1] // 2

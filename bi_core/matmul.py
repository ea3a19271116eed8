"""Reduction contract and tile dispatch for the matrix product.

The contract: every output element is one fp32 accumulator that starts at zero
and takes the K dimension in increasing order, one tensor-core MMA step after
another (full-precision fp32 runs on FMA units, one k at a time), then adds the
bias in fp32 and rounds once to the output dtype. There is no split-K: nothing
about the order depends on M.

Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages, pointer or TMA
loads, warp specialisation) decide only which output tile a program owns and
how many K steps it loads per iteration. On Hopper they do not change the bits
(shown for every config that ``tile_config`` can return by
``tests/test_matmul.py::test_every_config_gives_the_same_bits`` on the GPU), so
they are chosen from M and N for speed: thin tiles that spread the weight
stream over every SM when M is small, large tiles when M is large.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("ieee", "tf32")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    # Persistent kernel with TMA descriptors (2-D operands with 16-byte aligned
    # rows); else, or when the operands do not qualify, the pointer kernel.
    tma: bool = False
    warp_specialize: bool = False

    def __str__(self) -> str:
        kind = ("_tma" + ("_ws" if self.warp_specialize else "")) if self.tma else ""
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k}"
            f"_w{self.num_warps}_s{self.num_stages}_g{self.group_m}{kind}"
        )


T = TileConfig

# bf16/fp16 tensor-core configs: (largest M, {largest N: config}). Thin tiles
# at small M spread the weight stream over every SM; the persistent TMA kernel
# takes over from M = 33. Chosen from the H100 sweep of bench/probes/tune_matmul.py
# (bench/NOTES.md, "Matmul").
_NARROW_N = 8192  # weights up to this many output columns use the narrow tiles
MMA_TABLE: tuple[tuple[int, TileConfig, TileConfig], ...] = (
    # (largest M, config for N <= _NARROW_N, config for wider N)
    (16, T(16, 32, 128, 4, 6, 1), T(16, 64, 128, 4, 6, 1)),
    # Wide weights at M = 17-32: 64x64x128 with 5 stages was 175.4 against 179.7 us
    # (64x64x256, 3 stages) at 8192x28672 on an H100 (bench/NOTES.md, "Matmul mid M").
    # A TMA tile (64x128x128) was faster still, 171 us, but the JAX Triton path
    # that shares this row has pointer loads only.
    (32, T(64, 32, 256, 4, 4, 1), T(64, 64, 128, 4, 5, 1)),
    (64, T(64, 32, 256, 4, 4, 1, tma=True), T(64, 128, 128, 4, 4, 1, tma=True)),
    # 6 stages at M <= 128 (bench/NOTES.md, "Matmul mid M"): 4096x4096 at M = 128
    # 16.6 -> 15.1 us on an H100, 0.90x -> 0.99x of cuBLAS.
    (128, T(64, 64, 128, 4, 6, 8), T(64, 256, 64, 4, 4, 8, tma=True)),
    (256, T(64, 128, 128, 4, 4, 8, tma=True), T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True)),
    (512, T(64, 256, 64, 4, 4, 8, tma=True), T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True)),
    (2048, T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True),
     T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True)),
    (1 << 62, T(128, 256, 64, 8, 4, 8, tma=True), T(128, 256, 64, 8, 4, 8, tma=True)),
)

# fp32 with tf32 allowed: half the K tile of the 16-bit configs (same bytes per
# stage), pointer kernel.
TF32_TABLE: tuple[tuple[int, TileConfig, TileConfig], ...] = (
    (16, T(16, 32, 64, 4, 5, 1), T(16, 64, 64, 4, 5, 1)),
    (64, T(64, 32, 128, 4, 4, 1), T(64, 64, 64, 4, 4, 1)),
    (1 << 62, T(128, 128, 32, 8, 3, 8), T(128, 128, 32, 8, 3, 8)),
)

# Full-precision fp32 runs on FMA units: register tiles, no tensor cores.
FMA_TABLE: tuple[tuple[int, TileConfig, TileConfig], ...] = (
    (16, T(16, 64, 32, 4, 3, 1), T(16, 64, 32, 4, 3, 1)),
    (1 << 62, T(64, 64, 32, 4, 3, 8), T(64, 64, 32, 4, 3, 8)),
)


def _table(dtype: str, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype == "float32":
        return TF32_TABLE if precision == "tf32" else FMA_TABLE
    return MMA_TABLE


# Under the CPU interpreter the tile only sets how much numpy work one program
# does: small tiles keep CI fast and still cross tile edges. One config for
# every M, because numpy's own products are not invariant across the two
# kernels' operand layouts; tests run the TMA kernel separately.
INTERPRET_CONFIG = TileConfig(16, 32, 32, 4, 1, 2)
INTERPRET_TMA_CONFIG = TileConfig(16, 32, 32, 4, 1, 2, tma=True)


def precision_of(dtype: str, allow_tf32: bool) -> str:
    """The K-step arithmetic: ``tf32`` only for fp32 inputs when the user allowed it."""
    if dtype == "float32":
        return "tf32" if allow_tf32 else "ieee"
    return "ieee"  # bf16/fp16 tensor-core products are exact in fp32; the flag is unused


def configs(dtype: str, precision: str) -> tuple[TileConfig, ...]:
    """Every config the dispatch can pick for this dtype and arithmetic (the GPU
    test proves that each gives the same bits)."""
    seen: dict[TileConfig, None] = {}
    for _, narrow, wide in _table(dtype, precision):
        seen.setdefault(narrow)
        seen.setdefault(wide)
    return tuple(seen)


# At M = 17-32 the narrow tiles (64x32) are taken only where their CTAs fill
# the GPU: one partial wave, or a last wave at least this full. On the H200
# (132 SMs) a 2048x5632 weight at M = 32 gives 176 CTAs of 64x32 (two waves,
# the second a third full): 13.2 us, against 9.2 us for 88 CTAs of 64x64
# (bench/NOTES.md, "Matmul at M = 17-32 on the H200").
_WAVE_FILL = 0.9


def _fills_waves(ctas: int, sms: int) -> bool:
    waves = -(-ctas // sms)
    return waves <= 1 or ctas / (waves * sms) >= _WAVE_FILL


def tile_config(m: int, n: int, dtype: str, precision: str, sms: int | None = None) -> TileConfig:
    """The tile config for ``m`` rows and ``n`` output columns on a GPU of
    ``sms`` SMs (None: the SM count is not used). Speed only: every choice
    gives the same bits, see the module doc."""
    for bound, narrow, wide in _table(dtype, precision):
        if m <= bound:
            if n > _NARROW_N:
                return wide
            if sms and bound == 32 and dtype != "float32" and \
                    not _fills_waves(-(-m // narrow.block_m) * -(-n // narrow.block_n), sms):
                return wide
            return narrow
    raise AssertionError("unreachable: the last bound is unbounded")


# --- Mosaic GPU (JAX, Hopper wgmma) configs for bf16/fp16 -------------------


@dataclass(frozen=True)
class WgmmaConfig:
    """Tile config of the JAX Mosaic GPU kernel (``bi_jax.matmul``, bf16/fp16).

    A CTA has ``compute_wgs`` compute warpgroups (plus one TMA warpgroup); each
    owns a ``block_m x block_n`` fp32 wgmma accumulator, side by side along N.
    ``block_k`` columns of K are loaded per pipeline step, ``stages`` steps in
    flight. Like ``TileConfig`` it changes only speed: every wgmma takes 16
    values of K in increasing order into the same accumulator.
    """

    block_m: int
    block_n: int
    block_k: int
    stages: int
    compute_wgs: int = 1
    group: int = 8  # output tiles per band of the grouped (snake) order

    @property
    def cta_m(self) -> int:
        return self.block_m

    @property
    def cta_n(self) -> int:
        return self.block_n * self.compute_wgs

    def __str__(self) -> str:
        return f"wg{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}_c{self.compute_wgs}_g{self.group}"


W = WgmmaConfig

# From the H100 sweeps of ``python -m bench.probes.jax_matmul_configs --configs ...``
# (bench/NOTES.md, "JAX matmul" and "Matmul mid M"; data in
# bench/results/h100/matmul_jax/). Mid M wants every SM busy: at 14336 columns
# and M = 128, 128x256 CTAs make 56 tiles for 132 SMs and 128x128 CTAs 112; and
# the plain snake (group 1) beat bands of 8 tiles from M = 256 to 512.
WGMMA_TABLE: tuple[tuple[int, WgmmaConfig, WgmmaConfig], ...] = (
    # (largest M, config for N <= _NARROW_N, config for wider N)
    (64, W(64, 64, 128, 8, 1, 1), W(64, 128, 64, 5, 2, 8)),
    (128, W(64, 64, 128, 8, 1, 1), W(128, 64, 64, 5, 2, 8)),
    (256, W(64, 64, 64, 8, 2, 1), W(128, 128, 64, 4, 2, 1)),
    (512, W(128, 64, 64, 5, 2, 1), W(128, 128, 64, 4, 2, 1)),
    (1 << 62, W(128, 128, 64, 4, 2, 8), W(128, 128, 64, 4, 2, 8)),
)

# The Mosaic GPU interpreter runs the same program on numpy; small tiles keep
# CI fast while still crossing tile and K-step edges.
INTERPRET_WGMMA_CONFIG = WgmmaConfig(64, 32, 32, 2, 2, 2)


# bf16/fp16 in JAX up to this many rows run bi_torch's own thin-tile Triton
# program (through Pallas's Triton backend) instead of the Mosaic GPU kernel:
# at small M the product streams the weight, and wgmma's 64-row tiles leave a
# 4096-wide weight only 64 CTAs (bench/NOTES.md, "JAX matmul"). Up to this many
# columns: on an H100 the Triton tiles were faster at N = 4096 and 14336
# (1.05-1.19x against 0.67-0.88x of jnp.dot at 4096x4096), the Mosaic kernel at
# N = 28672 (160-165 us against 168-173 us). Both kernels give the same bits.
JAX_TRITON_MAX_M = 32
JAX_TRITON_MAX_N = 16384


def jax_triton_configs() -> tuple[TileConfig, ...]:
    """The bi_torch configs that the JAX bf16/fp16 dispatch can pick for
    ``m <= JAX_TRITON_MAX_M`` (pointer kernels only)."""
    seen: dict[TileConfig, None] = {}
    for bound, narrow, wide in MMA_TABLE:
        if bound <= JAX_TRITON_MAX_M:
            seen.setdefault(narrow)
            seen.setdefault(wide)
    assert not any(c.tma for c in seen), "the Pallas Triton kernel has pointer loads only"
    return tuple(seen)


def wgmma_configs() -> tuple[WgmmaConfig, ...]:
    """Every config the JAX bf16/fp16 dispatch can pick."""
    seen: dict[WgmmaConfig, None] = {}
    for _, narrow, wide in WGMMA_TABLE:
        seen.setdefault(narrow)
        seen.setdefault(wide)
    return tuple(seen)


def wgmma_config(m: int, n: int) -> WgmmaConfig:
    """The Mosaic GPU tile config for ``m`` rows and ``n`` columns (speed only)."""
    for bound, narrow, wide in WGMMA_TABLE:
        if m <= bound:
            return narrow if n <= _NARROW_N else wide
    raise AssertionError("unreachable: the last bound is unbounded")

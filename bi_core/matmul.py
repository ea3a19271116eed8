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

# The tables: rows of (largest M, configs), one config per column class, the
# i-th serving weights of up to COLUMNS[i] output columns (the last class is
# unbounded). Llama-shaped weights fall in every class: 4096 (the 8B's
# projections), 8192 (the 70B's), 14336 and 28672 (their MLPs).
COLUMNS = (4096, 8192, 16384, 1 << 62)

# bf16/fp16 tensor-core configs. Thin tiles at small M spread the weight
# stream over every SM; the persistent TMA kernel takes over from M = 33.
# Chosen from the H100 sweeps of bench/probes/tune_matmul.py (bench/NOTES.md,
# "Matmul", "Matmul mid M" and "Matmul: column classes").
_THIN_NARROW = T(16, 32, 128, 4, 6, 1)
_THIN = T(16, 64, 128, 4, 6, 1)
_MID_NARROW = T(64, 32, 256, 4, 4, 1)
# 64x64x128 with 5 stages was 175.4 against 179.7 us (64x64x256, 3 stages) at
# 8192x28672 and M = 32 on an H100 (bench/NOTES.md, "Matmul mid M").
_MID = T(64, 64, 128, 4, 5, 1)
_MID_TMA = T(64, 128, 128, 4, 4, 1, tma=True)
_WIDE_WS = T(128, 256, 64, 8, 3, 8, tma=True, warp_specialize=True)
_SQUARE_WS = T(128, 128, 64, 4, 5, 8, tma=True, warp_specialize=True)
MMA_TABLE: tuple[tuple[int, tuple[TileConfig, ...]], ...] = (
    # (largest M, (N <= 4096, N <= 8192, N <= 16384, wider))
    (16, (_THIN_NARROW, _THIN, _THIN, _THIN)),
    # The Pallas Triton kernel of bi_jax shares the rows up to JAX_TRITON_MAX_M
    # for N <= JAX_TRITON_MAX_N: pointer loads there.
    (32, (_MID_NARROW, _MID, _MID, _MID_TMA)),
    (64, (T(64, 32, 256, 4, 4, 1, tma=True), _MID_TMA, _MID_TMA, _MID_TMA)),
    # 6 stages at M <= 128 (bench/NOTES.md, "Matmul mid M"): 4096x4096 at M = 128
    # 16.6 -> 15.1 us on an H100, 0.90x -> 0.99x of cuBLAS.
    (128, (T(64, 64, 128, 4, 6, 8), T(64, 128, 128, 4, 4, 8, tma=True), T(64, 256, 64, 4, 4, 8, tma=True),
           _WIDE_WS)),
    (256, (T(64, 128, 128, 4, 4, 8, tma=True), _SQUARE_WS, _WIDE_WS, _WIDE_WS)),
    (512, (_SQUARE_WS, _SQUARE_WS, _WIDE_WS, _SQUARE_WS)),
    (1024, (_WIDE_WS, _WIDE_WS, _SQUARE_WS, _WIDE_WS)),
    (2048, (_WIDE_WS,) * 4),
    (1 << 62, (T(128, 256, 64, 8, 4, 8, tma=True),) * 4),
)

# fp32 with tf32 allowed: half the K tile of the 16-bit configs (same bytes per
# stage), pointer kernel.
TF32_TABLE: tuple[tuple[int, tuple[TileConfig, ...]], ...] = (
    (16, (T(16, 32, 64, 4, 5, 1),) * 2 + (T(16, 64, 64, 4, 5, 1),) * 2),
    (64, (T(64, 32, 128, 4, 4, 1),) * 2 + (T(64, 64, 64, 4, 4, 1),) * 2),
    (1 << 62, (T(128, 128, 32, 8, 3, 8),) * 4),
)

# Full-precision fp32 runs on FMA units: register tiles, no tensor cores.
FMA_TABLE: tuple[tuple[int, tuple[TileConfig, ...]], ...] = (
    (16, (T(16, 64, 32, 4, 3, 1),) * 4),
    (1 << 62, (T(64, 64, 32, 4, 3, 8),) * 4),
)


def _column_class(n: int) -> int:
    """The index of the narrowest column class that holds ``n`` columns."""
    return next(i for i, largest in enumerate(COLUMNS) if n <= largest)


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
    for _, row in _table(dtype, precision):
        for cfg in row:
            seen.setdefault(cfg)
    return tuple(seen)


# At M = 17-32 the narrow tiles (64x32) of the first column class are taken
# only where their CTAs fill the GPU: one partial wave, or a last wave at
# least this full; else the next class's tile. On the H200 (132 SMs) a
# 2048x5632 weight at M = 32 gave 176 CTAs of 64x32 (two waves, the second a
# third full): 13.2 us, against 9.2 us for 88 CTAs of 64x64 (bench/NOTES.md,
# "Matmul at M = 17-32 on the H200"); 5632 columns are now in the second class.
_WAVE_FILL = 0.9


def _fills_waves(ctas: int, sms: int) -> bool:
    waves = -(-ctas // sms)
    return waves <= 1 or ctas / (waves * sms) >= _WAVE_FILL


def tile_config(m: int, n: int, dtype: str, precision: str, sms: int | None = None) -> TileConfig:
    """The tile config for ``m`` rows and ``n`` output columns on a GPU of
    ``sms`` SMs (None: the SM count is not used). Speed only: every choice
    gives the same bits, see the module doc."""
    column = _column_class(n)
    for bound, row in _table(dtype, precision):
        if m <= bound:
            cfg = row[column]
            if column == 0 and sms and bound == 32 and dtype != "float32" and \
                    not _fills_waves(-(-m // cfg.block_m) * -(-n // cfg.block_n), sms):
                return row[1]
            return cfg
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
_WG_SMALL = W(64, 64, 128, 8, 1, 1)
_WG_ROW = W(128, 64, 64, 5, 2, 1)
_WG_SQUARE = W(128, 128, 64, 4, 2, 1)
WGMMA_TABLE: tuple[tuple[int, tuple[WgmmaConfig, ...]], ...] = (
    # (largest M, (N <= 4096, N <= 8192, N <= 16384, wider)), as MMA_TABLE
    (64, (_WG_SMALL, _WG_SMALL, W(64, 128, 64, 5, 2, 8), W(64, 128, 64, 5, 2, 8))),
    (128, (_WG_SMALL, _WG_SMALL, W(128, 64, 64, 5, 2, 8), W(128, 64, 64, 5, 2, 8))),
    # 8192 columns (8192x8192 and 28672x8192 at M = 256 and 512, H100): 128x64
    # CTAs 0.94x / 0.92x of jnp.dot at M = 256 against 0.86x for 64x64, and
    # 128x128 1.03x / 1.00x at M = 512 against 0.94x / 0.90x for 128x64
    # (bench/results/h100/matmul-v2/jax-configs-all.log).
    (256, (W(64, 64, 64, 8, 2, 1), _WG_ROW, _WG_SQUARE, _WG_SQUARE)),
    (512, (_WG_ROW, _WG_SQUARE, _WG_SQUARE, _WG_SQUARE)),
    (1 << 62, (W(128, 128, 64, 4, 2, 8),) * 4),
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
    columns = _column_class(JAX_TRITON_MAX_N) + 1
    for bound, row in MMA_TABLE:
        if bound <= JAX_TRITON_MAX_M:
            for cfg in row[:columns]:
                seen.setdefault(cfg)
    assert not any(c.tma for c in seen), "the Pallas Triton kernel has pointer loads only"
    return tuple(seen)


def wgmma_configs() -> tuple[WgmmaConfig, ...]:
    """Every config the JAX bf16/fp16 dispatch can pick."""
    seen: dict[WgmmaConfig, None] = {}
    for _, row in WGMMA_TABLE:
        for cfg in row:
            seen.setdefault(cfg)
    return tuple(seen)


def wgmma_config(m: int, n: int) -> WgmmaConfig:
    """The Mosaic GPU tile config for ``m`` rows and ``n`` columns (speed only)."""
    column = _column_class(n)
    for bound, row in WGMMA_TABLE:
        if m <= bound:
            return row[column]
    raise AssertionError("unreachable: the last bound is unbounded")

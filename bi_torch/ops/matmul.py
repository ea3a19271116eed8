"""Matrix product: Triton kernel and the ``matmul`` / ``linear`` launchers.

One program owns one output tile and runs the whole K reduction itself, from
k = 0 upwards, into one fp32 accumulator (the contract in ``bi_core.matmul``).
No split-K, so the order in which an output element is summed is the same for
every M; the tile shape, picked from M for speed, does not change it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bi_core.matmul import INTERPRET_CONFIG, TileConfig, precision_of, tile_config
from bi_torch import direct as _direct
from bi_torch import _plan
from bi_torch._checks import check_float_tensor, check_launchable, interpreting
from bi_torch._launch import cdiv, fast, recording, sm_count
from bi_torch.ops import grad as _grad
from bi_torch._interpreter import interpreter_ready

__all__ = ["matmul", "linear", "launch"]

_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (batches per launch)
_SMEM_BYTES = 220 * 1024  # Hopper: 227 KB of shared memory per block, less Triton's barriers


@triton.jit
def _round_tf32(x):
    """fp32 values rounded to tf32 (10 mantissa bits; to nearest, ties away
    from zero), as ``cvt.rna.tf32.f32`` does. The tensor cores would otherwise
    truncate the operands; XLA rounds them (the Pallas kernel of bi_jax gets
    these bits), and so does cuBLAS."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)  # NaN stays NaN


# M is not specialised: Triton would compile a separate M == 1 variant, and
# on the H100 that variant of some configs (64x128x128 TMA, 64x64x256 pointer)
# stayed in LLVM's O3 pipeline for minutes (bench/NOTES.md, "A Triton compile that did not finish").
@fast
@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the columns together, so the
    # weight tiles they share are still in L2 (a speed choice only).
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    # 64-bit offsets: tensors past 2**31 elements.
    a_ptrs = a_ptr + batch * stride_ab + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The K order: k = 0, BLOCK_K, 2*BLOCK_K, ... into the one accumulator.
    # Masked-off elements load as zeros, which add exact zeros.
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_left = K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (ks[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(ks[:, None] < k_left) & col_ok[None, :], other=0.0)
        if PRECISION == "tf32":
            a = _round_tf32(a)
            b = _round_tf32(b)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_BIAS:
        # Bias joins the fp32 accumulator; the output is rounded once, below.
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_ptrs = (
        c_ptr + batch * stride_cb + rows.to(tl.int64)[:, None] * stride_cm + cols.to(tl.int64)[None, :] * stride_cn
    )
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tile_coords(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the columns together (L2 reuse)."""
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % group_size, (tile % width) // group_size


@fast
@triton.jit(do_not_specialize=["M"])
def _matmul_tma_kernel(
    a_desc, b_desc, c_desc, bias_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Persistent form of the same contract: TMA tile loads (zero-filled past
    the edges, which adds exact zeros), one fp32 accumulator per output tile
    taking K in increasing order."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if B_KMAJOR:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if SPLIT_EPILOGUE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            c_desc.store([off_m, off_n], left.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BLOCK_N // 2], right.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's setting: tf32 only when the user allowed it."""
    allow = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return precision_of(_dtype_name(dtype), allow)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _usable(t: torch.Tensor) -> torch.Tensor:
    """Keep views whose inner dimension is unit-stride (row- or column-major,
    transposed weights included); copy anything else once."""
    if t.stride(-1) == 1 or t.stride(-2) == 1:
        return t
    return t.contiguous()


def launch(a3: torch.Tensor, b3: torch.Tensor, bias: torch.Tensor | None, c3: torch.Tensor,
           config: TileConfig | None = None) -> None:
    """``c3[i] = a3[i] @ b3[i] (+ bias)`` for 3-D operands (batch, rows, cols),
    with the tile config ``config`` (default: ``bi_core.matmul.tile_config``'s
    pick for the shape).

    The launcher under :func:`matmul`, and the one entry point for probes and
    tests that need a given config: operands are not checked here beyond what
    the kernel needs (same dtype, CUDA or interpreted CPU tensors, ``c3``
    preallocated in the output dtype). Any config gives the same bits.
    """
    nb, m, k = a3.shape
    n = b3.shape[2]
    if m == 0 or n == 0 or nb == 0:
        return
    if k == 0:
        c3.copy_((bias.float() if bias is not None else torch.zeros((), device=c3.device)).expand_as(c3))
        return
    if interpreting() and interpreter_ready() is not None:
        raise RuntimeError(f"matmul: cannot run in Triton's CPU interpreter: {interpreter_ready()}")
    precision = _precision(a3.dtype)
    if config is None:
        config = INTERPRET_CONFIG if interpreting() else \
            tile_config(m, n, _dtype_name(a3.dtype), precision, _num_sms(a3.device))
    if config.tma and nb == 1 and _tma_ready(a3[0], b3[0], c3[0]):
        _launch_tma(a3[0], b3[0], bias, c3[0], config, precision)
        return
    grid_mn = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    for start in range(0, nb, _MAX_GRID_Y):
        stop = min(nb, start + _MAX_GRID_Y)
        # A single matrix gets batch strides of 0, so that Triton's alignment
        # analysis of the operand pointers does not depend on them.
        single = stop - start == 1
        whole = stop - start == nb  # no views to make (host time at decode sizes)
        _matmul_kernel[(grid_mn, stop - start)](
            a3 if whole else a3[start:stop], b3 if whole else b3[start:stop], bias if bias is not None else c3,
            c3 if whole else c3[start:stop],
            m, n, k,
            0 if single else a3.stride(0), a3.stride(1), a3.stride(2),
            0 if single else b3.stride(0), b3.stride(1), b3.stride(2),
            0 if single else c3.stride(0), c3.stride(1), c3.stride(2),
            HAS_BIAS=bias is not None,
            PRECISION=precision,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=config.group_m,
            EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def _aligned_rows(t: torch.Tensor) -> bool:
    """Row-major 2-D with 16-byte aligned base and rows: what a TMA descriptor needs."""
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _tma_ready(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    return _aligned_rows(a) and (_aligned_rows(b) or _aligned_rows(b.t())) and _aligned_rows(c)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each looping over tiles
    return sm_count(device)


def _launch_tma(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor,
                config: TileConfig, precision: str) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if precision == "tf32":
        # The TMA kernel feeds shared memory straight to the tensor cores, which
        # would truncate the operands instead of rounding them (_round_tf32).
        raise AssertionError("tf32 configs must use the pointer kernel (bi_core.matmul.TF32_TABLE)")
    m, k = a.shape
    n = b.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    b_kmajor = not _aligned_rows(b)  # then b.t() (N x K) is row-major: a transposed weight
    b_desc = (TensorDescriptor.from_tensor(b.t(), [bn, bk]) if b_kmajor
              else TensorDescriptor.from_tensor(b, [bk, bn]))
    split = bn >= 128
    # Pipeline depth is a speed choice: fewer stages where a wide output tile
    # (fp32 out_dtype) would not fit in shared memory with the configured depth.
    stage_bytes = (bm * bk + bk * bn) * a.element_size()
    epilogue_bytes = bm * (bn // 2 if split else bn) * c.element_size()
    stages = config.num_stages
    while stages > 2 and stages * stage_bytes + epilogue_bytes > _SMEM_BYTES:
        stages -= 1
    tiles = cdiv(m, bm) * cdiv(n, bn)
    programs = min(_num_sms(a.device), tiles)
    _matmul_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [bm, bk]),
        b_desc,
        TensorDescriptor.from_tensor(c, [bm, bn // 2 if split else bn]),
        bias if bias is not None else c,
        m, n, k,
        HAS_BIAS=bias is not None,
        PRECISION=precision,
        B_KMAJOR=b_kmajor,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=config.group_m,
        NUM_PROGRAMS=programs,
        SPLIT_EPILOGUE=split,
        WARP_SPECIALIZE=config.warp_specialize,
        num_warps=config.num_warps,
        num_stages=stages,
    )


def _check_pair(op: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out_dtype) -> torch.dtype:
    check_float_tensor("a" if op == "matmul" else "x", a, op)
    check_float_tensor("b" if op == "matmul" else "weight", b, op)
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: operands must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: operands are on different devices, {a.device} and {b.device}")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"{op}: operands must be at least 1-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if out_dtype is None:
        out_dtype = a.dtype
    if out_dtype not in (a.dtype, torch.float32):
        raise TypeError(f"{op}: out_dtype must be the input dtype ({a.dtype}) or torch.float32, got {out_dtype}")
    if bias is not None:
        check_float_tensor("bias", bias, op)
        if bias.device != a.device:
            raise ValueError(f"{op}: bias is on {bias.device} but the operands are on {a.device}")
    check_launchable(op, a)
    return out_dtype


def _check_bias(op: str, bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},) (the output's last dimension), got {tuple(bias.shape)}")
    return bias.contiguous()


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.matmul(a, b) (+ bias)``.

    Shapes follow ``torch.matmul``: 1-D operands are promoted and the added
    dimension removed, leading dimensions of ``a`` fold into M when ``b`` is
    2-D, and N-D operands are batched with broadcasting (per-batch weights).
    Any strides are accepted (operands with neither of their last two
    dimensions unit-stride are copied once).

    Arithmetic: fp32 accumulation over K in a fixed order, the optional
    ``bias`` (shape ``(N,)``) added in fp32, one rounding to ``out_dtype``
    (default ``a.dtype``; ``torch.float32`` is also allowed). fp32 inputs run in
    full fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set, as in
    torch; tf32 operands are rounded to nearest (ties away from zero), as
    cuBLAS and XLA do, not truncated.

    A row of the output depends only on its row of ``a`` and on ``b``: not on
    how many rows ``a`` has nor where the row sits.
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.matmul(matmul, a, b, bias, out_dtype)
    key = _plan_key(a, b, bias, out_dtype)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(a, b, bias)
    if _grad.needed(a, b, bias):
        return _grad.matmul(a, b, bias, out_dtype)
    out_dtype = _check_pair("matmul", a, b, bias, out_dtype)
    a2 = a.unsqueeze(0) if a.ndim == 1 else a
    b2 = b.unsqueeze(-1) if b.ndim == 1 else b
    k = a2.shape[-1]
    if b2.shape[-2] != k:
        raise ValueError(
            f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied "
            f"(a has {k} columns, b has {b2.shape[-2]} rows)"
        )
    n = b2.shape[-1]
    given_bias = bias
    bias = _check_bias("matmul", bias, n)

    if b2.ndim == 2:
        # Leading dims of a fold into M: one weight for every row.
        lead = a2.shape[:-1]
        a3 = _usable(a2.reshape(math.prod(lead), k)).unsqueeze(0)
        b3 = _usable(b2).unsqueeze(0)
        c3 = torch.empty((1, a3.shape[1], n), dtype=out_dtype, device=a.device)
        with recording() as launches:
            launch(a3, b3, bias, c3)
        out = c3.reshape(*lead, n)
    else:
        try:
            batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except RuntimeError:
            raise ValueError(
                f"matmul: batch dimensions of {tuple(a.shape)} and {tuple(b.shape)} do not broadcast"
            ) from None
        m = a2.shape[-2]
        a3 = _usable(a2.expand(*batch, m, k).reshape(-1, m, k))
        b3 = _usable(b2.expand(*batch, k, n).reshape(-1, k, n))
        c3 = torch.empty((a3.shape[0], m, n), dtype=out_dtype, device=a.device)
        with recording() as launches:
            launch(a3, b3, bias, c3)
        out = c3.reshape(*batch, m, n)
    if key is not None and _plan.same_memory((a, a3), (b, b3), (given_bias, bias)):
        # The launch read the caller's operands in place (no copy): a plan.
        bound = _plan.single(launches, _matmul_kernel, 4)
        if bound is not None:
            _PLANS.add(key, _product_plan(bound, tuple(out.shape), out_dtype, a.device))
        else:
            # The TMA kernel: descriptors of a, b (or b's transpose) and the
            # output, each rebuilt on the call's tensor (the same address).
            bound = _plan.single(launches, _matmul_tma_kernel, 4)
            if bound is not None:
                _PLANS.add(key, _product_plan(bound, tuple(out.shape), out_dtype, a.device, tma=True))
    if a.ndim == 1:
        out = out.squeeze(-2)
    if b.ndim == 1:
        out = out.squeeze(-1)
    return out


_PLANS = _plan.Plans("matmul")


def planned(a, b, bias=None):
    """``matmul(a, b, bias)`` by a plan made before (``bi_torch._plan``), or
    None where there is none."""
    key = _plan_key(a, b, bias, None)
    plan = _PLANS.get(key) if key is not None else None
    return None if plan is None else plan(a, b, bias)


def _plan_key(a, b, bias, out_dtype):
    """The signature of a ``matmul`` call of operands of at least 2-D (None:
    no plan); ``out_dtype`` also tells ``linear``'s calls apart."""
    if not _plan.ENABLED or not _plan.plain(a, b, bias) or a.ndim < 2 or b.ndim < 2:
        return None
    # fp32 products follow torch's tf32 setting: part of the signature.
    return (_plan.signature(a), _plan.signature(b), _plan.signature(bias), out_dtype,
            torch._C._get_cublas_allow_tf32(), _plan.current_device())


def _product_plan(bound, shape, dtype, device, tma=False):
    """A planned ``matmul``: the output, then the one bound launch (the
    pointer kernel's ``a``, ``b``, the bias or a stand-in, the output; the TMA
    kernel's ``a``, ``b``, the output, the bias or a stand-in)."""
    empty = _plan.allocator(shape, dtype, device)
    if tma:
        def plan(a, b, bias):
            c = empty()
            bound(a, b, c, c if bias is None else bias)
            return c
        return plan

    def plan(a, b, bias):
        c = empty()
        bound(a, b, c if bias is None else bias, c)
        return c
    return plan


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant ``torch.nn.functional.linear``: ``x @ weight.T + bias``.

    ``weight`` has shape ``(out_features, in_features)``; ``x`` any leading
    dims. Same arithmetic as :func:`matmul` (it is ``matmul(x, weight.T, bias)``,
    with the transposed weight read in place).
    """
    if torch.compiler.is_compiling():  # one node of the graph (bi_torch.direct)
        return _direct.linear(linear, x, weight, bias)
    key = _plan_key(x, weight, bias, "linear")
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        return plan(x, weight, bias)  # the product's plan: it reads weight.t() in place
    check_float_tensor("x", x, "linear")
    check_float_tensor("weight", weight, "linear")
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x's last dimension must equal in_features={weight.shape[1]}, got x of shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_float_tensor("bias", bias, "linear")
        _check_bias("linear", bias, weight.shape[0])
    weight_t = weight.t()
    out = matmul(x, weight_t, bias)
    if key is not None:
        _PLANS.add(key, _PLANS.peek(_plan_key(x, weight_t, bias, None)))
    return out

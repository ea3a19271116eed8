"""Matmul API: torch.matmul / F.linear semantics, layouts, bias, precision,
errors; and, on the GPU, the proof that every tile config gives the same bits."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from bi_core import matmul as contract
from tests_profile import PROFILE

import bi_torch
from bi_torch.ops.matmul import launch

DEVICE = "cuda" if PROFILE.native else "cpu"


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.fixture
def tf32_setting():
    """Set ``torch.backends.cuda.matmul.allow_tf32`` for one test, then restore it."""
    saved = torch.backends.cuda.matmul.allow_tf32

    def set_(value: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = value

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = saved


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(ints)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((7, 33), (33, 20)), ((33,), (33, 20)), ((7, 33), (33,)), ((33,), (33,)), ((2, 3, 33), (33, 20)),
     ((4, 5, 33), (4, 33, 20)), ((2, 1, 5, 33), (3, 33, 20)), ((5, 33), (2, 33, 20))],
    ids=str,
)
def test_shapes_follow_torch_matmul(a_shape, b_shape):
    a, b = _rand(*a_shape, seed=1), _rand(*b_shape, seed=2)
    got = bi_torch.matmul(a, b)
    want = torch.matmul(a.double(), b.double())
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bias_and_out_dtype(dtype):
    a, b, bias = _rand(9, 40, dtype=dtype, seed=3), _rand(40, 24, dtype=dtype, seed=4), _rand(24, dtype=dtype, seed=5)
    ref = a.double() @ b.double() + bias.double()
    wide = bi_torch.matmul(a, b, bias, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    torch.testing.assert_close(wide.double(), ref, rtol=1e-5, atol=1e-5)
    narrow = bi_torch.matmul(a, b, bias)
    # One rounding, to nearest: the narrow output is the fp32 result rounded
    # once. (Triton's interpreter truncates to bf16; bi_torch/_interpreter.py
    # rounds on the CPU as the GPU does.)
    assert torch.equal(_bits(narrow), _bits(wide.to(dtype)))


def test_linear_is_matmul_with_the_transposed_weight_in_place():
    x, w, bias = _rand(3, 5, 48, seed=6), _rand(20, 48, seed=7), _rand(20, seed=8)
    got = bi_torch.linear(x, w, bias)
    assert torch.equal(_bits(got), _bits(bi_torch.matmul(x, w.t(), bias)))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_strided_operands_give_the_bits_of_contiguous_ones():
    a, b = _rand(11, 64, seed=9), _rand(64, 40, seed=10)
    want = _bits(bi_torch.matmul(a, b))
    a_cm = a.t().contiguous().t()  # column-major
    b_cm = b.t().contiguous().t()
    a_gap = torch.zeros(11, 80, device=DEVICE)[:, 3:67].copy_(a)  # padded rows, odd offset
    for x, y in [(a_cm, b), (a, b_cm), (a_gap, b), (a[:, :], b[:, :].contiguous())]:
        assert torch.equal(_bits(bi_torch.matmul(x, y)), want)
    # Neither of the last two dims unit-stride: copied once, same bits.
    assert torch.equal(_bits(bi_torch.matmul(a[::1, ::1], b)), want)
    wide = torch.zeros(11, 128, device=DEVICE)
    wide[:, ::2] = a
    assert torch.equal(_bits(bi_torch.matmul(wide[:, ::2], b)), want)


def test_empty_dimensions():
    assert bi_torch.matmul(_rand(0, 8), _rand(8, 5)).shape == (0, 5)
    assert bi_torch.matmul(_rand(3, 8), _rand(8, 0)).shape == (3, 0)
    out = bi_torch.matmul(_rand(3, 0), _rand(0, 5), _rand(5, seed=3))
    torch.testing.assert_close(out, _rand(5, seed=3).expand(3, 5))


def test_fp32_precision_follows_torch_setting():
    """The contract's choice; that bi_torch follows torch's flag is shown by
    its bits in test_tf32_rounds_operands_to_nearest."""
    assert contract.precision_of("float32", False) == "ieee"
    assert contract.precision_of("float32", True) == "tf32"
    assert contract.precision_of("bfloat16", True) == "ieee"


def test_tf32_rounds_operands_to_nearest(tf32_setting):
    """With tf32 allowed, operands are rounded to 10 mantissa bits to nearest,
    ties away from zero (what XLA, and so bi_jax, does), not truncated."""
    tf32_setting(True)
    a = torch.tensor([[1 + 2**-11 + 2**-12, -(1 + 2**-11), 3.0, 1 + 2**-12]], device=DEVICE)
    got = bi_torch.matmul(a, torch.eye(4, device=DEVICE)).cpu()
    assert got.tolist() == [[1 + 2**-10, -(1 + 2**-10), 3.0, 1.0]]
    tf32_setting(False)
    assert bi_torch.matmul(a, torch.eye(4, device=DEVICE)).cpu().tolist() == a.cpu().tolist()


def test_tma_kernel_matches_the_reference():
    """The persistent TMA kernel (the GPU's choice from M = 33 on) also runs in
    the interpreter: row-major and transposed weights, bias, tile edges."""
    a, bias = _rand(37, 96, seed=11), _rand(72, seed=12)
    for b in (_rand(96, 72, seed=13), _rand(72, 96, seed=13).t()):
        c = torch.empty(37, 72, device=DEVICE)
        cfg = contract.TileConfig(64, 64, 32, 4, 3, 1, tma=True) if PROFILE.native else contract.INTERPRET_TMA_CONFIG
        launch(a[None], b[None], bias, c[None], cfg)
        torch.testing.assert_close(c.double(), a.double() @ b.double() + bias.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: bi_torch.matmul(_rand(2, 3), _rand(4, 5)), ValueError, "cannot be multiplied"),
        (lambda: bi_torch.matmul(_rand(2, 3), _rand(3, 5, dtype=torch.float16)), TypeError, "same dtype"),
        (lambda: bi_torch.matmul(_rand(2, 3).int(), _rand(3, 5).int()), TypeError, "^matmul: a has dtype torch.int32"),
        (lambda: bi_torch.matmul(_rand(2, 3), _rand(3, 5), _rand(4)), ValueError, "bias must have shape"),
        (lambda: bi_torch.matmul(_rand(2, 3), _rand(3, 5), out_dtype=torch.float16), TypeError, "out_dtype"),
        (lambda: bi_torch.matmul(_rand(2, 2, 3), _rand(3, 3, 5)), ValueError, "do not broadcast"),
        (lambda: bi_torch.matmul(torch.tensor(1.0, device=DEVICE), _rand(3)), ValueError, "at least 1-D"),
        (lambda: bi_torch.linear(_rand(2, 3), _rand(3, 5)), ValueError, "in_features"),
        (lambda: bi_torch.linear(_rand(2, 3), _rand(3)), ValueError, "2-D"),
        (lambda: bi_torch.linear([[1.0, 2.0, 3.0]], _rand(5, 3)), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: bi_torch.matmul(_rand(2, 3), [[1.0]]), TypeError, "b must be a torch.Tensor, got list"),
        (lambda: bi_torch.linear(_rand(2, 3), _rand(5, 3), _rand(4)), ValueError, r"^linear: bias must have shape \(5,\)"),
        (lambda: bi_torch.linear(_rand(2, 3), _rand(5, 3), _rand(5).int()), TypeError, "^linear: bias has dtype"),
        (lambda: bi_torch.softmax(_rand(2, 3).double()), TypeError, "^softmax: x has dtype torch.float64"),
        (lambda: bi_torch.sum(_rand(2, 3).long(), -1), TypeError, "^sum: x has dtype torch.int64"),
        (lambda: bi_torch.rms_norm(_rand(2, 3).int()), TypeError, "^rms_norm: x has dtype"),
    ],
    ids=["inner-dim", "mixed-dtype", "int-dtype", "bias-shape", "out-dtype", "batch-broadcast", "0-d", "linear-k",
         "linear-1d", "linear-list", "matmul-list", "linear-bias-shape", "linear-bias-dtype", "softmax-f64",
         "sum-int", "rms-norm-int"],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k,n", [(32, 32), (33, 20)])
def test_invariance_rows_alone_and_in_a_batch(k, n, dtype):
    """Every row of a 36-row product computed alone has the batch's bits, in
    fp32 out. Regression for the CPU: the interpreter's tile product was
    numpy's BLAS, which rounds a row by its position in the tile (20 of 36
    rows differed at K = N = 32, see bi_torch/_interpreter.py)."""
    a, b = _rand(36, k, dtype=dtype, seed=k), _rand(k, n, dtype=dtype, seed=n)
    full = bi_torch.matmul(a, b, out_dtype=torch.float32)
    for r in range(0, 36, 3):
        assert torch.equal(_bits(bi_torch.matmul(a[r : r + 1], b, out_dtype=torch.float32)), _bits(full[r : r + 1])), r


def test_under_autograd_the_forward_is_the_inference_forward():
    a, b = _rand(2, 3), _rand(3, 4)
    out = bi_torch.matmul(a.requires_grad_(), b)
    assert out.grad_fn is not None and "Matmul" in type(out.grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(out.detach(), bi_torch.matmul(a, b))


# --- GPU: every config the dispatch can pick gives the same bits ------------------

# (K, N): aligned; K and N off-tile with a K tail; odd (pointer kernel only).
_PROOF_SHAPES = ((4096, 4096), (1000, 3000), (1001, 77))


def _proof_cases():
    out = []
    for dtype, precision in [("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "ieee"), ("float32", "tf32")]:
        out.append(pytest.param(dtype, precision, id=f"{dtype}-{precision}"))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,precision", _proof_cases())
def test_every_config_gives_the_same_bits(dtype, precision, tf32_setting):
    """Tile shapes are a speed choice only: for every config that
    ``tile_config`` can return, rows of M = 1, 33, 300 and 2000 equal the
    same rows computed by a reference config in a launch of 2000 rows, for
    row-major and transposed weights, in the output dtype and in fp32."""
    tf32_setting(precision == "tf32")
    tdt = getattr(torch, dtype)
    configs = contract.configs(dtype, precision)
    bad = []
    for k, n in _PROOF_SHAPES:
        a = _rand(2000, k, dtype=tdt, seed=k)
        for b in (_rand(k, n, dtype=tdt, seed=n, scale=k**-0.5), _rand(n, k, dtype=tdt, seed=n, scale=k**-0.5).t()):
            for out_dtype in {tdt, torch.float32}:
                ref = torch.empty(2000, n, dtype=out_dtype, device=DEVICE)
                launch(a[None], b[None], None, ref[None], configs[0])
                for cfg in configs:
                    for m in (1, 33, 300, 2000):
                        start = (m * 37) % (2000 - m + 1)
                        out = torch.empty(m, n, dtype=out_dtype, device=DEVICE)
                        launch(a[start:start + m][None], b[None], None, out[None], cfg)
                        if not torch.equal(_bits(out), _bits(ref[start:start + m])):
                            bad.append(f"{cfg} K={k} N={n} M={m} b-stride={b.stride()} out={out_dtype}")
    assert not bad, f"{len(bad)} launches differ from {configs[0]}: " + "; ".join(bad[:10])


def test_mid_m_narrow_tiles_only_where_they_fill_the_gpu():
    """M = 17-32, up to 4096 columns: the 64x32 tiles where their CTAs fit one
    wave or fill the last one to 90 %, else the next column class's tile
    (bench/NOTES.md); 4097-8192 columns always take that class's tile."""
    row = next(row for bound, row in contract.MMA_TABLE if bound == 32)
    narrow, mid = row[0], row[1]
    pick = functools.partial(contract.tile_config, dtype="bfloat16", precision="ieee", sms=132)
    assert pick(32, 2048) == pick(32, 4096) == pick(24, 1024) == narrow  # 64 and 128 CTAs: one wave
    assert pick(32, 4096, sms=100) == mid  # 128 CTAs on 100 SMs: a last wave 28 % full
    assert pick(32, 5632) == pick(17, 6144) == pick(32, 8192) == mid  # the second class
    assert contract.tile_config(32, 4096, "bfloat16", "ieee", 100) == mid
    assert contract.tile_config(32, 4096, "bfloat16", "ieee") == narrow  # no SM count given
    assert contract.tile_config(16, 5632, "bfloat16", "ieee", 132) == contract.tile_config(16, 5632, "bfloat16", "ieee")


def test_column_classes_pick_each_rows_config():
    """A weight's output columns pick the config of the narrowest class that
    holds them, in every row (the tables' column classes)."""
    for bound, row in contract.MMA_TABLE:
        for n, column in ((1, 0), (4096, 0), (4097, 1), (8192, 1), (14336, 2), (16384, 2), (28672, 3)):
            assert contract.tile_config(bound if bound < 1 << 40 else 1 << 20, n, "bfloat16", "ieee") == row[column]
    for bound, row in contract.WGMMA_TABLE:
        assert contract.wgmma_config(min(bound, 1 << 20), 8192) == row[1]


def test_contract_tables_are_well_formed():
    for dtype in ("bfloat16", "float32"):
        for precision in contract.PRECISIONS:
            cfgs = contract.configs(dtype, precision)
            assert cfgs and all(c.block_k >= 16 and c.num_warps in (2, 4, 8) for c in cfgs)
    with pytest.raises(ValueError, match="precision"):
        contract.tile_config(1, 1, "float32", "bf16")
    for table in (contract.MMA_TABLE, contract.TF32_TABLE, contract.FMA_TABLE):
        assert np.all(np.diff([b for b, _ in table]) > 0) and table[-1][0] >= 1 << 40
        assert all(len(row) == len(contract.COLUMNS) for _, row in table)
    assert list(contract.COLUMNS) == sorted(contract.COLUMNS) and contract.COLUMNS[-1] >= 1 << 40

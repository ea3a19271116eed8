"""Plans (``bi_torch._plan``): a call whose signature an op has run before
launches the same kernels with the same arguments, so it gives the full
path's bits; anything the full path decides from changes the signature."""

from __future__ import annotations

import pytest
import torch

import bi_torch
from bi_torch import _plan
from bi_torch.ops import attention as _attention
from bi_torch.ops import rms_norm as _rms_norm
from tests_profile import PROFILE

DEVICE = "cuda" if PROFILE.native else "cpu"


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g)


def _inputs(name, seed):
    """Fresh inputs of one signature for each op (other values per seed)."""
    x = _randn(5, 96, seed=seed)
    if name in ("linear", "linear_bias"):
        return x, _randn(40, 96, seed=seed + 1), _randn(40, seed=seed + 2)
    if name == "matmul_3d":
        return _randn(2, 3, 96, seed=seed), _randn(96, 24, seed=seed + 1)
    if name == "bmm":
        return _randn(4, 3, 96, seed=seed), _randn(4, 96, 24, seed=seed + 1)
    if name == "bmm_broadcast":
        return _randn(1, 3, 96, seed=seed), _randn(4, 96, 24, seed=seed + 1)
    if name in ("rms_norm", "rms_norm_with_rstd"):
        return _randn(2, 3, 96, seed=seed), _randn(96, seed=seed + 1)
    if name == "first_visible":  # (B, H, L, E) and a left-padding mask that changes with the seed
        q = _randn(3, 4, 5, 64, seed=seed)
        k, v = (_randn(3, 2, 9, 64, seed=seed + i) for i in (1, 2))
        pads = torch.tensor([seed % 4, 0, (seed + 2) % 6], device=DEVICE)
        keys = torch.arange(9, device=DEVICE)
        causal = keys[None, None, :] <= 4 + torch.arange(5, device=DEVICE)[None, :, None]
        return q, k, v, ((keys[None, None, :] >= pads[:, None, None]) & causal)[:, None]
    if name in ("paged", "paged_split"):  # packed queries of 3 sequences; lengths and pages change with the seed
        rng = torch.Generator().manual_seed(seed)
        cache = 700 if name == "paged_split" else 40
        q_lens = torch.tensor([3, 1, 2])
        # Lengths on either side of a split boundary (512 keys) in the two calls.
        lens = torch.tensor([600, 20, 520] if seed == 0 else [30, 650, 690], dtype=torch.int32) * cache // 700
        pages = torch.randperm(3 * 48, generator=rng)[:3 * 48].view(3, 48).to(torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)])
        k, v = (_randn(3 * 48, 16, 2, 64, seed=seed + i) for i in (1, 2))
        return (_randn(6, 4, 64, seed=seed), k, v, pages.to(DEVICE), lens.to(DEVICE), cu.to(DEVICE))
    if name in ("attention", "sdpa", "attention_split"):
        lk = 700 if name == "attention_split" else 40
        q = _randn(2, 3, 4, 64, seed=seed)
        return q, _randn(2, lk, 2, 64, seed=seed + 1), _randn(2, lk, 2, 64, seed=seed + 2)
    return (x,)


CALLS = {
    "linear": lambda x, w, b: bi_torch.linear(x, w),
    "linear_bias": lambda x, w, b: bi_torch.linear(x, w, b),
    "matmul_3d": lambda a, b: bi_torch.matmul(a, b),
    "bmm": lambda a, b: bi_torch.matmul(a, b),
    "bmm_broadcast": lambda a, b: bi_torch.matmul(a, b),
    "rms_norm": lambda x, w: bi_torch.rms_norm(x, w, 1e-5),
    "rms_norm_with_rstd": lambda x, w: _rms_norm.rms_norm_with_rstd(x, w, 1e-5),
    "softmax": lambda x: bi_torch.softmax(x, -1),
    "log_softmax": lambda x: bi_torch.log_softmax(x, 1),
    "sum": lambda x: bi_torch.sum(x, [1], keepdim=True),
    "mean": lambda x: bi_torch.mean(x, -1),
    "sum_all": lambda x: bi_torch.sum(x),
    "attention": lambda q, k, v: bi_torch.attention(q, k, v, causal=True),
    "attention_split": lambda q, k, v: bi_torch.attention(q, k, v, split_kv=True),
    "paged": lambda q, k, v, table, lens, cu: bi_torch.paged_attention(
        q, k, v, table, lens, cu_seqlens_q=cu, max_seqlen_q=3, validate=False),
    "paged_split": lambda q, k, v, table, lens, cu: bi_torch.paged_attention(
        q, k, v, table, lens, cu_seqlens_q=cu, max_seqlen_q=3, validate=False, split_kv=True),
    "first_visible": lambda q, k, v, mask: _attention.sdpa_from_first_visible(q, k, v, mask, enable_gqa=True),
    "sdpa": lambda q, k, v: bi_torch.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True),
}


def _hits():
    return sum(s["hits"] for s in _plan.stats().values())


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_planned_call_gives_the_full_paths_bits(name, monkeypatch):
    call = CALLS[name]
    _plan.clear()
    with torch.no_grad():
        call(*_inputs(name, 0))  # the full path, which makes the plan
        hits = _hits()
        args = _inputs(name, 10)  # other values, the same signature
        planned = call(*args)
        assert _hits() == hits + 1, "the second call of a signature did not run its plan"
        monkeypatch.setattr(_plan, "ENABLED", False)
        full = call(*args)
    for p, f in zip(_outputs(planned), _outputs(full), strict=True):
        assert p.shape == f.shape and p.dtype == f.dtype and p.stride() == f.stride(), name
        assert torch.equal(p, f), f"{name}: the plan's bits differ from the full path's"


@pytest.mark.parametrize("change", ["shape", "stride", "dtype", "alignment", "eps", "option"])
def test_what_the_full_path_decides_from_makes_another_signature(change):
    _plan.clear()
    x, w = _randn(4, 64), _randn(64)
    with torch.no_grad():
        bi_torch.rms_norm(x, w, 1e-6)
        base = _plan.stats()["rms_norm"]
        if change == "shape":
            bi_torch.rms_norm(_randn(5, 64), w, 1e-6)
        elif change == "stride":
            bi_torch.rms_norm(_randn(4, 128)[:, :64], w, 1e-6)
        elif change == "dtype":
            bi_torch.rms_norm(x.half(), w, 1e-6)
        elif change == "alignment":
            bi_torch.rms_norm(_randn(4 * 64 + 1)[1:].view(4, 64), w, 1e-6)  # 4 bytes past a boundary
        elif change == "eps":
            bi_torch.rms_norm(x, w, 1e-5)
        else:
            _rms_norm.rms_norm_with_rstd(x, w, 1e-6)
    assert _plan.stats()["rms_norm"]["hits"] == base["hits"], change


def test_no_plan_where_the_full_path_copies_or_reads_values():
    _plan.clear()
    with torch.no_grad():
        for _ in range(2):
            bi_torch.rms_norm(_randn(4, 128)[:, :64], None)  # rows not contiguous: copied first
            bi_torch.softmax(_randn(6, 5), 0)  # not the last dim: moved by a copy
            bi_torch.softmax(_randn(3, 40), -1, dtype=torch.float16)  # a cast
            bi_torch.sum(_randn(3, 40), torch.tensor(1))  # a dim read from a tensor
            q = _randn(1, 2, 4, 64)  # (B, H, L, E)
            k = v = _randn(1, 2, 8, 64)
            mask = torch.ones(4, 8, dtype=torch.bool, device=DEVICE)
            bi_torch.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a mask's values
    stats = _plan.stats()
    assert stats["rows"]["made"] == 0 and stats["attention"]["made"] == 0, stats
    assert stats["rms_norm"]["made"] == 0, stats


def test_a_plan_does_not_skip_autograd():
    _plan.clear()
    x, w = _randn(3, 32), _randn(16, 32)
    with torch.no_grad():
        bi_torch.linear(x, w)
        bi_torch.linear(x.requires_grad_(), w)  # no grad mode: the plan runs
    assert _plan.stats()["matmul"]["hits"] == 1
    out = bi_torch.linear(x, w)  # x requires grad, grad mode is on: the autograd function...
    assert out.grad_fn is not None
    assert _plan.stats()["matmul"]["hits"] == 2  # ...whose forward is the inference path (here its plan)


def test_the_switch_and_the_mode_run_the_plans():
    """A model's second pass: every routed call runs a plan, with the bits
    of the bi_ functions."""
    x, w, h = _randn(6, 64), _randn(32, 64), _randn(64)
    expected = (bi_torch.linear(x, w), bi_torch.rms_norm(x, h, 1e-6), bi_torch.softmax(x, -1), bi_torch.mean(x, -1))

    def model():
        return (torch.nn.functional.linear(x, w), torch.nn.functional.rms_norm(x, (64,), h, 1e-6),
                torch.softmax(x, -1), x.mean(-1))

    with torch.no_grad():
        with bi_torch.enable_batch_invariant_mode():
            model()
            hits = _hits()
            switched = model()
            # mm, the fused norm, softmax and mean
            assert _hits() == hits + 4, _plan.stats()
        with bi_torch.set_batch_invariant_mode() as mode:
            model()
            hits, handled = _hits(), sum(mode.handled.values())
            moded = model()
            assert _hits() - hits == sum(mode.handled.values()) - handled >= 3, (_plan.stats(), mode.handled)
    for got in (switched, moded):
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_plans_can_be_turned_off(monkeypatch):
    _plan.clear()
    monkeypatch.setattr(_plan, "ENABLED", False)
    x = _randn(3, 32)
    with torch.no_grad():
        for _ in range(2):
            bi_torch.softmax(x, -1)
    assert _plan.stats()["rows"] == {"made": 0, "hits": 0}


def test_attention_options_a_plan_cannot_tell_apart_take_the_full_path():
    q = _randn(1, 4, 2, 64)
    k = _randn(1, 8, 2, 64)
    assert _attention._plan_key("attention", q, k, k, False, torch.tensor(0.5), None, None) is None
    assert _attention._plan_key("attention", q, k, k, False, None, [2, 2], None) is None
    assert _attention._plan_key("attention", q, k, k, False, 0.5, (2, 2), None) is not None


def _decode_calls():
    """Decode-sized calls (bf16, 32 rows; the host-cost Llama's shapes), each
    a function of a seed."""
    def linear(seed):
        return bi_torch.linear(_randn(32, 2048, dtype=torch.bfloat16, seed=seed),
                               _randn(5632, 2048, dtype=torch.bfloat16, seed=seed + 1))

    def norm(seed):
        return _rms_norm.rms_norm_with_rstd(_randn(32, 1, 2048, dtype=torch.bfloat16, seed=seed),
                                            _randn(2048, dtype=torch.bfloat16, seed=seed + 1), 1e-6)

    def softmax(seed):
        return bi_torch.softmax(_randn(32, 32000, dtype=torch.bfloat16, seed=seed), -1)

    def mean(seed):
        return bi_torch.mean(_randn(32, 2048, dtype=torch.bfloat16, seed=seed), -1, keepdim=True)

    def decode(seed, keys=88, batch=32):
        q = _randn(batch, 16, 1, 128, dtype=torch.bfloat16, seed=seed)
        k, v = (_randn(batch, 8, keys, 128, dtype=torch.bfloat16, seed=seed + i) for i in (1, 2))
        return bi_torch.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def left_padded(seed, keys=88):
        q = _randn(32, 16, 1, 128, dtype=torch.bfloat16, seed=seed)
        k, v = (_randn(32, 8, keys, 128, dtype=torch.bfloat16, seed=seed + i) for i in (1, 2))
        pads = torch.randint(0, 40, (32,), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(seed))
        mask = torch.arange(keys, device=DEVICE)[None, None, None, :] >= pads[:, None, None, None]
        return _attention.sdpa_from_first_visible(q, k, v, mask, enable_gqa=True)

    def linear_tma(seed, rows=64):  # from 33 rows on the H100/H200 table picks the TMA kernel
        return bi_torch.linear(_randn(rows, 2048, dtype=torch.bfloat16, seed=seed),
                               _randn(5632, 2048, dtype=torch.bfloat16, seed=seed + 1),
                               _randn(5632, dtype=torch.bfloat16, seed=seed + 2))

    return {"linear": linear, "linear_tma": linear_tma, "linear_tma_256_rows": lambda seed: linear_tma(seed, 256),
            "rms_norm_with_rstd": norm, "softmax": softmax, "mean": mean, "decode": decode,
            "decode_split_kv": lambda seed: decode(seed, keys=4096, batch=1), "decode_left_padded": left_padded}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_decode_calls()))
def test_on_the_gpu_a_plan_launches_through_tritons_c_launcher_with_the_full_paths_bits(name, monkeypatch):
    from bi_torch.ops import attention, matmul, rms_norm, rows

    call = _decode_calls()[name]
    kernels = (matmul._matmul_kernel, matmul._matmul_tma_kernel, rms_norm._rms_norm_kernel, rows._row_kernel,
               rows._segment_write_kernel, attention._attn_kernel, attention._merge_kernel)
    _plan.clear()
    with torch.no_grad():
        call(0)
        hits, launched = _hits(), sum(k.hits for k in kernels)
        planned = call(10)
        torch.cuda.synchronize()
        assert _hits() == hits + 1 and sum(k.hits for k in kernels) > launched, name
        monkeypatch.setattr(_plan, "ENABLED", False)
        full = call(10)
    for p, f in zip(_outputs(planned), _outputs(full), strict=True):
        assert p.shape == f.shape and p.stride() == f.stride(), name
        assert torch.equal(p, f), f"{name}: the plan's bits differ from the full path's"


def _tensors_kept(fn, seen=None):
    """The tensors a plan function can reach through its closures (and the
    tuples, lists and dicts in them)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    if isinstance(fn, torch.Tensor):
        return [fn]
    if isinstance(fn, (tuple, list)):
        return [t for item in fn for t in _tensors_kept(item, seen)]
    if isinstance(fn, dict):
        return [t for item in fn.values() for t in _tensors_kept(item, seen)]
    if hasattr(fn, "__slots__") or hasattr(fn, "__dataclass_fields__"):  # a launch's argument objects
        names = getattr(fn, "__slots__", None) or fn.__dataclass_fields__
        return [t for name in names if hasattr(fn, name) for t in _tensors_kept(getattr(fn, name), seen)]
    if callable(fn) and getattr(fn, "__closure__", None):
        return [t for cell in fn.__closure__ for t in _tensors_kept(cell.cell_contents, seen)]
    return []


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_plan_keeps_no_tensor(name):
    """Under CUDA graph trees the first call of a signature may allocate in
    the graph's memory pool; a plan that kept one of its tensors (a stand-in
    for an unused pointer, say) leaves an allocation the pool does not track
    ("Detected 4 tensor(s) in the cudagraph pool not tracked as outputs", seen
    on the GPU with compiled generation under the switch)."""
    _plan.clear()
    with torch.no_grad():
        CALLS[name](*_inputs(name, 0))
    plans = [plan for cache in _plan._ALL for plan in cache._plans.values()]
    assert plans, name
    kept = [t for plan in plans for t in _tensors_kept(plan)]
    assert not kept, f"{name}: the plan keeps {len(kept)} tensors: {[(tuple(t.shape), t.dtype) for t in kept]}"


def test_the_tma_kernels_plan_gives_the_full_paths_bits_and_keeps_no_tensor(monkeypatch):
    """The TMA kernel (the GPU's pick from M = 33 on) takes tensor
    descriptors: its plan rebuilds them on the call's tensors, with the shape,
    strides and block of the launch it binds (here in the interpreter, with
    the interpreter's TMA tile)."""
    from bi_core.matmul import INTERPRET_TMA_CONFIG
    from bi_torch.ops import matmul

    if PROFILE.native:
        pytest.skip("the GPU picks the TMA kernel itself: the decode-size GPU test covers it")
    monkeypatch.setattr(matmul, "INTERPRET_CONFIG", INTERPRET_TMA_CONFIG)
    _plan.clear()
    recorded = []
    real = matmul._matmul_tma_kernel._launch
    monkeypatch.setattr(matmul._matmul_tma_kernel, "_launch", lambda *a, **k: recorded.append(a) or real(*a, **k))
    with torch.no_grad():
        bi_torch.linear(*_inputs("linear_bias", 0))
        x, w, b = _inputs("linear_bias", 10)
        hits = _hits()
        planned = bi_torch.linear(x, w, b)
        assert _hits() == hits + 1
        kept = [t for cache in _plan._ALL for plan in cache._plans.values() for t in _tensors_kept(plan)]
        assert not kept, f"the TMA plan keeps {len(kept)} tensors"
        monkeypatch.setattr(_plan, "ENABLED", False)
        full = bi_torch.linear(x, w, b)
    assert len(recorded) == 3  # the TMA kernel ran each time
    # The planned launch's descriptors are of the new call's tensors.
    descriptors = recorded[1][1:4]
    assert descriptors[0].base.data_ptr() == x.data_ptr() and descriptors[1].base.data_ptr() == w.data_ptr()
    assert descriptors[2].base.data_ptr() == planned.data_ptr()
    assert torch.equal(planned, full) and planned.stride() == full.stride()

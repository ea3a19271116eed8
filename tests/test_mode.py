"""The torch drop-in mode: which ops it routes, strictness, and restoring
PyTorch's dispatch. On CPU the routed kernels run in the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

import bi_torch
from tests_profile import PROFILE

DEVICE = "cuda" if PROFILE.native else "cpu"


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 64, generator=g).to(DEVICE)
    w = torch.randn(32, 64, generator=g).to(DEVICE)
    b = torch.randn(32, generator=g).to(DEVICE)
    return x, w, b


def _bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


@torch.no_grad()
def test_routed_ops_give_the_bi_kernels_bits():
    x, w, b = _data()
    with bi_torch.set_batch_invariant_mode() as mode:
        lin = torch.nn.functional.linear(x, w, b)
        mm = torch.mm(x, w.t())
        bmm = torch.bmm(x.reshape(2, 3, 64), w.t().expand(2, 64, 32))
        soft = torch.softmax(lin, -1)
        logsoft = torch.log_softmax(lin, dim=-1)
        mean = lin.mean(-1)
        total = lin.sum(dim=(0, 1))
    want = {
        "lin": bi_torch.linear(x, w, b), "mm": bi_torch.matmul(x, w.t()),
        "bmm": bi_torch.matmul(x.reshape(2, 3, 64), w.t().expand(2, 64, 32)),
        "soft": bi_torch.softmax(want_lin := bi_torch.linear(x, w, b), -1),
        "logsoft": bi_torch.log_softmax(want_lin, -1), "mean": bi_torch.mean(want_lin, -1),
        "total": bi_torch.sum(want_lin, (0, 1)),
    }
    got = {"lin": lin, "mm": mm, "bmm": bmm, "soft": soft, "logsoft": logsoft, "mean": mean, "total": total}
    for name in want:
        assert torch.equal(_bits(got[name]), _bits(want[name])), name
    for op in ("aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten._softmax.default",
               "aten._log_softmax.default", "aten.mean.dim", "aten.sum.dim_IntList"):
        assert mode.handled[op] >= 1, (op, dict(mode.handled))


@torch.no_grad()
def test_other_dtypes_and_ops_run_pytorch_kernels():
    x, _, _ = _data()
    with bi_torch.set_batch_invariant_mode() as mode:
        ints = torch.arange(10, device=DEVICE).sum()  # integer sums are exact: PyTorch's kernel
        y = torch.relu(x) + 1
    assert int(ints) == 45 and torch.equal(y, torch.relu(x) + 1)
    assert not mode.handled and not mode.unhandled


@torch.no_grad()
def test_strict_mode_refuses_ops_without_an_invariant_kernel():
    x, _, _ = _data()
    q = x[None, None]
    with pytest.raises(bi_torch.BatchVarianceRisk, match="no batch-invariant kernel"):
        with bi_torch.set_batch_invariant_mode(strict=True):
            torch.nn.functional.layer_norm(q, q.shape[-1:])
    with pytest.raises(bi_torch.BatchVarianceRisk, match="float64"):
        with bi_torch.set_batch_invariant_mode(strict=True):
            torch.mm(x.double(), x.double().t())
    # Lenient: the op runs, and the mode lists it.
    with bi_torch.set_batch_invariant_mode() as mode:
        out = torch.nn.functional.layer_norm(q, q.shape[-1:])
    assert out.shape == q.shape
    assert any("layer_norm" in op for op in mode.unhandled)


@torch.no_grad()
def test_leaving_restores_pytorch_dispatch_even_after_an_exception():
    x, w, _ = _data()
    default = torch.mm(x, w.t())
    with pytest.raises(ZeroDivisionError):
        with bi_torch.set_batch_invariant_mode():
            assert bi_torch.is_batch_invariant_mode_enabled()
            1 / 0
    assert not bi_torch.is_batch_invariant_mode_enabled()
    assert torch.equal(torch.mm(x, w.t()), default)
    # The switch form.
    bi_torch.set_batch_invariant_mode(True)
    try:
        assert bi_torch.is_batch_invariant_mode_enabled()
        assert torch.equal(_bits(torch.mm(x, w.t())), _bits(bi_torch.matmul(x, w.t())))
        with bi_torch.set_batch_invariant_mode(False):
            assert not bi_torch.is_batch_invariant_mode_enabled()
        assert bi_torch.is_batch_invariant_mode_enabled()  # the with restored the switch's state
    finally:
        bi_torch.set_batch_invariant_mode(False)
    assert not bi_torch.is_batch_invariant_mode_enabled()
    assert torch.equal(torch.mm(x, w.t()), default)


@torch.no_grad()
def test_torch_compile_runs_eagerly_inside_the_mode():
    """Compiled functions run eagerly through the mode (stance force_eager), so
    they give the eager bits; outside, the previous stance is back."""
    x, w, _ = _data()
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    compiled = torch.compile(lambda a, b: torch.softmax(torch.mm(a, b), -1), backend=backend)
    with bi_torch.set_batch_invariant_mode() as mode:
        got = compiled(x, w.t())
    assert not calls, "torch.compile traced a graph inside the mode"
    assert mode.handled["aten.mm.default"] == 1
    assert torch.equal(_bits(got), _bits(bi_torch.softmax(bi_torch.matmul(x, w.t()), -1)))
    compiled(x, w.t())
    assert len(calls) == 1, "the compiler stance was not restored"


@torch.no_grad()
@pytest.mark.parametrize("fn", [torch.nn.functional.silu, torch.sigmoid, torch.exp, torch.tanh], ids=lambda f: f.__name__)
def test_elementwise_rows_alone_and_in_a_batch(fn):
    """Inside the mode a row of an elementwise function has the bits it has
    in a batch. Regression for the CPU: ATen's vector and scalar silu and
    sigmoid round differently (see bi_torch/mode.py)."""
    g = torch.Generator().manual_seed(1)
    for n in (7, 13, 33, 65, 100):
        x = torch.randn(6, n, generator=g).to(DEVICE)
        with bi_torch.set_batch_invariant_mode():
            full = fn(x)
            for r in range(6):
                assert torch.equal(_bits(fn(x[r : r + 1])), _bits(full[r : r + 1])), (n, r)


@torch.no_grad()
def test_addmm_with_beta_zero_ignores_the_bias():
    """torch ignores addmm's bias when beta is 0, NaN and inf in it included."""
    x, w, b = _data()
    bias = torch.full_like(b, float("nan"))
    with bi_torch.set_batch_invariant_mode(strict=True):
        got = torch.addmm(bias, x, w.t(), beta=0)
        doubled = torch.addmm(bias, x, w.t(), beta=0, alpha=2)
    assert not torch.isnan(got).any() and not torch.isnan(torch.addmm(bias, x, w.t(), beta=0)).any()
    assert torch.equal(_bits(got), _bits(bi_torch.matmul(x, w.t())))
    assert torch.equal(_bits(doubled), _bits(2 * bi_torch.matmul(x, w.t())))


@torch.no_grad()
def test_what_the_kernels_cannot_take_runs_pytorch_or_is_refused():
    """A sum to float64 and addmm with a 0-d bias: lenient runs them (the
    first with PyTorch's kernel, listed), strict refuses the first; the mean
    of a whole tensor is routed."""
    x, w, _ = _data()
    with bi_torch.set_batch_invariant_mode() as mode:
        total = x.sum(dtype=torch.float64)
        shifted = torch.addmm(torch.tensor(1.5, device=DEVICE), x, w.t())
        mean = torch.mean(x)
    assert total.dtype == torch.float64 and torch.equal(total, x.sum(dtype=torch.float64))
    assert mode.unhandled["aten.sum.default"] == 1
    assert torch.equal(_bits(shifted), _bits(1.5 + bi_torch.matmul(x, w.t())))
    assert torch.equal(_bits(mean), _bits(bi_torch.mean(x)))
    assert mode.handled["aten.mean.default"] == 1 and mode.handled["aten.addmm.default"] == 1
    with pytest.raises(bi_torch.BatchVarianceRisk, match="dtype=float64"):
        with bi_torch.set_batch_invariant_mode(strict=True):
            x.sum(dtype=torch.float64)


def _reducing_ops(x):
    idx = torch.tensor([0, 2, 0], device=x.device)
    return {
        "index_add_": lambda: x.clone().index_add_(0, idx, x[:3]),
        "scatter_add_": lambda: x.clone().scatter_add_(0, idx[:, None].expand(3, x.shape[1]), x[:3]),
        "scatter_reduce": lambda: x.scatter_reduce(0, idx[:, None].expand(3, x.shape[1]), x[:3], "sum"),
        "index_put_accumulate": lambda: x.clone().index_put_((idx,), x[:3], accumulate=True),
        "cdist": lambda: torch.cdist(x, x),
        "fft": lambda: torch.fft.rfft(x),
        "trace": lambda: torch.trace(x),
        "avg_pool1d": lambda: torch.nn.functional.avg_pool1d(x[None], 4),
        "cumsum": lambda: torch.cumsum(x, -1),
        "layer_norm": lambda: torch.nn.functional.layer_norm(x, x.shape[-1:]),
    }


@torch.no_grad()
@pytest.mark.parametrize("name", list(_reducing_ops(torch.zeros(1, 1))))
def test_strict_mode_refuses_every_float_op_that_may_reduce(name):
    """Strictness follows what an op does: each of these adds several
    elements into one, and none is routed."""
    x, _, _ = _data()
    op = _reducing_ops(x)[name]
    with pytest.raises(bi_torch.BatchVarianceRisk, match="no batch-invariant kernel"):
        with bi_torch.set_batch_invariant_mode(strict=True):
            op()
    with bi_torch.set_batch_invariant_mode() as mode:
        op()
    assert mode.unhandled, name


@torch.no_grad()
def test_strict_mode_lets_ops_that_move_or_compare_elements_run():
    x, _, _ = _data()
    idx = torch.tensor([0, 2, 0], device=DEVICE)
    with bi_torch.set_batch_invariant_mode(strict=True) as mode:
        torch.cat([x, x]).flip(0).tril()
        x.clone().index_put_((idx,), x[:3])
        x.scatter(0, idx[:, None].expand(3, x.shape[1]), x[:3])
        torch.nn.functional.embedding(idx, x)
        x.max(-1), x.sort(-1), x.topk(3), x.amax(0), x[idx].T.contiguous(), torch.where(x > 0, x, 0.0)
        torch.nn.functional.pad(x, (1, 1)), x.repeat(2, 1), x[0, 0].item()
    assert not mode.unhandled and not mode.handled


def test_strict_mode_refuses_cpu_reductions_without_the_interpreter():
    """CPU tensors without TRITON_INTERPRET run PyTorch's CPU kernels: strict
    mode says so instead of passing them silently, lenient lists them."""
    import subprocess
    import sys
    import textwrap

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "BI_DEVICE")}
    code = textwrap.dedent("""
        import torch, bi_torch
        x = torch.randn(4, 8)
        with bi_torch.set_batch_invariant_mode() as mode:
            torch.mm(x, x.T); torch.relu(x)
        print(dict(mode.unhandled), dict(mode.handled))
        try:
            with bi_torch.set_batch_invariant_mode(strict=True):
                torch.softmax(x, -1)
        except bi_torch.BatchVarianceRisk as e:
            print("refused:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "{'aten.mm.default': 1} {}" in run.stdout, run.stdout
    assert "refused: aten._softmax.default" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stdout


@torch.no_grad()
def test_two_threads_entering_and_leaving_the_mode():
    """Each thread has its own mode stack: A enters, B enters, A leaves, B
    leaves. Neither sees the other's mode, nothing is left entered, and the
    compiler stance (process-wide) is back to what it was once both left."""
    import threading

    from torch._dynamo import eval_frame

    x, w, _ = _data()
    stance = eval_frame._stance.stance
    step = threading.Barrier(2)
    seen, errors = {}, []
    # Triton's interpreter patches triton.language for the kernel it runs, so
    # two interpreted kernels must not run at once; GPU launches may.
    kernel = threading.Lock() if not PROFILE.native else __import__("contextlib").nullcontext()

    def worker(name, leave_first):
        try:
            with bi_torch.set_batch_invariant_mode() as mode:
                step.wait()  # both inside
                seen[name] = bi_torch.is_batch_invariant_mode_enabled()
                with kernel:
                    torch.mm(x, w.t())
                if not leave_first:
                    step.wait()  # the other left first
                    seen[f"{name} after the other left"] = bi_torch.is_batch_invariant_mode_enabled()
            if leave_first:
                step.wait()
            seen[f"{name} handled"] = mode.handled["aten.mm.default"]
        except Exception as e:  # reported below, with the thread's name
            errors.append(f"{name}: {e!r}")
            step.abort()

    threads = [threading.Thread(target=worker, args=("A", True)), threading.Thread(target=worker, args=("B", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen == {"A": True, "B": True, "B after the other left": True, "A handled": 1, "B handled": 1}, seen
    assert not bi_torch.is_batch_invariant_mode_enabled()  # this thread never entered
    assert eval_frame._stance.stance == stance
    assert torch.equal(torch.mm(x, w.t()), x @ w.t())
    out = []
    t = threading.Thread(target=lambda: out.append(bi_torch.is_batch_invariant_mode_enabled()))
    t.start()
    t.join()
    assert out == [False]


@torch.no_grad()
def test_scaled_dot_product_attention_runs_the_attention_kernel():
    """F.scaled_dot_product_attention inside the mode is routed above the
    backend choice; a call the kernel does not take runs torch's function
    (a backend op, which strict mode refuses, or on the math backend routed
    products and softmax), and mode.declined says why."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 64, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 9, 64, generator=g).to(DEVICE) for _ in range(2))
    with bi_torch.set_batch_invariant_mode(strict=True) as mode:
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        alone = torch.nn.functional.scaled_dot_product_attention(q[1:], k[1:], v[1:], is_causal=True, enable_gqa=True)
    assert mode.handled["scaled_dot_product_attention"] == 2
    assert torch.equal(_bits(got), _bits(bi_torch.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True)))
    assert torch.equal(_bits(alone[0]), _bits(got[1]))
    small = q[..., :32].contiguous()  # a head dim the kernel lacks: torch's backend op, refused
    with pytest.raises(bi_torch.BatchVarianceRisk, match="_scaled_dot_product"):
        with bi_torch.set_batch_invariant_mode(strict=True) as mode:
            torch.nn.functional.scaled_dot_product_attention(small, small, small)
    assert "head dim 32" in mode.declined["scaled_dot_product_attention"]
    with bi_torch.set_batch_invariant_mode() as mode:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert "dropout_p=0.5" in mode.declined["scaled_dot_product_attention"]


@torch.no_grad()
def test_fused_attention_fast_paths_are_not_taken_inside_the_mode():
    """nn.MultiheadAttention's and TransformerEncoderLayer's inference fast
    paths (one fused aten op each, which no bi_ kernel runs) are not taken
    while the mode is on (it is a torch-function mode too). MHA's slow path
    with weights is products and a softmax, routed; without weights it calls
    SDPA from inside F.multi_head_attention_forward, below the function
    level, and strict mode refuses that backend op."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 256, generator=g).to(DEVICE)
    mha = torch.nn.MultiheadAttention(256, 4, batch_first=True).to(DEVICE).eval()
    with bi_torch.set_batch_invariant_mode(strict=True) as mode:
        out, weights = mha(x, x, x)
        alone, _ = mha(x[2:], x[2:], x[2:])
    assert weights.shape == (3, 7, 7) and mode.handled["aten._softmax.default"] == 2
    assert torch.equal(_bits(alone[0]), _bits(out[2]))
    assert not any("_native_multi_head_attention" in op for op in mode.handled)
    with pytest.raises(bi_torch.BatchVarianceRisk, match="_scaled_dot_product"):
        with bi_torch.set_batch_invariant_mode(strict=True):
            mha(x, x, x, need_weights=False)
    layer = torch.nn.TransformerEncoderLayer(256, 4, batch_first=True).to(DEVICE).eval()
    with bi_torch.set_batch_invariant_mode() as mode:
        layer(x)
    assert "aten.native_layer_norm.default" in mode.unhandled
    assert not any("_transformer_encoder_layer_fwd" in op for op in mode.unhandled | mode.handled)


@torch.no_grad()
def test_safe_softmax_is_routed_with_zeros_for_fully_masked_rows():
    """aten._safe_softmax (the softmax of SDPA's math backend): the bi_ softmax,
    and zeros, as torch gives, for a row whose every score is -inf."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 40, generator=g).to(DEVICE)
    x[2] = float("-inf")
    x[3, :7] = float("-inf")
    with bi_torch.set_batch_invariant_mode(strict=True) as mode:
        got = torch.ops.aten._safe_softmax(x, -1)
        alone = torch.ops.aten._safe_softmax(x[3:4], -1)
    assert mode.handled["aten._safe_softmax.default"] == 2
    assert (got[2] == 0).all() and torch.equal(_bits(got[3:4]), _bits(alone))
    assert torch.equal(_bits(got[[0, 1, 3, 4]]), _bits(bi_torch.softmax(x[[0, 1, 3, 4]], -1)))
    torch.testing.assert_close(got, torch.ops.aten._safe_softmax(x, -1))


def test_strict_mode_trains_through_the_bi_backward_kernels():
    """A training step under the strict mode: the backward formulas of
    softmax, log_softmax and the embedding (and RMSNorm's where it is one op,
    on the GPU) run bi_ kernels, nothing is refused, and the gradients are
    the bi_ ops' own bits (RMSNorm aside on the CPU, where torch decomposes
    it above the mode)."""
    from cases import training_step

    with bi_torch.set_batch_invariant_mode(strict=True) as mode:
        got = training_step(DEVICE, None)
    routed = {"aten._softmax_backward_data.default", "aten._log_softmax_backward_data.default",
              "aten.embedding_dense_backward.default"}
    if PROFILE.native:
        routed.add("aten._fused_rms_norm_backward.default")
    assert routed <= set(mode.handled), dict(mode.handled)
    if PROFILE.native:
        want = training_step(DEVICE, None, direct=True)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_trains_under_the_strict_mode(reduction):
    """``F.cross_entropy`` (log_softmax + nll_loss, an ignored token) under
    the strict mode: the loss is the picked log-probabilities summed by
    ``bi_torch.sum`` (over the kept tokens' count for the mean), its
    gradient one rounding per element; the process-wide switch gives the
    same bits, and both are close to PyTorch's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 40, generator=g).to(DEVICE)
    t = torch.tensor([1, 4, -100, 39, 0, 4], device=DEVICE)

    def step(ctx):
        leaf = x.clone().requires_grad_()
        with ctx as entered:
            loss = torch.nn.functional.cross_entropy(leaf, t, reduction=reduction)
            (loss.sum() if reduction == "none" else loss).backward()
        return loss.detach(), leaf.grad, entered

    with torch.no_grad():
        logp = bi_torch.log_softmax(x, -1)
        keep = t != -100
        picked = torch.where(keep, -logp.gather(1, torch.where(keep, t, 0)[:, None])[:, 0], 0.0)
        total = bi_torch.sum(picked, 0, dtype=torch.float32)
        want = {"none": picked, "sum": total, "mean": total / keep.sum().to(torch.float32)}[reduction].to(x.dtype)
    loss, grad, mode = step(bi_torch.set_batch_invariant_mode(strict=True))
    assert {"aten.nll_loss_forward.default", "aten.nll_loss_backward.default"} <= set(mode.handled)
    assert torch.equal(_bits(loss), _bits(want))
    switch_loss, switch_grad, _ = step(bi_torch.enable_batch_invariant_mode())
    assert torch.equal(_bits(switch_loss), _bits(loss)) and torch.equal(_bits(switch_grad), _bits(grad))
    default_loss, default_grad, _ = step(torch.enable_grad())
    torch.testing.assert_close(loss, default_loss)
    torch.testing.assert_close(grad, default_grad)
    assert not grad[2].any()


def test_cross_entropy_mean_counts_tokens_exactly_in_bfloat16():
    """The mean's token count is exact past bfloat16's 256 (the count and
    the sum stay fp32 until the one rounding), as PyTorch's loss is."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(301, 8, generator=g).to(DEVICE, torch.bfloat16)
    t = torch.randint(0, 8, (301,), generator=g).to(DEVICE)
    with bi_torch.set_batch_invariant_mode(strict=True):
        loss = torch.nn.functional.cross_entropy(x, t)
    with torch.no_grad():
        picked = -bi_torch.log_softmax(x, -1).gather(1, t[:, None])[:, 0]
        want = (bi_torch.sum(picked, 0, dtype=torch.float32) / 301.0).to(torch.bfloat16)
    assert torch.equal(_bits(loss), _bits(want))
    torch.testing.assert_close(loss.float(), torch.nn.functional.cross_entropy(x.float(), t), rtol=8e-3, atol=0)

"""The process-wide switch (``enable_batch_invariant_mode``): the bi_ kernels as
aten's CUDA kernels (CPU kernels under the Triton interpreter), in every
thread, restored exactly when switched off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import bi_torch
from bi_torch import switch
from cases import count_backward_kernels, training_step
from tests_profile import PROFILE

DEVICE = "cuda" if PROFILE.native else "cpu"


def _data(seed=0, rows=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g).to(DEVICE)
    w = torch.randn(32, 64, generator=g).to(DEVICE)
    b = torch.randn(32, generator=g).to(DEVICE)
    return x, w, b


def _bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _same(a, b):
    return torch.equal(_bits(a), _bits(b))


@pytest.fixture(autouse=True)
def _switch_off_after():
    yield
    assert not bi_torch.is_batch_invariant_mode(), "a test left the process-wide switch on"


@torch.no_grad()
def test_overridden_ops_give_the_bi_kernels_bits():
    x, w, b = _data()
    h = bi_torch.linear(x, w, b)
    want = {"linear": h, "mm": bi_torch.matmul(x, w.t()), "matmul3d": bi_torch.matmul(x.reshape(2, 3, 64), w.t()),
            "bmm": bi_torch.matmul(x.reshape(2, 3, 64), w.t().expand(2, 64, 32)),
            "softmax": bi_torch.softmax(h, -1), "log_softmax": bi_torch.log_softmax(h, 0),
            "sum": bi_torch.sum(h, -1), "sum_all": bi_torch.sum(h), "mean": bi_torch.mean(h, (0, 1), keepdim=True),
            "mean_all": bi_torch.mean(h), "rms_norm": bi_torch.rms_norm(x, w[0], 1e-6),
            "half_softmax": bi_torch.softmax(h.half(), -1, dtype=torch.float32)}
    with bi_torch.enable_batch_invariant_mode():
        assert bi_torch.is_batch_invariant_mode()
        g = torch.nn.functional.linear(x, w, b)
        got = {"linear": g, "mm": torch.mm(x, w.t()), "matmul3d": x.reshape(2, 3, 64) @ w.t(),
               "bmm": torch.bmm(x.reshape(2, 3, 64), w.t().expand(2, 64, 32)),
               "softmax": torch.softmax(g, -1), "log_softmax": torch.log_softmax(g, 0), "sum": g.sum(-1),
               "sum_all": g.sum(), "mean": g.mean((0, 1), keepdim=True), "mean_all": torch.mean(g),
               "rms_norm": torch.nn.functional.rms_norm(x, (64,), w[0], 1e-6),
               "half_softmax": torch.softmax(g.half(), -1, dtype=torch.float32)}
    for name, value in want.items():
        assert _same(got[name], value), name


@torch.no_grad()
def test_rows_alone_and_in_a_batch():
    x, w, b = _data(1, rows=40)
    with bi_torch.enable_batch_invariant_mode():
        batch = torch.log_softmax(torch.nn.functional.linear(x, w, b), -1).sum(-1, keepdim=True)
        alone = [torch.log_softmax(torch.nn.functional.linear(x[i:i + 1], w, b), -1).sum(-1, keepdim=True)
                 for i in (0, 17, 39)]
    for row, value in zip((0, 17, 39), alone):
        assert _same(batch[row:row + 1], value), row


@torch.no_grad()
def test_switching_off_restores_pytorch_kernels_and_nesting_restores_state():
    x, w, b = _data()
    default = torch.nn.functional.linear(x, w, b)
    bi = bi_torch.linear(x, w, b)
    with bi_torch.enable_batch_invariant_mode():
        with bi_torch.disable_batch_invariant_mode():
            assert not bi_torch.is_batch_invariant_mode()
            assert _same(torch.nn.functional.linear(x, w, b), default)
        assert bi_torch.is_batch_invariant_mode()
        with bi_torch.enable_batch_invariant_mode():  # nested: still on after the inner exit
            pass
        assert bi_torch.is_batch_invariant_mode()
        assert _same(torch.nn.functional.linear(x, w, b), bi)
    assert not bi_torch.is_batch_invariant_mode()
    assert _same(torch.nn.functional.linear(x, w, b), default)
    # Called without with: on until switched off (also through an exception).
    bi_torch.enable_batch_invariant_mode()
    try:
        assert _same(torch.nn.functional.linear(x, w, b), bi)
        with pytest.raises(ZeroDivisionError), bi_torch.disable_batch_invariant_mode():
            raise ZeroDivisionError
        assert bi_torch.is_batch_invariant_mode()
    finally:
        bi_torch.disable_batch_invariant_mode()
    assert _same(torch.nn.functional.linear(x, w, b), default)


@torch.no_grad()
def test_the_switch_holds_in_every_thread():
    x, w, _ = _data()
    want = bi_torch.matmul(x, w.t())
    out = {}

    def worker():
        out["on"] = bi_torch.is_batch_invariant_mode()
        out["mm"] = torch.mm(x, w.t())

    with bi_torch.enable_batch_invariant_mode():
        t = threading.Thread(target=worker)
        t.start()
        t.join(120)
    assert out["on"] and _same(out["mm"], want)


def test_overlapping_blocks_in_two_threads_do_not_switch_each_other_off():
    """Thread A enters a block, B enters one, A exits while B's is open: the
    switch stays on for B until B exits, then it is off (the state before
    both). Then the newest call decides: a plain call is in force until a
    newer call, whatever older blocks exit."""
    assert not bi_torch.is_batch_invariant_mode()
    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out", "b_checked")}
    seen = {}

    def thread_a():
        with bi_torch.enable_batch_invariant_mode():
            steps["a_in"].set()
            steps["b_in"].wait(60)
        steps["a_out"].set()

    def thread_b():
        steps["a_in"].wait(60)
        with bi_torch.enable_batch_invariant_mode():
            steps["b_in"].set()
            steps["a_out"].wait(60)
            seen["inside b after a left"] = bi_torch.is_batch_invariant_mode()
        seen["after both"] = bi_torch.is_batch_invariant_mode()
        steps["b_checked"].set()

    threads = [threading.Thread(target=f) for f in (thread_a, thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert seen == {"inside b after a left": True, "after both": False}

    # A block open in another thread, then a newer plain call here: the plain
    # call decides, and the older block's exit does not undo it.
    opened, close = threading.Event(), threading.Event()

    def holder():
        with bi_torch.disable_batch_invariant_mode():
            opened.set()
            close.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    opened.wait(60)
    try:
        bi_torch.enable_batch_invariant_mode()
        assert bi_torch.is_batch_invariant_mode()
        close.set()
        t.join(60)
        assert bi_torch.is_batch_invariant_mode()
        with bi_torch.disable_batch_invariant_mode():  # nests on the plain call's state
            assert not bi_torch.is_batch_invariant_mode()
        assert bi_torch.is_batch_invariant_mode()
    finally:
        bi_torch.disable_batch_invariant_mode()
    assert not bi_torch.is_batch_invariant_mode()


@torch.no_grad()
def test_calls_the_kernels_do_not_take_run_pytorch_and_floats_warn():
    x, w, _ = _data()
    ints = torch.arange(10, device=DEVICE)
    before = switch.fallbacks().get("mm", 0)
    with bi_torch.enable_batch_invariant_mode():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # integer sums are exact: PyTorch's kernel, no warning
            assert int(ints.sum()) == 45 and ints.sum(0).dtype == torch.int64
            assert torch.equal((ints > 4).sum(), torch.tensor(5, device=DEVICE))
        switch._WARNED.discard(("mm", "dtype float64"))  # once per op and reason: as if first
        with pytest.warns(bi_torch.BatchVarianceWarning, match=r"aten::mm .*float64"):
            got = torch.mm(x.double(), w.double().t())
    assert torch.equal(got, torch.mm(x.double(), w.double().t()))
    assert switch.fallbacks()["mm"] == before + 1


def test_autograd_runs_above_the_overrides():
    x, w, b = _data()
    xg = x.clone().requires_grad_()
    with bi_torch.enable_batch_invariant_mode():
        y = torch.nn.functional.linear(xg, w, b)
        y.backward(torch.ones_like(y))
    with torch.no_grad():
        assert _same(y, bi_torch.linear(x, w, b))
        # The gradient product is aten::mm too: the bi_ kernel's bits.
        assert _same(xg.grad, bi_torch.matmul(torch.ones(6, 32, device=DEVICE), w))


@pytest.mark.parametrize(("value", "on"), [("1", True), ("0", False), ("", False)])
def test_environment_variable_switches_on_at_import(value, on):
    env = {**os.environ, "BI_BATCH_INVARIANT": value}
    run = subprocess.run([sys.executable, "-c", "import bi_torch; print(bi_torch.is_batch_invariant_mode())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(on)


def test_environment_variable_with_a_bad_value_is_refused():
    env = {**os.environ, "BI_BATCH_INVARIANT": "maybe"}
    run = subprocess.run([sys.executable, "-c", "import bi_torch"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and "BI_BATCH_INVARIANT='maybe'" in run.stderr, run.stderr


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_capture_and_replay_run_the_kernels():
    x, w, b = _data(rows=32)
    static = x.clone()
    with bi_torch.enable_batch_invariant_mode():
        f = lambda t: torch.log_softmax(torch.nn.functional.linear(t, w, b), -1).mean(-1)  # noqa: E731
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            f(static)  # warm-up: compile the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f(static)
        new = torch.randn_like(x)
        static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = f(new)
    assert _same(out, want)
    assert _same(out, bi_torch.mean(bi_torch.log_softmax(bi_torch.linear(new, w, b), -1), -1))


@torch.no_grad()
def test_calls_pytorch_refuses_raise_its_error_without_a_warning():
    x, w, _ = _data()
    before = switch.fallbacks().get("mm", 0)
    with bi_torch.enable_batch_invariant_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            torch.mm(x, w)  # (6, 64) @ (32, 64)
    assert switch.fallbacks().get("mm", 0) == before


def test_backward_formulas_run_the_bi_kernels(monkeypatch):
    """Under the switch, softmax's, log_softmax's, RMSNorm's and the
    embedding's backward ops are the bi_ kernels: a training step through
    torch's functions calls each and gives the bi_ ops' own gradient bits
    (the embedding's padding row none), with and without RMSNorm's weight
    gradient."""
    want = training_step(DEVICE, None, direct=True)
    before = dict(switch.fallbacks())
    calls = count_backward_kernels(monkeypatch)
    got = training_step(DEVICE, bi_torch.enable_batch_invariant_mode())
    assert calls == {"embedding_backward": 1, "normalise_backward": 2, "rms_norm_backward": 1}, calls
    assert all(_same(a, b) for a, b in zip(got, want))
    padded = training_step(DEVICE, bi_torch.enable_batch_invariant_mode(), padding_idx=0)
    assert not padded[0][0].any() and _same(padded[0][1:], want[0][1:])
    no_w = training_step(DEVICE, bi_torch.enable_batch_invariant_mode(), weight_grad=False)
    assert no_w[1] is None and _same(no_w[0], want[0]) and _same(no_w[2], want[2])
    assert dict(switch.fallbacks()) == before  # nothing ran PyTorch's kernel


def test_backward_ops_at_the_edges():
    """The overridden backward ops where their inputs are unusual: an
    embedding gradient with ids past the table (dropped, as PyTorch drops
    them; the kernel writes nothing for them), softmax's backward of a 0-d
    tensor (zero), and ``nll_loss_backward`` called with a ``total_weight``
    of its own (honoured, as aten's contract says)."""
    aten = torch.ops.aten
    g = torch.ones(4, 6, device=DEVICE)
    ids = torch.tensor([0, 1, 10, 2], device=DEVICE)
    want = aten.embedding_dense_backward(g, ids, 10, -1, False)
    x = torch.randn((), device=DEVICE, requires_grad=True)
    logits = torch.randn(5, 7, device=DEVICE)
    t = torch.tensor([1, 2, 3, -100, 6], device=DEVICE)
    nll = aten.nll_loss_backward(torch.tensor(1.0, device=DEVICE), logits, t, None, 1, -100,
                                 torch.tensor(3.0, device=DEVICE))
    with bi_torch.enable_batch_invariant_mode():
        got = aten.embedding_dense_backward(g, ids, 10, -1, False)
        torch.softmax(x, 0).backward()
        got_nll = aten.nll_loss_backward(torch.tensor(1.0, device=DEVICE), logits, t, None, 1, -100,
                                         torch.tensor(3.0, device=DEVICE))
    assert torch.equal(got, want) and float(got.sum()) == 18.0
    assert x.grad is not None and float(x.grad) == 0.0
    assert torch.equal(got_nll, nll) and abs(float(got_nll[0, 1]) + 1 / 3) < 1e-7

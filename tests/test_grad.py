"""Backward passes (``harness.grads``): for every op and input with a
backward, the gradient's accuracy against float64, its run-to-run bits, its
batch invariance per row (batch arguments), the training forward's parity
with inference, and the negative controls of the gradients.

``pytest -k invariance`` selects the invariance properties and the controls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import Phase, given, settings

from harness import grads, properties, registry
from harness.frameworks import adapter
from harness.strategies import problems
from tests_profile import PROFILE


# In the CPU interpreters every example runs a forward and a backward: float16
# (the same kernels and code paths as bfloat16) is left to the GPU run, and
# each property draws half the examples.
_DTYPES = None if PROFILE.native else ("float32", "bfloat16")
_EXAMPLES = PROFILE.max_examples if PROFILE.native else max(4, PROFILE.max_examples // 2)
_TORCH_DEVICE = "cuda" if PROFILE.native else "cpu"  # for tests that build torch tensors themselves
# Attention's backward (five products and a softmax over (L, L) scores per
# head) takes minutes per property in the interpreter: its properties run on
# the GPU; test_attention_backward_in_the_interpreter covers it on the CPU.
_GPU_ONLY = {"attention"}


def _cases(row_invariant_only=False):
    out = []
    for op, wrt, fw in grads.cases():
        spec = registry.get(op)
        if row_invariant_only and not grads.row_invariant(spec, wrt):
            continue
        marks = [pytest.mark.gpu] if op in _GPU_ONLY else []
        for dtype in spec.dtypes if _DTYPES is None else [d for d in spec.dtypes if d in _DTYPES]:
            out.append(pytest.param(op, wrt, fw, dtype, id=f"{op}-{wrt}-{fw}-{dtype}", marks=marks))
    return out


def _run(op, wrt, framework, dtype, check, max_rows=None):
    """``check(gspec, adapter, gradient fn, inputs, problem, rng, label)`` over
    drawn problems (inputs of ``problem.plan.full`` rows, at most ``max_rows``)."""
    spec, ad = registry.get(op), adapter(framework)
    gspec, fn = grads.grad_spec(spec, wrt), grads.grad_function(ad, spec, wrt)
    label = f"{op}.grad[{wrt}][{framework}, {dtype}, {PROFILE.name}]"

    @settings(max_examples=_EXAMPLES)
    @given(problems(PROFILE, spec=gspec))  # the gradient's batch budget (grad_row_elements)
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        rows = problem.plan.full if max_rows is None else min(problem.plan.full, max_rows)
        check(gspec, ad, fn, spec.make_inputs(rng, rows, problem.features, dtype), problem, rng, label)

    prop()


@pytest.mark.parametrize("op,wrt,framework,dtype", _cases(row_invariant_only=True))
def test_grad_invariance(op, wrt, framework, dtype):
    _run(op, wrt, framework, dtype, lambda gspec, ad, fn, inputs, problem, rng, label:
         properties.check_batch_invariance(gspec, ad, fn, inputs, problem.plan, dtype, rng, label=label))


@pytest.mark.parametrize("op,wrt,framework,dtype", _cases())
def test_grad_determinism(op, wrt, framework, dtype):
    _run(op, wrt, framework, dtype, lambda gspec, ad, fn, inputs, problem, rng, label:
         properties.check_determinism(gspec, ad, fn, inputs, label=label))


@pytest.mark.parametrize("op,wrt,framework,dtype", _cases())
def test_grad_accuracy(op, wrt, framework, dtype):
    # At most 96 rows: the float64 reference runs on the host.
    _run(op, wrt, framework, dtype, lambda gspec, ad, fn, inputs, problem, rng, label:
         properties.check_accuracy(gspec, ad, fn, inputs, dtype, label=label, atol_by_scale=True), max_rows=96)


@pytest.mark.parametrize("op,wrt,framework,dtype", _cases())
def test_training_forward_is_the_inference_forward(op, wrt, framework, dtype):
    _run(op, wrt, framework, dtype, lambda gspec, ad, fn, inputs, problem, rng, label:
         grads.check_forward_parity(registry.get(op), ad, inputs, wrt, label=label))


def _control_cases():
    return [pytest.param(op, fw, name, id=f"{op}-{fw}-{name}")
            for op, wrt, fw in grads.cases() if wrt == registry.get(op).batch_arg
            for name in registry.get(op).grad_controls]


@pytest.mark.parametrize("op,framework,name", _control_cases())
def test_grad_invariance_catches_control(op, framework, name):
    """A gradient whose row reduction is split by the batch size is caught."""
    spec, ad = registry.get(op), adapter(framework)
    gspec = grads.grad_spec(spec, spec.batch_arg)
    fn = ad.control(gspec, name)

    @settings(max_examples=max(PROFILE.max_examples, 30), phases=[Phase.generate], database=None)
    @given(problems(PROFILE, min_features=16, spec=gspec))
    def prop(problem):
        rng = np.random.default_rng(problem.seed)
        inputs = spec.make_inputs(rng, problem.plan.full, problem.features, "float32")
        properties.check_batch_invariance(gspec, ad, fn, inputs, problem.plan, "float32", rng,
                                          label=f"{gspec.name}[{framework} control {name}]")

    with pytest.raises(properties.BatchVarianceError, match="batch invariance violated"):
        prop()


def test_every_differentiable_op_has_a_control_or_is_a_pointwise_broadcast():
    """The gradient properties can fail: each op family with a row reduction
    in its backward has a control that the invariance property catches."""
    with_controls = {op for op, _, name in (c.values for c in _control_cases())}
    assert {"matmul", "rms_norm", "softmax"} <= with_controls


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_attention_backward_in_the_interpreter(framework):
    """Attention's backward, small: causal GQA against the float64 gradients
    (queries before and after the keys' end), and a sequence's gradients
    alone equal its gradients in a batch."""
    from harness.specs import attention as spec_module

    spec, ad = registry.get("attention"), adapter(framework)
    kernel = ad.kernel(spec)
    rng = np.random.default_rng(0)
    for lq, lk in ((5, 5), (3, 9)):
        inputs = {n: rng.standard_normal(s, dtype=np.float32) for n, s in
                  (("q", (2, lq, 4, 64)), ("k", (2, lk, 2, 64)), ("v", (2, lk, 2, 64)))}
        native = ad.natives(inputs)
        out = ad.call(kernel, spec, native).astype(np.float64)
        want = spec_module._grads({n: a.astype(np.float64) for n, a in inputs.items()}, out)
        for n, (name, w) in enumerate(zip("qkv", want)):
            fn = grads.grad_function(ad, spec, name)
            got = ad.call(fn, spec, native)
            np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4, err_msg=f"{name} ({lq}, {lk})")
            alone = ad.call(fn, spec, ad.take_batch_rows(spec, native, 1, 2))
            assert np.array_equal(alone, got[1:2]), f"{name}: the sequence alone differs ({lq}, {lk})"


def _float64_attention_grads(q, k, v, causal, dtype):
    """torch autograd through a float64 softmax attention (queries that see
    no key: zero output, zero gradients); the cotangent is the output rounded
    to ``dtype``. Returns (that output, (dq, dk, dv) in float64)."""
    import torch

    lq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    lk, hkv = k.shape[1], k.shape[2]
    leaves = [(t.double() if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t, np.float64)))
              .detach().requires_grad_() for t in (q, k, v)]
    qd, kd, vd = (t.transpose(1, 2) for t in leaves)
    kd, vd = (t.repeat_interleave(hq // hkv, 1) for t in (kd, vd))
    s = qd @ kd.transpose(-1, -2) / d ** 0.5
    if causal:
        seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~seen, float("-inf"))
    out64 = (torch.nan_to_num(torch.softmax(s, -1)) @ vd).transpose(1, 2)
    out = out64.detach().to(dtype)
    return out, torch.autograd.grad(out64, leaves, out.double())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_fused_attention_backward(dtype):
    """``bi_torch.ops.attention_grad``: against float64 gradients, and against
    torch's autograd through a float64 softmax attention where queries see no
    key (more queries than keys, causal: zero gradients); a sequence alone
    gets its bits in the batch, for head sizes 64 and 128 and lengths across
    several tiles."""
    import torch

    from bi_torch.ops.attention import _dense
    from bi_torch.ops.attention_grad import attention_backward

    dt = getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 6e-2
    gen = torch.Generator().manual_seed(0)

    def forward_lse(q, k, v, causal, split_kv):
        return _dense("attention", q, k, v, causal=causal, scale=None, window=None, bottom_right=True,
                      split_kv=split_kv, with_lse=True)[1]

    from bi_core.attention import SPLIT

    # (the last: more keys than a split holds, so split_kv=True runs the merge kernel)
    # (200 and 150 queries: tiles that see every key, which skip the mask)
    for b, lq, lk, hq, hkv, d, causal in ((2, 70, 70, 4, 1, 64, True), (2, 3, 90, 2, 1, 128, True),
                                          (2, 9, 4, 2, 2, 64, True), (2, 33, 40, 2, 2, 64, False),
                                          (2, 20, SPLIT + 88, 2, 1, 64, True), (2, 200, 200, 2, 1, 64, True),
                                          (2, 150, 150, 2, 1, 64, False)):
        shape = (lq, lk, hq, hkv, d)
        q, k, v = (torch.randn(b, n, h, d, generator=gen).to(dt) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        out, want = _float64_attention_grads(q, k, v, causal, dt)
        dev = [t.to(_TORCH_DEVICE) for t in (q, k, v, out, out)]
        # The forward's statistics: the same bits from one program per tile
        # and from split-KV, a sequence's alone and in the batch, and each
        # query's log2-sum-exp2 (+inf where it sees no key).
        lse = forward_lse(*dev[:3], causal, False)
        assert torch.equal(lse, forward_lse(*dev[:3], causal, True)), f"split-KV's lse differs {shape}"
        assert torch.equal(lse[hq:], forward_lse(*(t[1:] for t in dev[:3]), causal, False)), f"lse alone {shape}"
        s64 = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(hq // hkv, 2)) / d ** 0.5
        if causal:
            s64 = s64.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq), float("-inf"))
        lse64 = (torch.logsumexp(s64, -1) / math.log(2)).reshape(b * hq, lq)
        lse64 = torch.where(torch.isneginf(lse64), float("inf"), lse64)
        # (16-bit inputs: the row sums add the probabilities rounded to the inputs' dtype)
        lse_tol = 1e-5 if dtype == "float32" else 1e-2
        torch.testing.assert_close(lse.cpu().double(), lse64, rtol=lse_tol, atol=lse_tol,
                                   msg=lambda m: f"lse {shape}: {m}")
        for kept in (None, lse):  # the statistics recomputed by the backward, and the forward's
            got = [t.cpu() for t in attention_backward(*dev, causal, lse=kept)]
            for name, x, w in zip("qkv", got, want):
                assert x.dtype == dt and x.shape == w.shape
                torch.testing.assert_close(x.double(), w, rtol=tol, atol=tol * max(1.0, float(w.abs().max())),
                                           msg=lambda m: f"{name} {shape} lse={kept is not None}: {m}")
            alone = [t.cpu() for t in attention_backward(*(t[1:] for t in dev), causal,
                                                         lse=None if kept is None else kept[hq:])]
            assert all(torch.equal(x[1:], y) for x, y in zip(got, alone)), f"alone differs {shape}"


# On a GPU: lengths across several tiles, past MASK_FREE_FROM (mask-free loops), and 16-bit inputs.
_PACKED_LENGTHS = ((300, 700), (2100, 2100), (0, 40), (50, 0), (513, 129)) if PROFILE.native else \
    ((5, 9), (7, 7), (0, 4), (6, 0), (11, 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"] if PROFILE.native else ["float32"])
def test_torch_attention_trains_with_key_lengths_and_packed_sequences(dtype):
    """``bi_torch.attention(kv_lengths=...)`` and ``bi_torch.varlen_attention``
    under autograd (causal and full, GQA, sequences of unequal lengths, one
    with no query and one whose queries see no key): each sequence's
    gradients are those of the sequence alone in a dense batch of one, bit
    for bit, and near float64's; padding keys get zero gradients; a window is
    refused by name."""
    import torch

    import bi_torch

    gen = torch.Generator().manual_seed(11)
    hq, hkv, d = 4, 2, 64
    dev, dt = _TORCH_DEVICE, getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 6e-2

    def grads(fn, leaves, g):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves, g)

    def alone(q, k, v, g, causal):  # (Lq, H, D) tensors: the dense batch of one
        return grads(lambda *t: bi_torch.attention(*(x[None] for x in t), causal=causal)[0], (q, k, v), g)

    for causal in (True, False):
        # (queries, keys) per sequence: more keys, as many, none of either, more queries than keys
        lengths = _PACKED_LENGTHS
        qs = [torch.randn(n, hq, d, generator=gen).to(dev, dt) for n, _ in lengths]
        ks = [torch.randn(m, hkv, d, generator=gen).to(dev, dt) for _, m in lengths]
        vs = [torch.randn(m, hkv, d, generator=gen).to(dev, dt) for _, m in lengths]
        gs = [torch.randn(n, hq, d, generator=gen).to(dev, dt) for n, _ in lengths]
        cu_q, cu_k = (torch.tensor([0, *np.cumsum([x[i] for x in lengths])], dtype=torch.int32, device=dev)
                      for i in (0, 1))
        packed = [torch.cat(t) for t in (qs, ks, vs)]
        out, got = grads(lambda q, k, v: bi_torch.varlen_attention(q, k, v, cu_q, cu_k, causal=causal), packed,
                         torch.cat(gs))
        for s, (n, m) in enumerate(lengths):
            rows_q, rows_k = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
            one_out, one = alone(qs[s], ks[s], vs[s], gs[s], causal)
            label = f"varlen sequence {s} {(n, m)} causal={causal}"
            assert torch.equal(out[rows_q], one_out), label
            for name, x, y in zip("qkv", got, one):
                assert torch.equal(x[rows_q if name == "q" else rows_k], y), f"d{name}: {label}"
            if n and m:  # near float64's gradients for the cotangent gs[s]
                leaves = [t.double().requires_grad_() for t in (qs[s], ks[s], vs[s])]
                qd, kd, vd = (t.transpose(0, 1) for t in leaves)
                kd, vd = (t.repeat_interleave(hq // hkv, 0) for t in (kd, vd))
                sc = qd @ kd.transpose(-1, -2) / d ** 0.5
                if causal:
                    sc = sc.masked_fill(torch.arange(m)[None, :] > torch.arange(n)[:, None] + (m - n), float("-inf"))
                o64 = (torch.nan_to_num(torch.softmax(sc, -1)) @ vd).transpose(0, 1)
                want = torch.autograd.grad(o64, leaves, gs[s].double())
                for name, x, w in zip("qkv", one, want):
                    torch.testing.assert_close(x.double(), w, rtol=tol, atol=tol * max(1.0, float(w.abs().max())),
                                               msg=lambda e: f"d{name} {label}: {e}")
        # Dense key lengths: the padded batch's sequence b is sequence b alone with its first kv_lengths[b] keys.
        lq, lk = 6, 10
        kv_lengths = torch.tensor([10, 3, 0, 7], dtype=torch.int32, device=dev)
        q, g = (torch.randn(4, lq, hq, d, generator=gen).to(dev, dt) for _ in range(2))
        k, v = (torch.randn(4, lk, hkv, d, generator=gen).to(dev, dt) for _ in range(2))
        out, got = grads(lambda q, k, v: bi_torch.attention(q, k, v, causal=causal, kv_lengths=kv_lengths),
                         (q, k, v), g)
        for b, m in enumerate(kv_lengths.tolist()):
            one_out, one = alone(q[b], k[b, :m], v[b, :m], g[b], causal)
            label = f"kv_lengths sequence {b} ({m} keys) causal={causal}"
            assert torch.equal(out[b], one_out), label
            assert torch.equal(got[0][b], one[0]), f"dq: {label}"
            for name, x, y in zip("kv", got[1:], one[1:]):
                assert torch.equal(x[b, :m], y) and not x[b, m:].any(), f"d{name}: {label}"
    leaves = [t.detach().clone().requires_grad_() for t in packed]
    with pytest.raises(NotImplementedError, match="forward-only"):
        bi_torch.varlen_attention(*leaves, cu_q, cu_k, window=(2, 0))
    from bi_torch.ops.attention_grad import attention_backward

    args = (*packed, torch.cat(qs), torch.cat(gs), True)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k go together"):
        attention_backward(*args, cu_seqlens_q=cu_q, max_seqlen_q=9, max_seqlen_k=9)
    with pytest.raises(ValueError, match="need max_seqlen_q and max_seqlen_k"):
        attention_backward(*args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_torch_row_backward_kernels():
    """``bi_torch.ops.rows_grad`` through autograd, against float64 torch:
    RMSNorm with and without a weight, each input alone requiring grad, rows
    longer than a chunk; softmax and log_softmax over a leading dimension and
    into another dtype; rows alone get their batch bits, and the weight
    gradient is the same for the same batch."""
    import torch

    import bi_torch

    gen = torch.Generator().manual_seed(0)
    for n in (5, 100, 1500):  # one chunk, one ragged chunk, two chunks
        x, w, g = (torch.randn(*shape, generator=gen).to(_TORCH_DEVICE) for shape in ((6, 3, n), (n,), (6, 3, n)))
        for with_w, wrt in ((True, "xw"), (True, "x"), (True, "w"), (False, "x")):
            xs = x.clone().requires_grad_("x" in wrt)
            ws = w.clone().requires_grad_("w" in wrt) if with_w else None
            leaves = [t for t in (xs, ws) if t is not None and t.requires_grad]
            got = torch.autograd.grad(bi_torch.rms_norm(xs, ws, 1e-6), leaves, g)
            x64 = x.double().requires_grad_("x" in wrt)
            w64 = w.double().requires_grad_("w" in wrt) if with_w else None
            y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 if w64 is None else w64)
            want = torch.autograd.grad(y64, [t for t in (x64, w64) if t is not None and t.requires_grad], g.double())
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n} {wrt}: {m}")
            if "x" in wrt:
                alone = torch.autograd.grad(bi_torch.rms_norm(xs[2:3], ws, 1e-6), xs, g[2:3])[0]
                assert torch.equal(alone[2:3], got[0][2:3]), (n, wrt)
            again = torch.autograd.grad(bi_torch.rms_norm(xs, ws, 1e-6), leaves, g)
            assert all(torch.equal(a, b) for a, b in zip(got, again)), (n, wrt)
        for op in ("softmax", "log_softmax"):
            xs = x.clone().to(torch.bfloat16).requires_grad_()
            got = torch.autograd.grad(getattr(bi_torch, op)(xs, 0, dtype=torch.float32), xs, g)[0]
            assert got.dtype == torch.bfloat16
            x64 = xs.detach().double().requires_grad_()
            want = torch.autograd.grad(getattr(torch, op)(x64, 0), x64, g.double())[0]
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{op} {n}: {m}")
            alone = torch.autograd.grad(getattr(bi_torch, op)(xs[:, 1:2], 0, dtype=torch.float32), xs,
                                        g[:, 1:2])[0]
            assert torch.equal(alone[:, 1:2], got[:, 1:2]), (op, n)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_attention_backward_tiles_without_the_mask_give_the_masked_bits(framework, monkeypatch):
    """From ``MASK_FREE_FROM`` tokens the gradient kernels run the tiles that
    see every key without the mask, in loops of their own: the same values in
    the same order, so dQ, dK, dV keep the single masked loop's bits (causal
    with more keys than queries and the reverse, full, GQA, a last partial
    block). A reordered or dropped tile fails this."""
    from bi_core import attention as contract

    rng = np.random.default_rng(5)
    for lq, lk, causal in ((200, 200, True), (150, 230, True), (230, 150, True), (150, 150, False)):
        q, k, v, o, g = (rng.standard_normal((2, n, h, 64), dtype=np.float32)
                         for n, h in ((lq, 4), (lk, 2), (lk, 2), (lq, 4), (lq, 4)))
        got = {}
        for mask_free_from in (10 ** 9, 0):
            monkeypatch.setattr(contract, "MASK_FREE_FROM", mask_free_from)
            if framework == "torch":
                import torch

                from bi_torch.ops.attention_grad import attention_backward

                dev = [torch.as_tensor(t).to(_TORCH_DEVICE, torch.bfloat16) for t in (q, k, v, o, g)]
                got[mask_free_from] = [t.float().cpu().numpy() for t in attention_backward(*dev, causal)]
            else:
                import jax.numpy as jnp

                from bi_jax.ops.attention_grad import attention_backward

                dev = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v, o, g)]
                got[mask_free_from] = [np.asarray(t.astype(jnp.float32))
                                       for t in attention_backward(*dev, causal=causal)]
        for name, a, b in zip("qkv", got[10 ** 9], got[0]):
            assert np.array_equal(a.view(np.int32), b.view(np.int32)), f"d{name} {(lq, lk, causal)}"


def test_jax_fused_attention_backward():
    """``bi_jax.ops.attention_grad`` (float32; bfloat16 takes the same code):
    against float64 gradients, with queries that see no key, and a sequence
    alone gets its bits in the batch."""
    import jax.numpy as jnp
    import torch

    from bi_jax.ops.attention_grad import attention_backward

    from bi_core.attention import SPLIT

    rng = np.random.default_rng(2)
    # (the last: more keys than a split holds, so split_kv=True runs the merge kernel)
    for lq, lk, hq, hkv, causal in ((70, 70, 2, 1, True), (9, 4, 2, 2, True), (33, 40, 2, 2, False),
                                    (12, SPLIT + 88, 2, 1, True), (200, 200, 2, 1, True), (150, 150, 2, 1, False)):
        q, k, v = (rng.standard_normal((2, n, h, 64), dtype=np.float32) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        out, want = _float64_attention_grads(q, k, v, causal, torch.float32)
        o = jnp.asarray(out.numpy())
        got = attention_backward(*(jnp.asarray(t) for t in (q, k, v)), o, o, causal=causal)
        for name, x, w in zip("qkv", got, want):
            np.testing.assert_allclose(np.asarray(x), w.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} {(lq, lk)}")
        alone = attention_backward(*(jnp.asarray(t[1:]) for t in (q, k, v)), o[1:], o[1:], causal=causal)
        assert all(np.array_equal(np.asarray(x)[1:], np.asarray(y)) for x, y in zip(got, alone)), (lq, lk)
        # The forward's statistics (autograd's path): the same bits with and
        # without split-KV, and the backward from them as accurate.
        lse = [_jax_forward_lse(q, k, v, causal, split) for split in (False, True)]
        assert np.array_equal(*lse), f"split-KV's lse differs {(lq, lk)}"
        got = attention_backward(*(jnp.asarray(t) for t in (q, k, v)), o, o, causal=causal, lse=lse[0])
        for name, x, w in zip("qkv", got, want):
            np.testing.assert_allclose(np.asarray(x), w.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} {(lq, lk)}")


def test_jax_attention_trains_with_key_lengths_and_packed_sequences():
    """The JAX twin of the torch test above: ``jax.grad`` through
    ``bi_jax.varlen_attention`` (causal, GQA, unequal lengths, a sequence with
    no query and one whose queries see no key), ``bi_jax.attention`` with
    ``kv_lengths`` and ``dot_product_attention`` with
    ``key_value_seq_lengths`` (queries aligned to the keys' start): each
    sequence's gradients are its gradients alone, bit for bit, and padding
    keys get zeros; torch's kernels give the same values."""
    import jax
    import jax.numpy as jnp
    import torch

    import bi_jax
    import bi_torch

    rng = np.random.default_rng(12)
    hq, hkv, d = 4, 2, 64
    # On a GPU: bfloat16 (fp32's backward compiles for ~90 s per new length) at lengths across tiles.
    dt = jnp.bfloat16 if PROFILE.native else jnp.float32
    lengths = ((300, 700), (0, 40), (50, 0), (513, 129)) if PROFILE.native else ((5, 9), (0, 4), (6, 0), (11, 3))

    def grads(fn, leaves, g):
        out, pull = jax.vjp(fn, *leaves)
        return np.asarray(out.astype(jnp.float32)), [np.asarray(x.astype(jnp.float32)) for x in pull(g)]

    def alone(q, k, v, g, causal, bottom_right=True):
        if bottom_right:
            return grads(lambda *t: bi_jax.attention(*(x[None] for x in t), causal=causal)[0], (q, k, v), g)
        return grads(lambda *t: bi_jax.dot_product_attention(*(x[None] for x in t), is_causal=causal)[0],
                     (q, k, v), g)

    qs, ks, vs, gs = ([jnp.asarray(rng.standard_normal((x[i], h, d), dtype=np.float32), dt) for x in lengths]
                      for i, h in ((0, hq), (1, hkv), (1, hkv), (0, hq)))
    cu_q, cu_k = (jnp.asarray([0, *np.cumsum([x[i] for x in lengths])], jnp.int32) for i in (0, 1))
    packed = [jnp.concatenate(t) for t in (qs, ks, vs)]
    longest = [max(x[i] for x in lengths) for i in (0, 1)]
    out, got = grads(lambda q, k, v: bi_jax.varlen_attention(q, k, v, cu_q, cu_k, *longest, causal=True), packed,
                     jnp.concatenate(gs))
    for s, (n, m) in enumerate(lengths):
        rows_q, rows_k = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        one_out, one = alone(qs[s], ks[s], vs[s], gs[s], True)
        assert np.array_equal(out[rows_q], one_out), f"varlen sequence {s}"
        for name, x, y in zip("qkv", got, one):
            assert np.array_equal(x[rows_q if name == "q" else rows_k], y), f"d{name}: varlen sequence {s}"
    # torch's kernels on the same packed batch (whose gradients the torch test holds to float64's): the same
    # values within fp32 rounding (the two interpreters write the products out differently).
    tdt = getattr(torch, jnp.dtype(dt).name)
    tleaves = [torch.tensor(np.asarray(t.astype(jnp.float32)), device=_TORCH_DEVICE).to(tdt).requires_grad_()
               for t in packed]
    tout = bi_torch.varlen_attention(*tleaves, torch.tensor(np.asarray(cu_q), device=_TORCH_DEVICE),
                                     torch.tensor(np.asarray(cu_k), device=_TORCH_DEVICE), causal=True)
    tg = torch.tensor(np.asarray(jnp.concatenate(gs).astype(jnp.float32)), device=_TORCH_DEVICE).to(tdt)
    tol = 1e-5 if dt == jnp.float32 else 2e-2
    for name, a, b in zip("qkv", got, torch.autograd.grad(tout, tleaves, tg)):
        np.testing.assert_allclose(a, b.float().cpu().numpy(), rtol=tol, atol=tol, err_msg=f"d{name} against torch's")
    # Key lengths, dense: aligned to the end of each sequence's keys (attention) and to their start
    # (dot_product_attention, full: key_value_seq_lengths).
    lq, lk = 6, 10
    kv_lengths = jnp.asarray([10, 3, 0], jnp.int32)
    q, g = (jnp.asarray(rng.standard_normal((3, lq, hq, d), dtype=np.float32), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((3, lk, hkv, d), dtype=np.float32), dt) for _ in range(2))
    for bottom_right, fn in ((True, lambda q, k, v: bi_jax.attention(q, k, v, causal=True, kv_lengths=kv_lengths)),
                             (False, lambda q, k, v: bi_jax.dot_product_attention(
                                 q, k, v, key_value_seq_lengths=kv_lengths))):
        out, got = grads(fn, (q, k, v), g)
        for b, m in enumerate(np.asarray(kv_lengths).tolist()):
            one_out, one = alone(q[b], k[b, :m], v[b, :m], g[b], bottom_right, bottom_right)
            label = f"kv_lengths sequence {b} ({m} keys), aligned to the {'end' if bottom_right else 'start'}"
            assert np.array_equal(out[b], one_out), label
            assert np.array_equal(got[0][b], one[0]), f"dq: {label}"
            for name, x, y in zip("kv", got[1:], one[1:]):
                assert np.array_equal(x[b, :m], y) and not x[b, m:].any(), f"d{name}: {label}"


def _jax_forward_lse(q, k, v, causal, split_kv):
    """bi_jax's attention forward's statistics, in (sequence, query head,
    query) order."""
    import jax.numpy as jnp

    from bi_core import attention as contract
    from bi_jax.ops.attention import _row_major_strides, launch

    (b, lq, hq, d), lk, hkv = q.shape, k.shape[1], k.shape[2]
    qs, ks = _row_major_strides(q.shape)[:3], _row_major_strides(k.shape)[:3]
    _, rows = launch(*(jnp.asarray(t) for t in (q, k, v)), batch=b, hkv=hkv, group=hq // hkv, q_strides=qs,
                     k_strides=ks, v_strides=ks, q_len=lq, kv_len=lk, max_q_len=lq, max_kv_len=lk,
                     qk_scale=contract.qk_scale(None, d), window=contract.window_sides(causal, None),
                     bottom_right=True, split_kv=split_kv, with_lse=True)
    return rows[:, :lq * (hq // hkv)].reshape(b, hkv, lq, hq // hkv).transpose(0, 1, 3, 2).reshape(-1)


def test_jax_second_derivatives_are_refused_naming_the_kernel():
    """First-order gradients only: a second derivative reaches a kernel's own
    derivative, which names itself (Pallas alone fails with a bare
    AssertionError); first derivatives, jitted or not, still run."""
    import jax
    import jax.numpy as jnp

    import bi_jax

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16)), jnp.float32)
    for f in (lambda a: bi_jax.rms_norm(a, jnp.ones(16)), bi_jax.silu_and_mul, bi_jax.softmax,
              lambda a: bi_jax.matmul(a, a.T)):
        loss = lambda a, f=f: f(a).astype(jnp.float32).sum()  # noqa: E731
        assert jax.jit(jax.grad(loss))(x).shape == x.shape
        with pytest.raises(NotImplementedError, match=r"bi_jax kernel 'bi_\w+': second derivatives are not supported"):
            jax.grad(lambda a, loss=loss: jax.grad(loss)(a).sum())(x)


def test_jax_mean_gradient_is_one_division_per_row():
    """``mean``'s gradient in JAX is ``g / n`` rounded once, for any batch: XLA
    turns a division by a scalar into a product with its rounded reciprocal
    for some shapes only (on the CPU, two rows multiplied where one divided)."""
    import jax
    import jax.numpy as jnp

    import bi_jax

    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 96), dtype=np.float32))
    for rows in (1, 2, 4):
        g = jnp.asarray(np.random.default_rng(rows).standard_normal(rows, dtype=np.float32))
        _, vjp = jax.vjp(lambda x: bi_jax.mean(x, axis=-1), x[:rows])
        (got,) = vjp(g)
        want = np.broadcast_to((np.asarray(g) / np.float32(96))[:, None], (rows, 96))
        assert np.array_equal(np.asarray(got), want), f"{rows} rows"


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_gradient_is_an_ordered_sum(framework, dtype):
    """``embedding``'s weight gradient: each table row is the sum, in fp32 and
    in token order, of the output gradients of the tokens that looked it up
    (bit for bit against that sum, rounded once), rows nobody looked up are 0,
    the forward is the gather, and every run gives the same bits; a repeated
    id across sequences, the first and the last row, and empty ids."""
    pytest.importorskip(framework)
    rng = np.random.default_rng(0)
    num_rows, h = 40, 300 if dtype == "float32" else 70
    ids = rng.integers(0, num_rows, (3, 25))
    ids[0, :6] = 7
    ids[2, -3:] = 7
    ids[1, 0], ids[1, 1] = 0, num_rows - 1
    table = rng.standard_normal((num_rows, h)).astype(np.float32)
    g = rng.standard_normal((3, 25, h)).astype(np.float32)
    if framework == "torch":
        import torch

        import bi_torch

        dt = getattr(torch, dtype)
        w = torch.from_numpy(table).to(dt).to(_TORCH_DEVICE).requires_grad_()
        t_ids, t_g = torch.from_numpy(ids).to(_TORCH_DEVICE), torch.from_numpy(g).to(dt).to(_TORCH_DEVICE)

        def run(ids_, g_):
            out = bi_torch.embedding(ids_, w)
            assert torch.equal(out, w.detach()[ids_])
            return torch.autograd.grad(out, w, g_)[0].float().cpu().numpy()

        grad, again = run(t_ids, t_g), run(t_ids, t_g)
        empty = run(t_ids[:0], t_g[:0])
        g_used = t_g.float().cpu().numpy()
    else:
        import jax
        import jax.numpy as jnp

        import bi_jax

        dt = getattr(jnp, dtype)
        w = jnp.asarray(table, dt)

        def run(ids_, g_):
            out, pull = jax.vjp(lambda w_: bi_jax.embedding(ids_, w_), w)
            assert np.array_equal(np.asarray(out), np.asarray(w)[np.asarray(ids_)])
            return np.asarray(pull(g_)[0]).astype(np.float32)

        j_ids, j_g = jnp.asarray(ids, jnp.int32), jnp.asarray(g, dt)
        grad, again = run(j_ids, j_g), run(j_ids, j_g)
        empty = run(j_ids[:0], j_g[:0])
        g_used = np.asarray(j_g).astype(np.float32)
    assert np.array_equal(grad, again) and not empty.any()
    flat_ids, flat_g = ids.reshape(-1), g_used.reshape(-1, h)
    for row in range(num_rows):
        acc = np.zeros(h, np.float32)
        for pos in np.nonzero(flat_ids == row)[0]:  # token order
            acc = acc + flat_g[pos]
        want = acc if dtype == "float32" else _round_bf16(acc)
        assert np.array_equal(grad[row], want), f"row {row}"


def _round_bf16(x):
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.skipif(PROFILE.native, reason="a CPU without the interpreter")
def test_torch_embedding_for_training_needs_a_device_its_backward_runs_on():
    """A CPU table that requires grad, without the Triton interpreter: refused
    at the forward with the way out, not at the backward by Triton's driver;
    without grad the gather runs."""
    import os
    import subprocess
    import sys
    import textwrap

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BI_DEVICE")}
    code = textwrap.dedent("""
        import torch, bi_torch
        ids, w = torch.tensor([1, 2]), torch.zeros(4, 3)
        assert bi_torch.embedding(ids, w).shape == (2, 3)
        try:
            bi_torch.embedding(ids, w.requires_grad_())
        except ValueError as e:
            print("refused:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: embedding:" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stdout


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_embedding_refuses_bad_input(framework):
    pytest.importorskip(framework)
    bi = __import__(f"bi_{framework}")
    if framework == "torch":
        import torch

        table, ids = torch.zeros(4, 3), torch.tensor([1, 2])
        with pytest.raises(TypeError, match="ids must be"):
            bi.embedding(ids.float(), table)
        with pytest.raises(ValueError, match="2-D floating-point"):
            bi.embedding(ids, torch.zeros(4, 3, 2))
        with pytest.raises(ValueError, match="2-D floating-point"):
            bi.embedding(ids, torch.zeros(4, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match="same device"):
            bi.embedding(ids.to("meta"), table)
    else:
        import jax.numpy as jnp

        table, ids = jnp.zeros((4, 3)), jnp.asarray([1, 2])
        with pytest.raises(TypeError, match="ids must be"):
            bi.embedding(ids.astype(jnp.float32), table)
        with pytest.raises(ValueError, match="2-D floating-point"):
            bi.embedding(ids, jnp.zeros((4, 3, 2)))


def test_jax_embedding_ids_outside_the_table_as_jnp_take():
    """Negative ids count from the end and ids past the table take no
    gradient, as ``jnp.take``'s own transpose does (the kernel never writes
    outside the table); tables past int32 offsets are refused."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import bi_jax
    from bi_jax.ops.embedding import embedding_backward

    w = jnp.asarray(np.random.default_rng(0).standard_normal((10, 8)), jnp.float32)
    ids = jnp.asarray([1, 12, -1, 1, 9, -10], jnp.int32)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((6, 8)), jnp.float32)
    got = jax.vjp(lambda w: bi_jax.embedding(ids, w), w)[1](g)[0]
    want = jax.vjp(lambda w: jnp.take(w, ids, axis=0), w)[1](g)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        jax.eval_shape(lambda g: embedding_backward(jnp.zeros((2,), jnp.int32), g, 2**20, jnp.float32),
                       jax.ShapeDtypeStruct((2, 4096), jnp.float32))


def test_torch_sdpa_trains_through_the_fused_backward():
    """``bi_torch.scaled_dot_product_attention`` under autograd, without a
    mask: the output and gradients of ``bi_torch.attention`` on the
    transposed tensors (causal GQA and full); a mask, or causal with fewer
    queries than keys, is refused rather than differentiated otherwise."""
    import torch

    import bi_torch

    gen = torch.Generator().manual_seed(5)
    for causal, lq in ((True, 9), (False, 5)):
        q, k, v = (torch.randn(2, h, n, 64, generator=gen).to(_TORCH_DEVICE) for h, n in ((4, lq), (2, 9), (2, 9)))
        g = torch.randn(2, 4, lq, 64, generator=gen).to(_TORCH_DEVICE)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = bi_torch.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=True)
        got = torch.autograd.grad(out, leaves, g)
        ref_leaves = [t.transpose(1, 2).clone().requires_grad_() for t in (q, k, v)]
        ref = bi_torch.attention(*ref_leaves, causal=causal)
        want = torch.autograd.grad(ref, ref_leaves, g.transpose(1, 2))
        assert torch.equal(out.detach(), ref.detach().transpose(1, 2))
        assert all(torch.equal(a, b.transpose(1, 2)) for a, b in zip(got, want))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with pytest.raises(NotImplementedError, match="forward-only"):
        bi_torch.scaled_dot_product_attention(*leaves, attn_mask=torch.ones(5, 9, dtype=torch.bool,
                                                                            device=_TORCH_DEVICE), enable_gqa=True)
    with pytest.raises(NotImplementedError, match="as many queries as keys"):
        bi_torch.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)

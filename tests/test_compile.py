"""``torch.compile`` with the bi_ kernels (``bi_torch.compile``): the custom
ops, the backend, and the process-wide switch forcing it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bi_torch
from bi_torch.compile import compile_backend
from tests_profile import PROFILE

DEVICE = "cuda" if PROFILE.native else "cpu"


def _bits(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same(a, b):
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# On the CPU the dispatch mode computes transcendental functions one element
# at a time (ATen's vectorised and scalar CPU loops round differently,
# bi_torch.mode), which a compiled graph does not: ReLU there.
_ACT = F.silu if DEVICE == "cuda" else F.relu


class _Block(torch.nn.Module):
    """RMSNorm, linear layers, SiLU (GPU), log_softmax, a mean and causal SDPA."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm(64)
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 64, bias=False)

    def forward(self, x):  # x (B, L, 64)
        h = self.norm(x)
        b, length, _ = h.shape
        q = h.view(b, length, 1, 64).transpose(1, 2)
        h = h + F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(b, length, 64)
        h = self.down(_ACT(self.up(h)))
        return torch.log_softmax(h, -1), h.mean(-1)


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    bi_torch.disable_batch_invariant_mode()
    torch._dynamo.reset()


def _model_and_data(rows=5):
    torch.manual_seed(0)
    model = _Block().to(DEVICE).eval()
    x = torch.randn(rows, 8, 64, device=DEVICE)
    return model, x


@torch.no_grad()
@pytest.mark.parametrize("fuse", [False, "exact"])
def test_compiled_model_gives_the_dispatch_modes_eager_bits_and_is_batch_invariant(fuse):
    """The eager reference is the dispatch mode, which also routes SDPA."""
    model, x = _model_and_data()
    with bi_torch.set_batch_invariant_mode():
        eager = model(x)
    compiled = torch.compile(model, backend=compile_backend(fuse=fuse))
    got = compiled(x)
    for e, g in zip(eager, got):
        assert _same(e, g)
    alone = compiled(x[2:3])
    for g, a in zip(got, alone):
        assert _same(g[2:3], a)


@torch.no_grad()
def test_the_switch_forces_the_backend_onto_torch_compile_and_restores_it():
    model, x = _model_and_data()
    seen, plain = [], []

    def spy(gm, example_inputs):
        seen.append({n.target for n in gm.graph.nodes})
        return compile_backend()(gm, example_inputs)

    def default(gm, example_inputs):
        plain.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=default)
    before = compiled(x)
    with bi_torch.set_batch_invariant_mode():
        eager = model(x)
    with bi_torch.enable_batch_invariant_mode(compile_backend=spy):
        got = compiled(x)  # compiled before: recompiled with the forced backend
    assert len(seen) == 1 and len(plain) == 1
    for e, g in zip(eager, got):
        assert _same(e, g)
    again = compiled(x)  # off: the first graph again, no new compile
    assert len(plain) == 1 and len(seen) == 1
    for b, a in zip(before, again):
        assert _same(b, a)


@torch.no_grad()
def test_a_reduction_without_a_bi_kernel_is_refused_not_compiled():
    x = torch.randn(4, 64, device=DEVICE)
    compiled = torch.compile(lambda t: F.layer_norm(t, (64,)), backend=compile_backend())
    with pytest.raises(Exception, match="BatchVarianceRisk.*layer_norm") as info:
        compiled(x)
    cause = info.value
    while cause is not None and not isinstance(cause, bi_torch.BatchVarianceRisk):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, bi_torch.BatchVarianceRisk)


def test_exact_fusion_marks_only_the_measured_ops_on_cuda():
    """``fuse="exact"`` hands Inductor the pointwise ops measured to keep
    ATen's bits (on CUDA, bf16/fp16/fp32; casts among those) and leaves the
    rest on ATen: sigmoid, ``add`` with ``alpha``, a cube, a negation
    (Inductor's gives +0.0 for -0.0), casts (``_to_copy``), fp64, and any op
    on the CPU."""
    from torch._decomp import decomposition_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from bi_torch.compile import _float_cast, fuse_exact_pointwise

    aten = torch.ops.aten

    def f(x, c):
        h = x.float()
        v = h.pow(2)
        return ((h * torch.rsqrt(v + 1e-6)).to(torch.bfloat16), torch.sigmoid(h), torch.add(h, v, alpha=2),
                -h.pow(3), x.double() * 2, c * 2)

    def marks(table):
        with FakeTensorMode(allow_non_fake_inputs=True):  # CUDA tensors without a GPU
            gm = make_fx(f, decomposition_table=table)(torch.empty(4, 8, device="cuda", dtype=torch.bfloat16),
                                                       torch.empty(4, device="cpu"))
        count = fuse_exact_pointwise(gm)
        return count, [(str(n.target), "custom" in n.meta) for n in gm.graph.nodes if n.op == "call_function"]

    # As the backend traces: casts stay ATen's _to_copy, unmarked.
    copy = "aten._to_copy.default"
    count, marked = marks({})
    assert count == 4
    assert marked == [(copy, False), ("aten.pow.Tensor_Scalar", True), ("aten.add.Tensor", True),
                      ("aten.rsqrt.default", True), ("aten.mul.Tensor", True), (copy, False),
                      ("aten.sigmoid.default", False), ("aten.add.Tensor", False),
                      ("aten.pow.Tensor_Scalar", False), ("aten.neg.default", False), (copy, False),
                      ("aten.mul.Tensor", False), ("aten.mul.Tensor", False)]
    # A convert_element_type (from a decomposition) is marked between bf16, fp16 and fp32 only;
    # the float-casts-only decomposition leaves the cast to fp64 alone.
    cast = "prims.convert_element_type.default"
    count, marked = marks({aten._to_copy.default: decomposition_table[aten._to_copy.default]})
    assert count == 6
    assert [m for m in marked if m[0] == cast] == [(cast, True), (cast, True), (cast, False)]
    count, marked = marks({aten._to_copy.default: _float_cast})
    assert count == 6
    assert [m for m in marked if m[0] in (cast, copy)] == [(cast, True), (cast, True), (copy, False)]


def _every_value(dtype):
    if dtype == torch.float32:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1 << 20, device="cuda", generator=g) * torch.exp2(
            torch.randint(-40, 40, (1 << 20,), device="cuda", generator=g).float())
        return torch.cat((x, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45], device="cuda")))
    return torch.arange(-32768, 32768, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype)


def _bits_differ(a, b):
    return int(((_bits(a) != _bits(b)) & ~(a.isnan() & b.isnan())).sum())


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exact_fusion_gives_atens_bits_for_every_value(dtype, monkeypatch):
    """Every op that ``fuse="exact"`` fuses, over every bf16 / fp16 value (2**20
    fp32 ones), and the pointwise runs of a Llama layer, compiled against
    eager: the same bits, and the runs were fused (nodes marked)."""
    from bi_torch import compile as bc

    marked = []
    real = bc.fuse_exact_pointwise
    monkeypatch.setattr(bc, "fuse_exact_pointwise", lambda gm: marked.append(real(gm)) or marked[-1])
    x = _every_value(dtype)
    w = torch.randn(x.shape[-1], device="cuda").to(dtype)

    def rotate_half(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    cases = {
        "exp": torch.exp, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "sin": torch.sin, "cos": torch.cos,
        "tanh": torch.tanh, "log": torch.log, "div": lambda t: t / 3.0,
        "mul_add_sub": lambda t: t * 1.7 + 0.3 - t, "neg_square": lambda t: -t.pow(2),  # neg on ATen
        "rms_norm_as_transformers": lambda t: w * (t.float() * torch.rsqrt(t.float().pow(2) + 1e-6)).to(dtype),
        "rope": lambda t: t * t.cos() + rotate_half(t) * t.sin(),
        "swiglu": lambda t: F.silu(t) * (t * 0.5),  # silu stays on ATen, the products fuse
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        got = torch.compile(fn, backend=compile_backend(fuse="exact"), fullgraph=True)(x)
        assert _bits_differ(fn(x), got) == 0, name
        assert marked and marked[-1] > 0, name


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode='fastest'"):
        compile_backend(mode="fastest")
    with pytest.raises(ValueError, match="fuse=2"):
        compile_backend(fuse=2)
    with pytest.raises(ValueError, match="mode='lite'"):
        compile_backend(mode="lite")
    with pytest.raises(TypeError, match="compile_backend must be a torch.compile backend"):
        bi_torch.enable_batch_invariant_mode(compile_backend=3)
    assert not bi_torch.is_batch_invariant_mode()


@torch.no_grad()
def test_custom_ops_match_the_bi_functions():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(6, 64, generator=g).to(DEVICE) for _ in range(2))
    ops = torch.ops.bi_torch
    assert _same(ops.mm(a, b.t()), bi_torch.matmul(a, b.t()))
    assert _same(ops.softmax(a, -1, False), bi_torch.softmax(a, -1))
    assert _same(ops.sum(a, [-1], False, None), bi_torch.sum(a, -1))
    y, rstd = ops.rms_norm(a, [64], None, 1e-6)
    assert _same(y, bi_torch.rms_norm(a, None, 1e-6)) and rstd.shape == (6, 1)


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("fuse", [False, "exact"])
def test_reduce_overhead_replays_cuda_graphs_with_the_eager_bits(fuse):
    model, x = _model_and_data(rows=16)
    model = model.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    with bi_torch.set_batch_invariant_mode():
        eager = model(x)
    compiled = torch.compile(model, backend=compile_backend(mode="reduce-overhead", fuse=fuse))
    for _ in range(3):  # record, then replay
        got = [t.clone() for t in compiled(x)]
    for e, g in zip(eager, got):
        assert _same(e, g)
    alone = [t.clone() for t in compiled(x[3:4])]
    for g, a in zip(got, alone):
        assert _same(g[3:4], a)


def test_a_compiled_training_step_gets_the_bi_gradients(monkeypatch):
    """Under ``compile_backend`` the backward graph's softmax, log_softmax,
    RMSNorm and embedding backward ops (and the products) are the bi_
    kernels: the bi_ ops' own gradient bits, as eager under the switch. On
    the CPU torch decomposes RMSNorm before the graph is traced (its backward
    is then pointwise ops and bi_ sums): there the gradients it feeds are
    only close."""
    from cases import count_backward_kernels, training_step

    torch._dynamo.reset()
    want = training_step(DEVICE, None, direct=True)
    calls = count_backward_kernels(monkeypatch)
    got = training_step(DEVICE, None, compile=lambda f: torch.compile(f, backend=compile_backend()))
    assert calls["embedding_backward"] == 1 and calls["normalise_backward"] == 2, calls
    assert _same(got[2], want[2])
    if PROFILE.native:
        assert calls["rms_norm_backward"] == 1, calls
        assert all(_same(a, b) for a, b in zip(got, want))
    else:
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_cross_entropy_gets_the_switchs_bits():
    """``F.cross_entropy`` compiled with ``compile_backend``: its
    ``nll_loss`` forward and backward are custom ops (not refused), with the
    eager switch's loss and gradient bits."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 40, generator=g).to(DEVICE)
    t = torch.tensor([1, 4, -100, 39, 0, 4], device=DEVICE)

    def step(fn, ctx=None):
        import contextlib

        leaf = x.clone().requires_grad_()
        with ctx or contextlib.nullcontext():
            loss = fn(leaf)
            loss.backward()
        return loss.detach(), leaf.grad

    def ce(leaf):
        return F.cross_entropy(leaf, t)

    got = step(torch.compile(ce, backend=compile_backend()))
    want = step(ce, bi_torch.enable_batch_invariant_mode())
    assert all(_same(a, b) for a, b in zip(got, want))


def _direct_inputs(dtype=torch.float32):
    """Inputs for every public bi_ op: rows, weights, (B, L, H, D) attention,
    its packed form and a paged KV cache."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    b, length, h, d = 2, 8, 2, 64
    pages = dict(k_cache=r(4, 16, h, d), v_cache=r(4, 16, h, d),
                 block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE),
                 cache_seqlens=torch.tensor([5, 9], dtype=torch.int32, device=DEVICE))
    return dict(x=r(5, 64), gate_up=r(5, 128), w=r(96, 64), bias=r(96), norm=r(64), ids=torch.tensor(
        [[1, 7, 3], [0, 2, 2]], device=DEVICE), table=r(9, 64), q=r(b, length, h, d), k=r(b, length, h, d),
        v=r(b, length, h, d), cu=torch.tensor([0, 3, 8, 16], dtype=torch.int32, device=DEVICE),
        q1=r(b, 1, h, d), kv1=r(b, 1, h, d), **pages)


def _every_direct_op(t):
    """Each public op of bi_torch once, called directly (as a model's code
    calls them); the paged cache is written by the last call."""
    packed = t["q"].reshape(-1, *t["q"].shape[2:])
    sdpa_q = t["q"].transpose(1, 2)
    return (
        bi_torch.silu_and_mul(t["gate_up"]),
        bi_torch.matmul(t["x"], t["w"].t()),
        bi_torch.matmul(t["x"], t["w"].t(), t["bias"], out_dtype=torch.float32),
        bi_torch.linear(t["x"], t["w"], t["bias"]),
        bi_torch.rms_norm(t["x"], t["norm"], 1e-5),
        bi_torch.softmax(t["x"], -1),
        bi_torch.log_softmax(t["x"], 0),
        bi_torch.sum(t["x"], -1),
        bi_torch.mean(t["x"], (0, 1), keepdim=True),
        bi_torch.embedding(t["ids"], t["table"]),
        bi_torch.attention(t["q"], t["k"], t["v"], causal=True),
        bi_torch.attention(t["q"], t["k"], t["v"], window=(2, 0)),
        bi_torch.scaled_dot_product_attention(sdpa_q, sdpa_q, sdpa_q, is_causal=True),
        bi_torch.varlen_attention(packed, packed, packed, t["cu"], t["cu"], 8, 8, causal=True),
        bi_torch.paged_attention(t["q1"], t["k_cache"], t["v_cache"], t["block_table"], t["cache_seqlens"]),
        bi_torch.paged_attention(t["q1"], t["k_cache"], t["v_cache"], t["block_table"], t["cache_seqlens"],
                                 k_new=t["kv1"], v_new=t["kv1"]),
    )


@torch.no_grad()
@pytest.mark.parametrize("backend", ["inductor", "compile_backend"])
def test_direct_bi_calls_compile_to_one_graph_of_bi_ops_with_eagers_bits(backend):
    """A function that calls the bi_ ops directly compiles into one graph
    (``fullgraph=True``) whose nodes are the ``bi_torch_direct`` custom ops,
    under Inductor and under ``compile_backend``; its outputs (and the cache
    the paged append writes) are eager's bits. Before, Dynamo traced into
    the ops' launch code and failed."""
    eager_in, compiled_in = _direct_inputs(), _direct_inputs()
    eager = _every_direct_op(eager_in)
    graphs = []
    inner = compile_backend() if backend == "compile_backend" else "inductor"

    def capture(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend

        return (inner if callable(inner) else lookup_backend(inner))(gm, example_inputs)

    got = torch.compile(_every_direct_op, backend=capture, fullgraph=True)(compiled_in)
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {t for t in targets if "bi_torch_direct" in t} >= {
        f"bi_torch_direct.{name}.default" for name in (
            "silu_and_mul", "matmul", "linear", "rms_norm", "softmax", "log_softmax", "sum", "mean", "embedding",
            "attention", "scaled_dot_product_attention", "varlen_attention", "paged_attention",
            "paged_append_slots")}
    for i, (e, c) in enumerate(zip(eager, got)):
        assert _same(e, c), i
        assert c.stride() == (e.transpose(1, 2).contiguous().transpose(1, 2) if i == 12 else e.contiguous()).stride(), i
    for name in ("k_cache", "v_cache"):
        assert _same(eager_in[name], compiled_in[name]), name


@torch.no_grad()
@pytest.mark.parametrize("backend", ["inductor", "compile_backend"])
def test_a_compiled_paged_append_writes_caches_that_share_a_buffer_as_eager_does(backend):
    """Keys and values as the two halves of one buffer (as servers keep a
    layer's cache): the compiled append writes exactly eager's slots and
    attends as eager, decode after prefill. A custom op declaring the writes
    did not: Inductor (torch 2.11) wrote garbage into the second half."""
    g = torch.Generator().manual_seed(5)
    h, d, page = 2, 64, 4

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    table = torch.tensor([[3, 0, 4], [1, 2, 5]], dtype=torch.int32, device=DEVICE)
    q, kn, vn = r(2, 5, 2 * h, d), r(2, 5, h, d), r(2, 5, h, d)
    q1, kn1, vn1 = r(2, 1, 2 * h, d), r(2, 1, h, d), r(2, 1, h, d)

    def serve(k_cache, v_cache, q, kn, vn, lens):  # the two halves given apart, aliasing
        return bi_torch.paged_attention(q, k_cache, v_cache, table, lens, k_new=kn, v_new=vn)

    backend = compile_backend() if backend == "compile_backend" else "inductor"
    compiled = torch.compile(serve, backend=backend, fullgraph=True)
    caches, outs = [], []
    for run in (serve, compiled):
        kv = torch.zeros(2, 6, page, h, d, device=DEVICE)
        zero, five = (torch.tensor([n, n], dtype=torch.int32, device=DEVICE) for n in (0, 5))
        outs.append((run(kv[0], kv[1], q, kn, vn, zero), run(kv[0], kv[1], q1, kn1, vn1, five)))
        caches.append(kv)
    assert _same(caches[0], caches[1])
    assert int((caches[1][1] != 0).any(-1).any(-1).sum()) == 12  # 2 x 6 keys' slots written, no more
    for e, c in zip(*outs):
        assert _same(e, c)


def test_direct_bi_calls_that_need_grad_run_eagerly_inside_compile():
    """The direct custom ops have no autograd formula: a call whose inputs
    require grad runs the eager op outside the graph (a graph break), so the
    gradients are the bi_ backward's, as in eager; ``fullgraph=True`` refuses
    the break."""
    def loss(x, w, norm):
        h = bi_torch.rms_norm(bi_torch.linear(x, w), norm)
        return bi_torch.sum(bi_torch.log_softmax(h, -1) * h)

    g = torch.Generator().manual_seed(4)
    args = [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in ((5, 64), (32, 64), (32,))]
    eager = torch.autograd.grad(loss(*args), args)
    compiled = torch.autograd.grad(torch.compile(loss, backend="inductor")(*args), args)
    for e, c in zip(eager, compiled):
        assert _same(e, c)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="require grad"):
        torch.compile(loss, backend="inductor", fullgraph=True)(*args)


@pytest.mark.gpu
@torch.no_grad()
def test_direct_bi_calls_replay_in_cuda_graphs_with_eagers_bits():
    """``mode="reduce-overhead"`` over direct bi_ calls: CUDA graphs record
    the bi_ launches and replay them with eager's bits (bf16, a decode-sized
    MLP and attention)."""
    t = _direct_inputs(torch.bfloat16)

    def step(x, gate_up_w, down_w, norm, q, k, v):
        h = bi_torch.rms_norm(x, norm)
        h = bi_torch.linear(bi_torch.silu_and_mul(bi_torch.linear(h, gate_up_w)), down_w)
        return h, bi_torch.attention(q, k, v, causal=True)

    args = (t["x"], torch.cat([t["w"], t["w"]]), t["w"].t().contiguous(), t["norm"], t["q"], t["k"], t["v"])
    eager = step(*args)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # record, then replay
        got = [o.clone() for o in compiled(*args)]
    for e, c in zip(eager, got):
        assert _same(e, c)

"""Hugging Face transformers: a LlamaForCausalLM made batch-invariant with
``bi_torch.hf.batch_invariant`` gives a probe prompt the same generated tokens
and logits (``generate`` with the KV cache, left padding) and the same
prefill logits (right padding) in every batch composition. Tiny on the CPU,
at a realistic width on the GPU, where a negative control shows the default
``sdpa`` model differ.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests_profile import PROFILE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import bi_torch  # noqa: E402
import bi_torch.hf as bhf  # noqa: E402

GPU = PROFILE.native
DEVICE = "cuda" if GPU else "cpu"
# GPU: Llama-shaped width (hidden 2048, 16/8 heads of 128) at bf16; CPU: the
# smallest head dim the kernels take, two layers, fp32 under the interpreter.
WIDTH = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, vocab_size=32000) if GPU else \
    dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
         num_key_value_heads=1, head_dim=64, vocab_size=96)
DTYPE = torch.bfloat16 if GPU else torch.float32
NEW = 6 if GPU else 3
PROBE_LEN, OTHER_LENS = (40, (3, 17, 90, 200)) if GPU else (7, (3, 12))


def _model(implementation="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**WIDTH, max_position_embeddings=1024, pad_token_id=0, bos_token_id=None,
                                   eos_token_id=None, attn_implementation=implementation)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE, DTYPE).eval()


# The per-thread dispatch mode everywhere; the process-wide switch on the GPU
# (under the CPU interpreter only the dispatch mode evaluates transcendental
# functions one element at a time, see bi_torch.mode).
@pytest.fixture(scope="module", params=["mode", "process_wide"] if GPU else ["mode"])
def model(request):
    yield bhf.batch_invariant(_model(), process_wide=request.param == "process_wide")
    bi_torch.disable_batch_invariant_mode()  # process_wide switched it on for the process


def _prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    vocab = WIDTH["vocab_size"]
    probe = torch.randint(1, vocab, (PROBE_LEN,), generator=g)
    return probe, [torch.randint(1, vocab, (n,), generator=g) for n in OTHER_LENS]


def _batch(seqs, side):
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        span = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids.to(DEVICE), mask.to(DEVICE)


def _generate(model, seqs, at):
    ids, mask = _batch(seqs, "left")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[at, ids.shape[1]:], torch.stack([step[at] for step in out.logits])


def _prefill(model, seqs, at, n):
    ids, mask = _batch(seqs, "right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[at, :n]


def _compositions(others):
    """(sequences, probe index) pairs: the probe alone, then among longer and
    shorter neighbours at several places."""
    probe_alone = []
    yield probe_alone, 0
    yield others, 0
    yield others[::-1], len(others) // 2
    yield others[1:], len(others) - 1


def _with_probe(probe, others, at):
    return [*others[:at], probe, *others[at:]]


def test_hf_generate_is_batch_invariant_with_left_padding(model):
    probe, others = _prompts()
    runs = [_generate(model, _with_probe(probe, o, at), at) for o, at in _compositions(others)]
    for tokens, logits in runs[1:]:
        assert torch.equal(tokens, runs[0][0]), "generated tokens changed with the batch"
        assert torch.equal(logits, runs[0][1]), "logits changed with the batch"


def test_hf_prefill_is_batch_invariant_with_right_padding(model):
    probe, others = _prompts(seed=2)
    runs = [_prefill(model, _with_probe(probe, o, at), at, len(probe)) for o, at in _compositions(others)]
    for logits in runs[1:]:
        assert torch.equal(logits, runs[0])


@settings(max_examples=3 if GPU else 2, deadline=None)
@given(lens=st.lists(st.integers(1, 3 * PROBE_LEN), min_size=1, max_size=4), at=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_hf_generate_invariance_random_batches(model, lens, at, seed):
    g = torch.Generator().manual_seed(seed)
    probe, _ = _prompts()
    others = [torch.randint(1, WIDTH["vocab_size"], (n,), generator=g) for n in lens]
    at = min(at, len(others))
    ref = _generate(model, [probe], 0)
    tokens, logits = _generate(model, _with_probe(probe, others, at), at)
    assert torch.equal(tokens, ref[0]) and torch.equal(logits, ref[1])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="the defaults' variation is a GPU property")
def test_hf_default_model_varies_with_the_batch():
    """Negative control: the same model with transformers' default sdpa and no
    mode changes the probe's logits in at least one composition."""
    model = _model()
    probe, others = _prompts()
    runs = [_generate(model, _with_probe(probe, o, at), at)[1] for o, at in _compositions(others)]
    assert any(not torch.equal(r, runs[0]) for r in runs[1:])


def test_left_padding_is_counted_away():
    """Why the keys are counted from the first visible one: the bi_ attention
    fixes its block order at key positions, so the same sequence behind 37 pad
    slots gives other bits with the mask alone (negative control), and the
    probe's own bits through ``attention_forward``."""
    g = torch.Generator().manual_seed(3)
    d, n, pad = 64, 200, 37
    q = torch.randn(1, 2, 1, d, generator=g)
    k, v = (torch.randn(1, 1, n, d, generator=g) for _ in range(2))

    def padded(t):
        return torch.cat([torch.zeros(1, t.shape[1], pad, d), t], dim=2)

    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask_pad = torch.cat([torch.zeros(1, 1, 1, pad, dtype=torch.bool), mask], dim=3)
    q, k, v, mask, mask_pad = (t.to(DEVICE) for t in (q, k, v, mask, mask_pad))
    kp, vp = padded(k.cpu()).to(DEVICE), padded(v.cpu()).to(DEVICE)
    module = torch.nn.Module()
    ref, _ = bhf.attention_forward(module, q, k, v, mask)
    out, _ = bhf.attention_forward(module, q, kp, vp, mask_pad)
    assert torch.equal(out, ref)
    plain = bi_torch.scaled_dot_product_attention(q, kp, vp, attn_mask=mask_pad, enable_gqa=True)
    assert not torch.equal(plain.transpose(1, 2), ref), "the negative control no longer varies with the padding"


def test_hf_attention_refuses_what_it_does_not_support():
    module = torch.nn.Module()
    q = torch.zeros(1, 2, 3, 64, device=DEVICE)
    k = torch.zeros(1, 1, 3, 64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="softcap"):
        bhf.attention_forward(module, q, k, k, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="dropout"):
        bhf.attention_forward(module, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="4-D"):
        bhf.attention_forward(module, q[0], k[0], k[0], None)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        bhf.batch_invariant(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="strict=True needs the per-thread dispatch mode"):
        bhf.batch_invariant(torch.nn.Linear(2, 2), strict=True, process_wide=True)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="on the CPU only the dispatch mode fixes transcendental functions' bits")
def test_hf_process_wide_switch_gives_the_dispatch_modes_bits():
    probe, others = _prompts()
    seqs = _with_probe(probe, others, 1)
    mode = _generate(bhf.batch_invariant(_model()), seqs, 1)
    try:
        switch = _generate(bhf.batch_invariant(_model(), process_wide=True), seqs, 1)
    finally:
        bi_torch.disable_batch_invariant_mode()
    assert torch.equal(mode[0], switch[0]) and torch.equal(mode[1], switch[1])


def test_hf_registration_selects_the_bi_attention():
    bhf.register()
    model = _model(bhf.IMPLEMENTATION)
    assert model.config._attn_implementation == bhf.IMPLEMENTATION
    probe, _ = _prompts()
    ids = probe[None].to(DEVICE)
    with torch.no_grad(), bi_torch.set_batch_invariant_mode():
        a = model(input_ids=ids).logits
    with torch.no_grad():
        b = bhf.batch_invariant(model)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_hf_compiled_under_the_switch_gives_eager_bits_in_any_batch():
    """torch.compile of a loaded model while the switch is on: the forced
    batch-invariant backend (bi_torch.compile) gives the eager switch's
    prefill logits, for the probe alone and inside a batch."""
    probe, others = _prompts(3)
    model = bhf.batch_invariant(_model(), process_wide=True)
    try:
        torch._dynamo.reset()
        eager = _prefill(model, [probe] + others, 0, len(probe))
        compiled = torch.compile(model)
        together = _prefill(compiled, [probe] + others, 0, len(probe))
        alone = _prefill(compiled, [probe], 0, len(probe))
    finally:
        bi_torch.disable_batch_invariant_mode()
        torch._dynamo.reset()
    assert torch.equal(eager, together) and torch.equal(together, alone)


def test_hf_static_cache_prefill_gives_the_dynamic_caches_logits():
    """With a static cache transformers leaves the causal mask out although
    the keys outnumber the queries (torch's is_causal aligns the queries to
    the first key): the empty slots must not be attended."""
    probe, _ = _prompts(4)
    model = bhf.batch_invariant(_model())
    ids, mask = _batch([probe], "right")
    with torch.no_grad():
        dynamic = model(input_ids=ids, attention_mask=mask).logits
        cache = transformers.StaticCache(config=model.config, max_cache_len=len(probe) + 5)
        static = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
    assert torch.equal(dynamic, static)


def test_hf_training_step_without_padding():
    """A batch-invariant model trains on unpadded batches (no attention mask:
    the bi_ attention's fused backward): a sequence's training logits alone
    equal its logits in the batch, and two steps give the same gradient bits.
    A padded batch (a mask) is refused under autograd, not differentiated
    through another kernel."""
    model = bhf.batch_invariant(_model()).train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, WIDTH["vocab_size"], (3, 12), generator=g).to(DEVICE)
    weights = torch.randn(3, 12, WIDTH["vocab_size"], generator=g).to(DEVICE, DTYPE)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        # The wrapper covers forward and generate: the backward under the mode too.
        with bi_torch.set_batch_invariant_mode() as mode:
            (logits * weights).sum().backward()
        assert "aten.embedding_dense_backward.default" in mode.handled
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    logits, grads = step()
    again = step()[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    assert all(bool(torch.isfinite(a).all()) for a in grads)
    alone = model(input_ids=ids[1:2]).logits.detach()
    assert torch.equal(alone, logits[1:2])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="forward-only"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()

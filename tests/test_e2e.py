"""The continuous-batching engines (``bench/e2e``): a request's completion
and logits do not depend on the arrival schedule with the bi_ kernels, in
either framework, and the two frameworks give the same tokens; a control
whose products follow the step's size is caught."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from bench.e2e.config import TINY
from bench.e2e.run import Serving, distinct, run_schedule
from bench.e2e.scheduler import workload
from tests_profile import PROFILE

CONFIG = replace(TINY, layers=1)
SERVING = Serving(token_budget=24, max_seqs=3, page_size=16, num_pages=32, pages_per_seq=4, arrival_steps=6)
WORK = workload(4, 3, 30, 3, CONFIG.vocab, seed=0)
DEVICE = "cuda" if PROFILE.native else "cpu"


def _torch(impl, temperature=0.0, serving=SERVING):
    import torch

    from bench.e2e.torch_engine import TorchEngine

    return TorchEngine(CONFIG, impl=impl, num_pages=serving.num_pages, page_size=serving.page_size, device=DEVICE,
                       dtype=torch.float32, temperature=temperature)


def _jax(impl, temperature=0.0):
    from bench.e2e.jax_engine import JaxEngine

    return JaxEngine(CONFIG, impl=impl, num_pages=SERVING.num_pages, page_size=SERVING.page_size,
                     pages_per_seq=SERVING.pages_per_seq, max_seqs=SERVING.max_seqs, dtype="float32", temperature=temperature)


def _runs(engine, schedules=(1, 2)):
    return [run_schedule(engine, WORK, SERVING, s, logits=True) for s in schedules]


def _same_logits(runs):
    return all(np.array_equal(runs[0]["logits"][r], other["logits"][r]) for other in runs[1:] for r in runs[0]["logits"])


def test_schedules_batch_the_requests_differently():
    from bench.e2e.scheduler import Scheduler

    def compositions(seed):
        s = Scheduler(WORK, schedule_seed=seed, arrival_steps=SERVING.arrival_steps, token_budget=24, max_seqs=3,
                      page_size=16, num_pages=32, pages_per_seq=4)
        out = []
        while not s.idle:
            step = s.next_step()
            if step is None:
                s.step_index = max(s.step_index, s.waiting[0].arrival)
                continue
            out.append((tuple(step.rids), tuple(np.diff(step.cu_seqlens))))
            s.complete(step, np.ones(len(step.sample_rows), np.int64))
        return out

    assert compositions(1) != compositions(2)


def test_a_step_that_compiles_is_timed_again():
    """A step during which the engine compiled runs twice and only the second
    run counts; the tokens are the first run's."""
    import time

    class Compiling:
        def __init__(self):
            self.shapes, self.calls = set(), 0

        def compilations(self):
            return len(self.shapes)

        def step(self, step):
            self.calls += 1
            if len(step.tokens) not in self.shapes:
                self.shapes.add(len(step.tokens))
                time.sleep(0.2)  # the compiler
            return np.full(len(step.sample_rows), 7, np.int64)

    engine = Compiling()
    out = run_schedule(engine, WORK, SERVING, 1)
    assert out["compiled_steps"] == len(engine.shapes) > 0
    assert engine.calls == len(out["steps"]) + out["compiled_steps"]
    assert out["seconds"] < 0.2
    assert all(set(c) == {7} for c in out["completions"].values())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_invariance_torch_engine_gives_each_request_one_completion(temperature):
    runs = _runs(_torch("bi", temperature))
    assert all(v["distinct"] == 1 for v in distinct(runs).values())
    assert _same_logits(runs), "a request's logits changed with the schedule"


def test_invariance_jax_engine_gives_each_request_one_completion_and_torchs_tokens():
    pytest.importorskip("jax")
    runs = _runs(_jax("bi"))
    assert all(v["distinct"] == 1 for v in distinct(runs).values())
    assert _same_logits(runs), "a request's logits changed with the schedule"
    torch_runs = _runs(_torch("bi"), schedules=(3,))
    assert runs[0]["completions"] == torch_runs[0]["completions"]


def test_invariance_a_warm_prefix_cache_gives_the_cold_caches_logits():
    work = workload(5, 3, 30, 3, CONFIG.vocab, seed=1, shared_prefixes=2, prefix_tokens=35)
    serving = Serving(token_budget=24, max_seqs=3, page_size=16, num_pages=40, pages_per_seq=6, arrival_steps=6)
    engine = _torch("bi", serving=serving)
    cold = run_schedule(engine, work, serving, 1, logits=True)
    warm = run_schedule(engine, work, serving, 2, logits=True, prefix_cache=True)
    assert warm["reused_prompt_tokens"] >= 32, "no prompt took pages from the prefix cache"
    assert cold["completions"] == warm["completions"]
    assert _same_logits([cold, warm])


def test_invariance_verifying_drafts_gives_the_single_decodes_tokens():
    """Speculative decoding's verification: the last token and k draft tokens
    in one step give the tokens that k + 1 single decodes gave (drafts taken
    from a plain run); wrong drafts are rejected, with the same result."""
    engine = _torch("bi")
    work = replace(WORK, max_new=7)
    single = run_schedule(engine, work, SERVING, 1)
    verified = run_schedule(engine, work, SERVING, 1, drafts=single["completions"], speculate=2)
    assert len(verified["steps"]) < len(single["steps"]), "the drafts were not taken"
    assert verified["completions"] == single["completions"]
    wrong = run_schedule(engine, work, SERVING, 2, drafts={r: [7] * 7 for r in single["completions"]}, speculate=2)
    assert wrong["completions"] == single["completions"]


def test_invariance_negative_control_engine_is_caught():
    runs = _runs(_torch("control"))
    assert not _same_logits(runs), "the control's logits did not change with the schedule: the check cannot fail"


def _training_sequences(out, rids):
    return [(np.concatenate([WORK.prompts[r], out["completions"][r]]), len(WORK.prompts[r])) for r in rids]


@pytest.fixture(scope="module", params=["torch", "jax"])
def sampled(request):
    """A framework, its bi_ engine and one continuous-batching run with
    seeded sampling, its logits recorded."""
    engine = (_torch if request.param == "torch" else _jax)("bi", temperature=0.8)
    return request.param, engine, run_schedule(engine, WORK, SERVING, 1, logits=True)


def _train(framework, engine, sequences):
    from bench.e2e import training

    return (training.torch_step if framework == "torch" else training.jax_step)(engine, sequences)


def _trained_requests(out):
    # In the CPU interpreter a training step costs seconds per token: the two
    # shortest sequences there, every one on a GPU.
    rids = sorted(out["completions"], key=lambda r: len(WORK.prompts[r]))
    return rids if PROFILE.native else rids[:2]


def test_training_on_the_engines_samples_is_on_policy(sampled):
    """The training forward over whole sequences (dense causal attention,
    under autograd) gives the sampler's logits for every generated position
    bit for bit (continuous batching, seeded sampling), so the same
    log-probabilities; three training steps give the same gradient bits, the
    embedding table's included."""
    from bench.e2e import training

    framework, engine, out = sampled
    rids = _trained_requests(out)
    steps = [_train(framework, engine, _training_sequences(out, rids)) for _ in range(3)]
    for j, rid in enumerate(rids):
        assert np.array_equal(steps[0]["logits"][j].view(np.int32), out["logits"][rid].view(np.int32)), rid
        if framework == "torch":  # the sampler's log-probabilities by the same bi_ log_softmax
            assert np.array_equal(steps[0]["logprobs"][j],
                                  training.sampler_logprobs(engine, out["logits"][rid], out["completions"][rid])), rid
    grads = {n: np.asarray(g.cpu() if hasattr(g, "cpu") else g) for n, g in steps[0]["grads"].items()}
    assert len(grads) == len(engine.w)  # every weight, the embedding table included
    assert all(np.abs(g).sum() > 0 for g in grads.values())
    for other in steps[1:]:
        assert all(np.array_equal(grads[n], np.asarray(other["grads"][n].cpu() if hasattr(other["grads"][n], "cpu")
                                                                   else other["grads"][n])) for n in grads)


def test_the_on_policy_check_can_fail(sampled):
    """A training forward with another attention kernel (the framework's
    own) gives other logits bits than the sampler's: the comparison above
    sees a changed kernel."""
    framework, engine, out = sampled
    rids = _trained_requests(out)[:1]
    if framework == "torch":
        import torch

        import bi_torch as package

        def other(q, k, v, causal):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
            ).transpose(1, 2)
    else:
        import jax

        import bi_jax as package

        def other(q, k, v, causal):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    real = package.attention
    try:
        package.attention = other
        step = _train(framework, engine, _training_sequences(out, rids))
    finally:
        package.attention = real
    assert not all(np.array_equal(step["logits"][j], out["logits"][r]) for j, r in enumerate(rids))


def test_attention_groups_split_decodes_from_prefill_chunks():
    from bench.e2e.groups import SHORT, attention_groups

    q_lens, kv_lens = np.array([1, 20, 0, 1, SHORT]), np.array([5, 20, 9, 40, 30])
    short, long_ = attention_groups(q_lens, kv_lens, size=lambda n, least: max(least, 1 << (n - 1).bit_length()))
    assert short.seqs.tolist() == [0, 3, 4, 0] and (short.max_q, short.max_k) == (8, 64)
    # Token starts: 0, 1, 21, 21, 22; padding queries point one past the tokens (30).
    assert short.queries[:, :2].tolist() == [[0, 30], [21, 30], [22, 23], [30, 30]]
    assert long_.seqs.tolist() == [1] and long_.queries[0].tolist() == list(range(1, 21)) + [30] * 12
    assert [g.max_q for g in attention_groups(q_lens, kv_lens)] == [SHORT, 20]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_default_engine_computes_the_bi_engines_logits_within_rounding(framework):
    """The default engines' attention (gathered keys, decodes and prefill
    chunks in separate padded calls) is the same attention: their logits
    agree with the bi_ engine's to fp32 rounding."""
    if framework == "jax":
        pytest.importorskip("jax")
    make = _torch if framework == "torch" else _jax
    default, bi = (run_schedule(make(impl), WORK, SERVING, 1, logits=True) for impl in ("default", "bi"))
    assert default["completions"] == bi["completions"]
    for r in bi["logits"]:
        np.testing.assert_allclose(default["logits"][r], bi["logits"][r], rtol=1e-4, atol=1e-4, err_msg=f"request {r}")


def _bookkeeping(command, runs):
    """The smallest setup for the tests of ``--e2e-resume`` and
    ``--e2e-schedules``, which check what a run keeps and merges, not the
    numerics: three requests of 2 new tokens, prompts of at most 20 tokens
    (the least that leaves room for the prefix-cache variant's one-page
    shared prefix), on the tests' one-layer model."""
    return replace(command.CPU, model=CONFIG, requests=3, runs=runs, serving=SERVING, max_prompt=20, new_tokens=2)


def test_a_run_split_over_processes_still_compares_the_frameworks(tmp_path):
    """``--e2e-resume``: the torch engine in one run, the JAX engine in a
    second that resumes the first's e2e.json: the second keeps the first's
    row, runs only its own, and compares the two frameworks' tokens; a file
    from another setup is refused."""
    pytest.importorskip("jax")
    from bench.e2e import command

    setup = _bookkeeping(command, runs=1)
    first = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",))
    assert [r["framework"] for r in first["results"]] == ["torch"] and first["cross_framework"] == []
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(first))
    previous = command.resumable(path, setup)
    both = command.measure(setup, ["torch", "jax"], [0.0], DEVICE, impls=("bi",), previous=previous)
    assert [r["framework"] for r in both["results"]] == ["torch", "jax"]
    assert both["results"][0] == first["results"][0]  # kept, not run again
    assert both["cross_framework"] == [{"temperature": 0.0, "requests": 3, "same_tokens": 3}]
    with pytest.raises(ValueError, match="run with another setup"):
        command.resumable(path, replace(setup, requests=4))
    for row in first["results"]:
        del row["completion_digests"]
    path.write_text(json.dumps(first))
    with pytest.raises(ValueError, match="written before e2e.json kept the completions' digests"):
        command.resumable(path, setup)
    for content, message in ((b'{"setup": {}, "results": 5}', "no setup and list of results"),
                             (b'{"setup": {}, "results": [{}]}', "a result row without"),
                             (b"\xff\xfe", "not a readable e2e.json")):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"--e2e-resume {path}: .*{message}"):
            command.resumable(path, setup)


def test_a_run_split_by_schedules_counts_every_schedule(tmp_path):
    """``--e2e-schedules`` with ``--e2e-resume``: schedule 1 in one process,
    2 and 3 in a second resuming the first's file: the engine's row holds all
    three with the figures of one process running them all; a third process
    with nothing left to run keeps the row as it is."""
    from bench.e2e import command

    setup = _bookkeeping(command, runs=3)
    whole = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",))
    first = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",), schedules=[1])
    assert first["results"][0]["runs"] == 1 and first["results"][0]["schedule_seeds"] == [1]
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(first))
    merged = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",), schedules=[2, 3],
                             previous=command.resumable(path, setup))
    a, b = whole["results"][0], merged["results"][0]
    assert b["schedule_seeds"] == [1, 2, 3] and b["runs"] == 3
    for key in ("distinct_per_request", "first_divergence_per_request", "completion_digests", "requests_with_one_completion",
                "steps"):
        assert a[key] == b[key], key
    assert a["verification"]["same_tokens"] == b["verification"]["same_tokens"] == 3
    assert b["schedules"]["1"] == first["results"][0]["schedules"]["1"]  # kept, not run again
    path.write_text(json.dumps(merged))
    again = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",), previous=command.resumable(path, setup))
    assert again["results"] == merged["results"]
    with pytest.raises(ValueError, match=r"schedules must be among 1..3"):
        command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",), schedules=[4])


def test_a_run_cut_mid_engine_keeps_its_finished_schedules(tmp_path, monkeypatch):
    """The partial file is rewritten after every timed schedule: a process
    cut (a time limit) during an engine's third schedule leaves the first two
    in e2e.partial.json, and a run resuming it runs only the third and the
    greedy variants (the figures of all three schedules against those of an
    uncut run: ``test_a_run_split_by_schedules_counts_every_schedule``)."""
    from bench.e2e import command

    setup = _bookkeeping(command, runs=3)
    real, seen = command.run_schedule, []

    def cut_at_third(engine, work, serving, *, schedule_seed, **kwargs):
        seen.append(schedule_seed)
        if schedule_seed == 3:
            raise KeyboardInterrupt  # what timeout -s INT delivers
        return real(engine, work, serving, schedule_seed=schedule_seed, **kwargs)

    monkeypatch.setattr(command, "run_schedule", cut_at_third)
    partial = tmp_path / "e2e.partial.json"
    with pytest.raises(KeyboardInterrupt):
        command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",), partial=partial)
    kept = json.loads(partial.read_text())["results"][0]
    assert kept["schedule_seeds"] == [1, 2] and "verification" not in kept
    monkeypatch.setattr(command, "run_schedule", real)
    resumed = command.measure(setup, ["torch"], [0.0], DEVICE, impls=("bi",),
                              previous=command.resumable(partial, setup))["results"][0]
    assert seen == [0, 1, 2, 3]  # the warm-up, two timed schedules, then the cut
    assert resumed["schedule_seeds"] == [1, 2, 3] and resumed["runs"] == 3
    assert resumed["schedules"]["1"] == kept["schedules"]["1"]  # kept, not run again
    assert resumed["requests_with_one_completion"] == 3 and resumed["verification"]["same_tokens"] == 3


def test_schedules_merge_into_distinct_completions_and_the_first_divergence():
    """The row's figures from schedules run apart: distinct completions by
    digest, the first divergence the earliest position where any schedule
    parts from the reference (two schedules that part from each other do so
    there or later), and the reference tokens survive e2e.json's packing."""
    from bench.e2e import command

    reference = {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}
    others = {2: {0: [1, 2, 9, 9], 1: [5, 6, 7, 8]}, 3: {0: [1, 7, 3, 4], 1: [5, 6, 7, 8]}}
    packed = json.loads(json.dumps(command.pack_tokens(reference)))
    assert command.unpack_tokens(packed) == reference

    def run(completions, seconds):
        return {"completions": completions, "seconds": seconds, "steps": [1, 2], "compiled_steps": 0, "generated": 8}

    row = {"reference": {"schedule": 1, **packed},
           "schedules": {str(s): command._schedule_entry(run(c, s), reference)
                         for s, c in {1: reference, **others}.items()}}
    command._summarise(row)
    assert row["distinct_per_request"] == {"0": 3, "1": 1}
    assert row["first_divergence_per_request"] == {"0": 1, "1": None}
    assert row["requests_with_one_completion"] == 1 and row["max_distinct"] == 3 and row["runs"] == 3
    assert row["tokens_per_s"] == 8 / 2


def test_committed_results_replot_merged_and_bad_files_are_refused(tmp_path, capsys):
    from bench.e2e import command

    row = {"framework": "torch", "impl": "bi", "temperature": 0.0, "runs": 2, "tokens_per_s": 10.0,
           "distinct_per_request": {"0": 1, "1": 1}}
    files = []
    for framework in ("torch", "jax"):
        files.append(tmp_path / f"{framework}.json")
        files[-1].write_text(json.dumps({"results": [{**row, "framework": framework}]}))
    assert command.main(["--out", str(tmp_path / "e2e.png"), *map(str, files)]) == 0
    assert (tmp_path / "e2e.png").stat().st_size > 0
    for name, content in (("empty.json", b"{}"), ("rowless.json", b'{"results": [{}]}'), ("binary.json", b"\xff\xfe")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit) as exit_:
            command.main(["--out", str(tmp_path / "x.png"), str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"{name}: not an e2e.json" in err and "Traceback" not in err
    (tmp_path / "none.json").write_text('{"results": []}')
    for out, name, message in (("x.png", "none.json", "the files hold no result rows"),
                               ("x.txt", "torch.json", "--out " + str(tmp_path / "x.txt") + ": write a .png")):
        with pytest.raises(SystemExit) as exit_:
            command.main(["--out", str(tmp_path / out), str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_packed_keys_are_each_sequences_keys_in_order():
    from bench.e2e.torch_engine import packed_keys

    table = np.array([[3, 7, 0], [5, 1, 2]])  # two sequences' pages, 4 slots a page
    cu_k, page, slot = packed_keys(table, np.array([6, 9]), 4)
    assert cu_k.tolist() == [0, 6, 15]
    assert list(zip(page.tolist(), slot.tolist())) == (
        [(3, 0), (3, 1), (3, 2), (3, 3), (7, 0), (7, 1)]
        + [(5, 0), (5, 1), (5, 2), (5, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)])


@pytest.mark.skipif(PROFILE.native, reason="the CPU refusal")
def test_the_varlen_default_needs_a_gpu():
    with pytest.raises(ValueError, match="impl='varlen'.*needs a CUDA device"):
        _torch("varlen")


@pytest.mark.gpu
def test_the_varlen_default_attention_is_the_paged_attention():
    """The ``varlen`` engine's attention (FlashAttention varlen over packed
    keys; bf16 only) against bi_'s paged kernel on one step that mixes a
    decode, a prefill chunk after cached keys and a fresh prompt, with two
    query heads per KV head: the same attention to bf16 rounding (a causal
    mask aligned to the top left, or KV heads mismatched, would not be)."""
    import torch

    from bench.e2e.scheduler import Step
    from bench.e2e.torch_engine import TorchEngine

    engines = {impl: TorchEngine(CONFIG, impl=impl, num_pages=12, page_size=16, device="cuda",
                                 dtype=torch.bfloat16) for impl in ("varlen", "bi")}
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(engines["bi"].k_cache[0].shape, device="cuda", generator=g).to(torch.bfloat16)
            for _ in range(2))
    for engine in engines.values():
        engine.k_cache[0].copy_(k)
        engine.v_cache[0].copy_(v)
    q_lens, cached = np.array([1, 20, 9]), np.array([37, 30, 0])
    positions = np.concatenate([np.arange(c, c + n) for n, c in zip(q_lens, cached)]).astype(np.int32)
    rows = np.cumsum(q_lens) - 1
    step = Step(rids=np.arange(3), tokens=np.zeros(q_lens.sum(), np.int32), positions=positions,
                cu_seqlens=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
                cache_seqlens=cached.astype(np.int32), block_table=np.arange(12, dtype=np.int32).reshape(3, 4),
                sample_rows=rows, sample_seqs=np.arange(3), positions_out=positions[rows] + 1,
                seeds=np.zeros(3, np.int64))
    q = torch.randn(int(q_lens.sum()), CONFIG.heads, CONFIG.head_dim, device="cuda", generator=g).to(torch.bfloat16)
    out = {impl: engine._attention(q, 0, engine._batch(step)).float() for impl, engine in engines.items()}
    torch.testing.assert_close(out["varlen"], out["bi"], atol=2e-2, rtol=2e-2)


def test_the_cross_framework_probe_lines_up_both_engines_intermediates(tmp_path, monkeypatch):
    """``bench.probes.e2e_cross`` replays the first step whose logits differ
    between the bi_ engines and compares their intermediates in order: the
    two recorders must keep the same ops with the same shapes, or the probe
    names nothing. (The CPU interpreters of the two frameworks round some
    sums differently, so a step differs here and the replay runs.)"""
    import sys

    from bench.probes import e2e_cross

    monkeypatch.setattr(sys, "argv", ["e2e_cross", "--cpu", "--requests", "3", "--request", "1",
                                      "--out", str(tmp_path)])
    e2e_cross.main()
    rows = [json.loads(line) for line in (tmp_path / "e2e_cross.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "logits_differing" in r]
    kept = [r for r in rows if "kept" in r]
    assert rows[-1]["steps"] == len(steps) > 0 and "same_tokens" in rows[-1]
    if any(r["logits_differing"] for r in steps):
        assert kept, "a step's logits differed but nothing was replayed"
        assert all("mismatch" not in r and r["torch_op"] == r["jax_op"] for r in kept), kept
        ops = [r["torch_op"] for r in kept]
        assert ops[0] == "embedding" and ops[-2:] == ["norm", "matmul"] and "attention" in ops

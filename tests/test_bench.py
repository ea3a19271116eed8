"""``python -m bench`` runs end to end (through the interpreters without a GPU)."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main
from tests_profile import PROFILE


def test_bench_writes_results_with_invariance_column(tmp_path):
    args = ["--ops", "rms_norm", "--m", "1,3,8", "--out", str(tmp_path)]
    if not PROFILE.native:
        args += ["--features", "64"]
    else:
        args += ["--features", "4096"]
    assert main(args) == 0
    data = _strict_json(tmp_path / "results.json")
    rows = data["rows"]
    assert {(r["framework"], r["impl"]) for r in rows} == {
        ("torch", "bi"), ("torch", "default"), ("jax", "bi"), ("jax", "default")
    }
    assert sorted({r["m"] for r in rows}) == [1, 3, 8]
    # The bi_ kernels never change a row's bits with the batch.
    assert all(r["rows_differing"] == 0 for r in rows if r["impl"].startswith("bi"))
    assert data["provenance"]["jax"] and data["provenance"]["torch"]
    assert (tmp_path / "results.csv").read_text().startswith("op,framework,impl")
    if PROFILE.native:
        assert all(r["median_us"] > 0 for r in rows)


def _row(op, fw, impl, features, m, us, unit):
    return {"op": op, "framework": fw, "impl": impl, "features": features, "dtype": "bfloat16", "m": m,
            "median_us": us, "throughput": 1e3 / us, "unit": unit}


def test_plots_one_png_per_op_and_dtype(tmp_path):
    from bench.plots import main as plots_main
    from bench.plots import plot_rows

    rows = [
        _row(op, fw, impl, feat, m, 10.0 * m ** 0.5 + (impl == "bi"), unit)
        for op, feat, unit in (("matmul", "64x96", "TFLOP/s"), ("matmul", "128x64", "TFLOP/s"), ("rms_norm", "64", "GB/s"))
        for fw in ("torch", "jax") for impl in ("default", "bi") for m in (1, 2, 4, 8)
    ]
    written = plot_rows(rows, {"device": "test"}, tmp_path)
    assert sorted(p.name for p in written) == ["matmul_bfloat16.png", "rms_norm_bfloat16.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in written)
    # Interpreter rows carry no times: nothing to plot.
    untimed = [{**r, "median_us": None} for r in rows]
    assert plot_rows(untimed, {"device": "cpu"}, tmp_path / "none") == []
    # The CLI merges files and filters ops.
    (tmp_path / "a.json").write_text(json.dumps({"provenance": {"device": "test"}, "rows": rows[:16]}))
    (tmp_path / "b.json").write_text(json.dumps({"provenance": {"device": "test"}, "rows": rows[16:]}))
    assert plots_main(["--out", str(tmp_path / "cli"), "--ops", "matmul", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert [p.name for p in (tmp_path / "cli").iterdir()] == ["matmul_bfloat16.png"]


def test_plots_by_length_for_a_spec_that_names_its_length_axis(tmp_path):
    """attention's spec names its sequence-length axis: a second figure of
    TFLOP/s against the length, one line per implementation and batch."""
    from bench.plots import plot_rows

    rows = [_row("attention", fw, impl, f"{s}x32x8x128", m, s * m / 100 + (impl == "bi"), "TFLOP/s")
            for fw in ("torch", "jax") for impl in ("default", "bi") for s in (1024, 4096) for m in (1, 16)]
    written = plot_rows(rows, {"device": "test"}, tmp_path)
    assert sorted(p.name for p in written) == ["attention_bfloat16.png", "attention_bfloat16_by_length.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in written)


def test_default_cpu_run_covers_every_registered_op(tmp_path):
    """The Quickstart's ``python -m bench`` on a machine without a GPU: a small
    interpreter sweep over every benchmarked op of the registry, in both
    frameworks, invariance only."""
    from harness import registry

    if PROFILE.native:
        pytest.skip("on a GPU the default run is the full timed sweep")
    assert main(["--out", str(tmp_path)]) == 0
    rows = _strict_json(tmp_path / "results.json")["rows"]
    benched = {s.name for s in registry.all_specs() if s.bench is not None}
    assert benched >= {"rms_norm", "matmul"}
    for framework in ("torch", "jax"):
        assert {r["op"] for r in rows if r["framework"] == framework} == benched
    assert all(r["rows_differing"] == 0 for r in rows if r["impl"].startswith("bi"))
    assert not list(tmp_path.glob("*.png"))


def test_merge_of_partial_runs(tmp_path):
    """Parts of a sweep merge into one table: a later run replaces the points it
    remeasures, rows keep their run's commit, other devices are refused."""
    import csv

    from bench.merge import main as merge_main
    from bench.merge import merge

    info = {"device": "gpu", "driver": "1", "cuda": "13", "torch": "2.11", "triton": "3.6", "jax": "0.11.2",
            "jaxlib": "0.11.2", "mode": "gpu", "copy_bandwidth_gbs": 3000.0}
    old = [_row("rms_norm", "torch", impl, "4096", m, 5.0, "GB/s") for impl in ("default", "bi") for m in (1, 2)]
    new = [_row("rms_norm", "torch", "bi", "4096", 2, 4.0, "GB/s"), _row("matmul", "jax", "bi", "64x96", 1, 3.0, "TFLOP/s")]
    a = {"provenance": {**info, "commit": "aaa", "date": "2026-01-01"}, "rows": old}
    b = {"provenance": {**info, "commit": "bbb", "date": "2026-01-02"}, "rows": new}
    rows, merged = merge([a, b])
    assert len(rows) == 5
    by_key = {(r["op"], r["impl"], r["m"]): r for r in rows}
    assert by_key[("rms_norm", "bi", 2)]["median_us"] == 4.0 and by_key[("rms_norm", "bi", 2)]["commit"] == "bbb"
    assert by_key[("rms_norm", "bi", 1)]["commit"] == "aaa"
    assert merged["commit"] == "aaa,bbb" and [r["rows"] for r in merged["runs"]] == [4, 2]
    with pytest.raises(ValueError, match="different device"):
        merge([a, {**b, "provenance": {**b["provenance"], "device": "other"}}])

    for name, payload in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(payload))
    out = tmp_path / "merged"
    assert merge_main(["--out", str(out), str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["commit"] for r in table) == ["aaa", "aaa", "aaa", "bbb", "bbb"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["matmul_bfloat16.png", "rms_norm_bfloat16.png"]


def test_markdown_tables_name_times_ratios_and_varying_defaults():
    from bench.tables import op_tables

    rows = [
        {**_row("sum", fw, impl, "4096", m, 2.0 if impl == "bi" else 3.0, "GB/s"),
         "ratio_to_default": 1.5 if impl == "bi" else 1.0, "rows_differing": int(impl == "default" and m == 4)}
        for fw in ("torch", "jax") for impl in ("default", "bi") for m in (1, 4, 16)
    ]
    text = op_tables(rows, ms=[1, 4])
    lines = text.splitlines()
    assert lines[2] == "| M | bi_torch 4096 | bi_jax 4096 |"
    assert lines[4] == "| 1 | 2 (1.50x) | 2 (1.50x) |" and not any(line.startswith("| 16 |") for line in lines)
    assert "- jax default 4096: rows changed at M = 4 (1)" in lines


# --- the command line and its outputs --------------------------------------------


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} is not strict JSON: bare {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_json_is_strict(tmp_path):
    """Untimed values are null, not NaN: a parser that refuses NaN reads the file."""
    args = ["--ops", "sum", "--m", "1,2", "--frameworks", "jax", "--out", str(tmp_path)]
    if not PROFILE.native:
        args += ["--features", "64"]
    assert main(args) == 0
    data = _strict_json(tmp_path / "results.json")
    if not PROFILE.native:
        assert all(r["median_us"] is None and r["ratio_to_default"] is None for r in data["rows"])


def test_committed_results_are_strict_json():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    files = sorted(root.rglob("*.json"))
    assert files
    for path in files:
        _strict_json(path)


def test_bench_needs_nothing_from_the_test_extra(tmp_path):
    """``python -m bench`` with hypothesis and pytest made unimportable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hypothesis'] = None; sys.modules['pytest'] = None\n"
        "from bench.__main__ import main\n"
        f"sys.exit(main(['--ops', 'rms_norm', '--m', '1,2', '--out', {str(tmp_path)!r}]"
        f" + ([] if {PROFILE.native} else ['--features', '64'])))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ops", "bogus"], "argument --ops: unknown op bogus; choose from rms_norm"),
        (["--ops", "linear,bmm"], "linear, bmm run the kernels of the ops above and are not benchmarked"),
        (["--frameworks", "tf"], "argument --frameworks: unknown framework tf; choose from torch, jax"),
        (["--m", "0"], "argument --m: expected comma-separated positive integers, got '0'"),
        (["--m", "1,x"], "argument --m: expected comma-separated positive integers"),
        (["--features", "64x0"], "argument --features: a feature size is N, KxN or LxHqxHkvxD"),
        (["--dtypes", "float64"], "argument --dtypes: unknown dtype float64"),
        (["--ops", "rms_norm", "--features", "64x32"], "rms_norm takes feature sizes, not 64x32"),
        (["--ops", "attention", "--features", "4096"], "attention takes LxHqxHkvxD shapes such as 1024x32x8x128, not 4096"),
        (["--features", ","], "argument --features: expected comma-separated feature sizes"),
        (["--e2e", "--e2e-runs", "0"], "argument --e2e-runs: expected a positive integer, got '0'"),
        (["--e2e", "--e2e-requests", "x"], "argument --e2e-requests: expected a positive integer, got 'x'"),
        (["--e2e", "--e2e-temperatures", "0,hot"], "argument --e2e-temperatures: expected comma-separated numbers"),
        (["--e2e", "--e2e-temperatures", "-0.5"], "argument --e2e-temperatures: temperatures must be finite and >= 0"),
        (["--e2e", "--e2e-impls", "bi,fast"], "argument --e2e-impls: unknown engine fast; choose from default, bi"),
        (["--e2e", "--e2e-resume", "no-such-e2e.json"], "--e2e-resume no-such-e2e.json: not a readable e2e.json"),
        (["--e2e-runs", "2", "--e2e-resume", "x.json"], "--e2e-runs, --e2e-resume only apply with --e2e"),
    ],
    ids=["bogus-op", "unbenched-op", "framework", "m-zero", "m-text", "features", "dtype", "shape-for-a-row-op",
         "size-for-attention", "no-features", "e2e-runs-zero", "e2e-requests-text", "e2e-temperature-text",
         "e2e-temperature-negative", "e2e-impls", "e2e-resume-missing", "e2e-options-without-e2e"],
)
def test_bad_arguments_get_one_clear_line_and_status_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_the_run(kind, tmp_path, monkeypatch, capsys):
    import bench.sweep

    existing = tmp_path / "results.txt"
    existing.write_text("")
    out = existing if kind == "a file" else existing / "inner"
    ran = []
    monkeypatch.setattr(bench.sweep, "run_job", lambda *a, **k: ran.append(a) or [])
    with pytest.raises(SystemExit) as exit_:
        main(["--ops", "rms_norm", "--quick", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out {out}: cannot make the results folder" in err and not ran


def test_a_framework_named_twice_is_benchmarked_once():
    from bench.__main__ import parser

    args = parser().parse_args(["--frameworks", "torch,jax,torch", "--ops", "rms_norm,rms_norm"])
    assert args.frameworks == ["torch", "jax"] and args.ops == ["rms_norm"]


@pytest.mark.skipif(PROFILE.native, reason="the GPU-only modes run on a GPU")
@pytest.mark.parametrize("flag", ["--backward", "--host-cost"])
def test_gpu_only_modes_say_so_without_a_gpu(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([flag])
    assert exit_.value.code == 2 and "this machine has no GPU" in capsys.readouterr().err


def test_jax_without_its_gpu_backend_beside_torchs_gpu_is_refused(monkeypatch, capsys):
    """torch's CUDA build with a jaxlib that runs on the CPU alone (the
    ``jax`` extra without ``cuda13``): the GPU sweep would run bi_jax in the
    Pallas interpreter at GPU sizes, so the bench stops and names the fix,
    unless JAX is left out."""
    import bench.__main__ as command
    from harness import devices

    monkeypatch.setattr(command, "configure", lambda: devices.GPU)
    monkeypatch.setattr(command, "jax_off_the_gpu", lambda: "JAX runs on its cpu backend here")
    with pytest.raises(SystemExit) as exit_:
        command.main(["--frameworks", "torch,jax", "--quick"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "JAX runs on its cpu backend here; or leave JAX out with --frameworks torch" in err
    asked = []
    monkeypatch.setattr(command, "jax_off_the_gpu", lambda: asked.append(1))
    late_error = ["--ops", "rms_norm", "--features", "64x32"]  # refused after the check, for a quick end
    with pytest.raises(SystemExit):
        command.main(["--frameworks", "torch", *late_error])
    assert not asked
    with pytest.raises(SystemExit):
        command.main(["--frameworks", "torch,jax", *late_error])
    assert asked == [1]  # the same call with JAX reaches the check


@pytest.mark.skipif(PROFILE.native, reason="JAX has its GPU backend on a GPU machine")
def test_jax_off_the_gpu_names_the_backend_and_the_fix():
    from harness.devices import jax_off_the_gpu

    problem = jax_off_the_gpu()
    assert problem is not None and "its cpu backend" in problem and "cuda13" in problem


@pytest.mark.skipif(PROFILE.native, reason="the GPU-only engine runs on a GPU")
def test_the_varlen_e2e_engine_says_it_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--e2e", "--e2e-impls", "bi,varlen"])
    assert exit_.value.code == 2 and "varlen runs torch's FlashAttention varlen kernel" in capsys.readouterr().err


def test_backward_measures_only_the_ops_asked_for():
    """``--backward --ops X`` times X alone: ops not asked for are not run
    (none here, so nothing runs, GPU or not)."""
    from bench import backward

    assert backward.measure(("torch", "jax"), quick=True, ops=()) == []


def test_backward_device_time_reports_each_step_or_why_it_could_not_capture(monkeypatch):
    """The torch steps' device time (CUDA graph replays): each step's, and
    the ratio; a step that cannot be captured is reported, not dropped."""
    from bench import backward, timing

    def timed(steps, arg_sets):
        assert arg_sets == [{}] and set(steps) == {"default", "bi"}
        return {"default": timing.Timing(900.0, 0, 0, "graph"), "bi": timing.Timing(1000.0, 0, 0, "graph")}

    monkeypatch.setattr(timing, "time_torch", timed)
    got = backward._torch_device_ms({"default": None, "bi": None})
    assert got == {"default_device_ms": 0.9, "bi_device_ms": 1.0, "device_ratio": pytest.approx(0.9)}

    def refused(steps, arg_sets):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(timing, "time_torch", refused)
    assert backward._torch_device_ms({}) == {
        "device_error": "RuntimeError: operation not permitted when stream is capturing"}


def test_help_shows_ops_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    from harness import registry

    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(s.name for s in registry.all_specs() if s.bench is not None) in out
    assert "default: bfloat16" in out and "1,2,4,8" in out and "1,16,256,4096" in out


def test_console_script_names_itself():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("bi-bench")  # installed beside the interpreter
    if not script.exists():
        pytest.skip("the package is not installed (pip install -e .)")
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("usage: bi-bench"), run.stdout[:200]


def test_quick_is_honoured_without_a_gpu(tmp_path):
    if PROFILE.native:
        pytest.skip("on a GPU --quick is the timed M = 1, 16, 256, 4096")
    from bench.sweep import CPU_QUICK_M

    assert main(["--quick", "--ops", "sum", "--frameworks", "torch", "--out", str(tmp_path)]) == 0
    rows = _strict_json(tmp_path / "results.json")["rows"]
    assert sorted({r["m"] for r in rows}) == list(CPU_QUICK_M)


@pytest.mark.skipif(PROFILE.native, reason="the interpreters' run")
@pytest.mark.parametrize("gpu_present", [False, True])
def test_an_interpreter_run_on_a_machine_with_a_gpu_says_why(gpu_present, tmp_path, monkeypatch, capsys):
    """An NVIDIA GPU that no installed framework can use (a CPU-only jaxlib
    alone, torch built without CUDA) is named, not reported as no GPU."""
    import bench.__main__ as command
    import bench.sweep

    monkeypatch.setattr(command, "nvidia_gpu_present", lambda: gpu_present)
    monkeypatch.setattr(bench.sweep, "run_job", lambda *a, **k: [])
    command.main(["--quick", "--ops", "sum", "--frameworks", "torch", "--out", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    said = "This machine has an NVIDIA GPU, but no installed framework can use it"
    assert (said in out) == gpu_present and ("No GPU: kernels run" in out) != gpu_present, out


def test_the_jax_generation_benchmarks_decoder_is_invariant_under_the_transform():
    """The decoder that ``--host-cost`` times under
    ``bi_jax.batch_invariant(strict=True)`` (tiny here; strict: every product,
    sum and attention ran a bi_ kernel, else it raises): a prompt's greedy
    tokens and logits, alone and in a batch."""
    pytest.importorskip("jax")
    import jax
    import numpy as np

    from bench import jax_generation as g

    config = g.Config(hidden=64, intermediate=96, layers=1, heads=2, kv_heads=1, head_dim=64, vocab=50)
    params = g.init(config, dtype="float32")
    prompts = jax.random.randint(jax.random.key(1), (3, 5), 1, config.vocab, dtype=np.int32)
    step = g.step_fn(config, transform=True)
    alone_tokens, alone_logits = g.generate(config, params, prompts[1:2], 3, step)
    tokens, logits = g.generate(config, params, prompts, 3, step)
    assert tokens.shape == (3, 3) and logits.shape == (3, 3, config.vocab)
    np.testing.assert_array_equal(np.asarray(alone_tokens[0]), np.asarray(tokens[1]))
    np.testing.assert_array_equal(np.asarray(alone_logits[:, 0]), np.asarray(logits[:, 1]))
    reference, _ = g.generate(config, params, prompts, 3, g.step_fn(config, transform=False))
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(tokens))  # fp32: the same greedy choice


def test_the_default_gpu_sweep_times_matmul_at_long_prefills_too():
    """matmul's extra token counts (16384, 65536) join the default sweep's
    only, and only matmul's: --m and --quick time what they name."""
    from bench import sweep
    from harness import registry

    def sizes(op, extra):
        (job,) = list(sweep.jobs([registry.get(op)], ["torch"], ["bfloat16"], [registry.get(op).bench.features[0]]))
        return sweep.batch_sizes(job, list(sweep.DEFAULT_M), extra)

    assert sizes("matmul", True) == [*sweep.DEFAULT_M, 16384, 65536]
    assert sizes("matmul", False) == list(sweep.DEFAULT_M)
    assert sizes("rms_norm", True) == list(sweep.DEFAULT_M)
    assert (8192, 8192) in registry.get("matmul").bench.features and (28672, 8192) in registry.get("matmul").bench.features


def test_host_cost_takes_the_variants_in_turn_each_inside_its_context(monkeypatch):
    """The per-op host timing interleaves the variants (ABBA rounds), and
    times each call inside its own context (the modes, plans off)."""
    import contextlib

    from bench import host_cost

    state = {"inside": None}
    order = []

    def context_of(name):
        @contextlib.contextmanager
        def context():
            state["inside"] = name
            try:
                yield
            finally:
                state["inside"] = None
        return context

    def loop_us(fn):
        order.append(fn())
        return {"a": 1.0, "b": 2.0, "c": 3.0}[order[-1]]

    monkeypatch.setattr(host_cost, "_loop_us", loop_us)
    variants = {name: ((lambda: state["inside"]), context_of(name)) for name in ("a", "b", "c")}
    assert host_cost._host_us(variants) == {"a": 1.0, "b": 2.0, "c": 3.0}
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == host_cost.LOOPS and rounds[0] == ["a", "b", "c"] and rounds[1] == ["c", "b", "a"]

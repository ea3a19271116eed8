"""Unit tests of the harness's own machinery."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import registry
from harness.bits import differing_rows, ulp_distance
from harness.strategies import batch_plans, batch_sizes


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_ulp_distance_counts_representable_steps(dtype):
    a = np.array([1.0, -1.0, 0.0, 2.0], dtype=dtype)
    bits = a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
    b = (bits + np.array([1, 1, 0, 3], dtype=bits.dtype)).view(a.dtype)
    assert ulp_distance(a, b).tolist() == [1, 1, 0, 3]
    # Across zero: the smallest positive and negative subnormals are 2 steps apart.
    tiny = np.array([1], dtype=bits.dtype).view(a.dtype)
    assert ulp_distance(tiny, -tiny).tolist() == [2]


def test_differing_rows_sees_one_flipped_bit():
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    b = a.copy()
    b.view(np.int32)[3, 4] ^= 1
    assert differing_rows(a, b).tolist() == [3]
    assert differing_rows(a, a.copy()).tolist() == []


@given(batch_plans(max_batch=50))
def test_batch_plans_are_well_formed(plan):
    assert 1 <= plan.full <= 50
    idx = np.asarray(plan.index)
    assert plan.size >= 1 and len(plan.shared()) >= 1
    assert (idx < plan.full + plan.extra).all() and (idx >= 0).all()
    if plan.mode == "slice":
        assert plan.index == tuple(range(plan.start, plan.start + plan.size))


@given(st.data())
def test_batch_sizes_stay_in_range(data):
    top = data.draw(st.integers(1, 20000))
    assert 1 <= data.draw(batch_sizes(top)) <= top


@pytest.mark.parametrize("spec", registry.all_specs(), ids=lambda s: s.name)
def test_specs_make_inputs_with_a_batch_axis(spec):
    rng = np.random.default_rng(0)
    for dtype in spec.dtypes:
        inputs = spec.make_inputs(rng, 3, 16, dtype)
        assert inputs[spec.batch_arg].shape[0] == 3
        ref = spec.reference(inputs)
        assert ref.dtype == np.float64 and ref.shape[0] == 3 and np.isfinite(ref).all()


def _string_literals(path):
    """The string literals of a module's code, docstrings left out."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_benchmark_and_the_harness_core_name_no_op():
    """An op is known to its spec alone: the code of ``bench/`` and of the
    harness outside ``harness/specs`` holds no op name."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = registry.names()
    modules = [p for p in (root / "bench").glob("*.py")] + [
        p for p in (root / "harness").rglob("*.py") if "specs" not in p.parts]
    found = []
    for path in modules:
        for text in _string_literals(path):
            found += [f"{path.relative_to(root)}: {text!r}" for name in names if re.search(rf"\b{name}\b", text)]
    assert not found, found


def test_every_spec_is_complete():
    """Each op's spec says what the tests and the benchmark need."""
    from harness.frameworks import FRAMEWORKS

    for spec in registry.all_specs():
        assert set(spec.impls) == set(FRAMEWORKS), spec.name
        for impl in spec.impls.values():
            assert impl.kernel and callable(impl.default) and impl.label, spec.name
        assert set(spec.tolerances) >= set(spec.dtypes), spec.name
        for dtype, features in spec.sweeps.items():
            assert dtype in spec.dtypes and features, spec.name


def test_interleaving_is_abba():
    from bench.timing import interleave

    order = []
    samples = interleave({"a": lambda: order.append("a") or [1.0], "b": lambda: order.append("b") or [2.0]}, 4)
    assert "".join(order) == "abbaabba" and samples == {"a": [1.0] * 4, "b": [2.0] * 4}


def test_probes_run_as_modules():
    import subprocess
    import sys
    from pathlib import Path

    probes = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "bench" / "probes").glob("*.py")
                    if not p.stem.startswith("_"))  # _log and __init__ are not probes
    assert probes
    for name in probes:
        run = subprocess.run([sys.executable, "-m", f"bench.probes.{name}", "--help"], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "usage: python -m bench.probes." in run.stdout, (name, run.stderr[-1500:])


def test_gpu_profile_fits_each_test_process_share_of_the_gpu():
    """Parallel GPU test processes draw problems that fit their share of the
    memory: the budget shrinks with the workers, never grows past 2**25."""
    from harness.devices import BYTES_PER_BUDGET_ELEMENT, GPU, TORCH_MEMORY_SHARE, gpu_profile

    h200 = 141 * 2**30
    assert gpu_profile(h200, 1) is GPU and gpu_profile(h200, 2) is GPU
    many = gpu_profile(h200, 16)
    assert many.max_elements == int(h200 * TORCH_MEMORY_SHARE / 16) // BYTES_PER_BUDGET_ELEMENT < GPU.max_elements
    assert many.max_elements * BYTES_PER_BUDGET_ELEMENT <= h200 * TORCH_MEMORY_SHARE / 16
    assert many.max_batch <= many.max_elements and many.feature_sizes == GPU.feature_sizes
    assert gpu_profile(80 * 2**30, 4).max_elements < gpu_profile(80 * 2**30, 2).max_elements


def test_max_examples_override(monkeypatch):
    """``BI_MAX_EXAMPLES`` sets the examples per property; nonsense is refused."""
    from harness import devices

    configure = devices.configure.__wrapped__  # the uncached resolution
    monkeypatch.setenv("BI_MAX_EXAMPLES", "3")
    assert configure().max_examples == 3
    monkeypatch.setenv("BI_MAX_EXAMPLES", "0")
    with pytest.raises(ValueError, match="BI_MAX_EXAMPLES"):
        configure()
    monkeypatch.delenv("BI_MAX_EXAMPLES")
    assert configure().max_examples in (devices.GPU.max_examples, devices.CPU.max_examples)


def test_accuracy_takes_an_overflow_to_infinity_and_nothing_else():
    """A reference past float16's largest value must come out as an infinity
    of its sign; a wrong sign, a NaN or an overflow of an in-range value is
    still an error."""
    from types import SimpleNamespace

    from harness import properties

    ref = np.array([[74726.9, -70000.0, 3.0]])
    spec = SimpleNamespace(reference=lambda inputs: ref, tolerance=lambda dtype: SimpleNamespace(rtol=8e-3, atol=1e-3))

    def check(values):
        out = np.array([values], dtype=np.float16)
        adapter = SimpleNamespace(natives=lambda inputs: inputs, call=lambda fn, spec, native: out)
        properties.check_accuracy(spec, adapter, None, {}, "float16")

    check([np.inf, -np.inf, 3.0])
    for values in ([-np.inf, -np.inf, 3.0], [np.inf, np.nan, 3.0], [np.inf, -np.inf, np.inf]):
        with pytest.raises(properties.AccuracyError):
            check(values)

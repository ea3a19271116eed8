"""The README: its commands are marked for CI, and its examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests_profile import PROFILE

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README.md has lost its examples"
    return blocks


def _example(marker: str) -> str:
    """The one README example that contains ``marker``."""
    found = [b for b in _examples() if marker in b]
    assert len(found) == 1, f"{len(found)} README examples contain {marker!r}"
    return found[0]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BI_DEVICE")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=environ,
                          cwd=ROOT)


@pytest.mark.parametrize("marker", ["bench-command", "test-command"])
def test_readme_commands_are_marked(marker):
    text = README.read_text()
    block = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    assert "pip install" in block
    extras = set(re.search(r'-e "\.\[([\w,]+)\]"', block).group(1).split(","))
    if marker == "bench-command":
        # The bench needs nothing from the test extra.
        assert "python3 -m bench" in block and extras == {"torch", "jax"}
    else:
        assert "pytest" in block


def test_torch_example_runs_as_written():
    """The torch example, with TRITON_INTERPRET=1 when there is no GPU (as it says)."""
    code = _example("set_batch_invariant_mode(strict=True)")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "aten.addmm.default" in run.stdout and "aten._log_softmax.default" in run.stdout


def test_jax_example_runs_as_written():
    pytest.importorskip("flax")  # the `flax` extra (in `all`)
    code = _example("from flax import")
    assert "import bi_jax" in code
    run = _run(code + "\nprint(log_probs.shape, type(layer).__name__, type(projection).__name__, type(dense).__name__)\n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["(8,", "32)", "Linear", "Einsum", "Dense"]


def test_attention_example_runs_as_written():
    code = _example("bi_torch.paged_attention")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "decode == prefill: True"


@pytest.mark.gpu
def test_opening_example_default_varies_and_bi_does_not():
    run = _run(_examples()[0])
    assert run.returncode == 0, run.stderr[-3000:]
    counts = dict(line.split(": ") for line in run.stdout.strip().splitlines())
    print(f"README example: {counts}")
    assert int(counts["bi_jax"]) == 0
    import jax

    if any(name in jax.devices()[0].device_kind for name in ("H100", "H200")):
        assert int(counts["XLA"]) > 0, "the README says XLA's default changes rows on Hopper"


def test_process_wide_example_runs_as_written():
    code = _example("enable_batch_invariant_mode()")
    run = _run(code + "\nprint(bi_torch.is_batch_invariant_mode())\n",
               **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"


def test_hf_example_runs_as_written():
    pytest.importorskip("transformers")  # the `hf` extra (in `all`)
    code = _example("bi_torch.hf.batch_invariant")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "same tokens: True"


def test_compile_example_runs_as_written():
    code = _example("bi_torch.compile_backend(mode=mode)")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "compiled rows agree: True"


def test_direct_compile_example_runs_as_written():
    """The direct-calls example, after the compile example it continues."""
    code = _example("bi_torch.compile_backend(mode=mode)") + _example("def mlp(x, w_gate_up, w_down)")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "direct calls compiled, eager bits: True", run.stdout


def test_training_example_runs_as_written():
    code = _example("training forward == inference")
    run = _run(code, **({} if PROFILE.native else {"TRITON_INTERPRET": "1"}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["training forward == inference: True",
                                       "row gradient alone == in the batch: True",
                                       "JAX weight gradient: (512, 256) float32"], run.stdout

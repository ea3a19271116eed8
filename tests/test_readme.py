"""The README's example does what it says (on a GPU)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no python example"
    return match.group(1)


def test_readme_test_command_is_marked():
    text = README.read_text()
    block = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    assert "pytest" in block and "pip install" in block


@pytest.mark.gpu
def test_readme_example_default_varies_and_bi_does_not():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_example(), str(README), "exec"), {})
    default_rows, bi_rows = (int(v) for v in out.getvalue().split())
    print(f"README example: default changed {default_rows} rows, bi_jax {bi_rows}")
    assert bi_rows == 0
    import jax

    if any(name in jax.devices()[0].device_kind for name in ("H100", "H200")):
        assert default_rows > 0, "the README says XLA's default changes rows on Hopper"

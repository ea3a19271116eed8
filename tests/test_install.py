"""Each framework alone, and the library outside the test suite: what a user
who installed one extra, or runs a script on a CPU, gets. Each case runs in a
fresh interpreter, without this suite's configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests_profile import PROFILE


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BI_DEVICE")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=environ)


def test_bi_jax_imports_and_runs_without_torch():
    run = _python("""
        import sys
        sys.modules["torch"] = None  # import torch now fails, as where it is not installed
        sys.modules["triton"] = None
        import jax.numpy as jnp
        import numpy as np
        import bi_jax
        x = jnp.asarray(np.arange(12.0, dtype=np.float32).reshape(3, 4))
        np.testing.assert_allclose(np.asarray(bi_jax.sum(x, axis=-1)), [6.0, 22.0, 38.0])
        print("ok")
    """, JAX_PLATFORMS="cpu")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_bi_torch_imports_and_runs_without_jax():
    run = _python("""
        import sys
        sys.modules["jax"] = None
        sys.modules["jaxlib"] = None
        import torch
        import bi_torch
        print(bi_torch.sum(torch.arange(12.0).reshape(3, 4), -1).tolist())
    """, TRITON_INTERPRET="1")
    assert run.returncode == 0 and run.stdout.strip() == "[6.0, 22.0, 38.0]", run.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bi_torch_matmul_on_the_cpu_outside_the_tests(dtype):
    """Under the Triton interpreter, outside this suite: the K loop runs
    (triton-lang/triton#9171) and 16-bit products are right (#11584)."""
    run = _python(f"""
        import torch
        import bi_torch
        g = torch.Generator().manual_seed(0)
        a = torch.randn(9, 70, generator=g).to(torch.{dtype})
        b = torch.randn(70, 33, generator=g).to(torch.{dtype})
        got = bi_torch.matmul(a, b, out_dtype=torch.float32).double()
        want = a.double() @ b.double()
        print(float((got - want).abs().max()))
    """, TRITON_INTERPRET="1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip()) < 1e-4


def test_triton_interpret_set_after_import_is_refused():
    run = _python("""
        import os
        import torch
        import bi_torch
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            bi_torch.sum(torch.ones(2, 3))
        except RuntimeError as err:
            print(err)
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TRITON_INTERPRET was set after bi_torch was imported" in run.stdout
    assert "before importing bi_torch" in run.stdout


def test_cpu_jaxlib_on_a_gpu_machine_warns_once_and_bi_device_gpu_refuses(monkeypatch):
    """A CPU backend where the driver sees a GPU (a jaxlib without its CUDA
    plugin): one warning that names the fix; with BI_DEVICE=gpu an error."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("JAX has its GPU backend here")
    import jax.numpy as jnp

    import bi_jax
    from bi_jax import _checks

    monkeypatch.setattr(_checks, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(_checks, "_cpu_asked_for", lambda: False)
    monkeypatch.setattr(_checks, "_warned_cpu_backend", False)
    monkeypatch.setenv("BI_DEVICE", "auto")
    x = jnp.ones((2, 4))
    with pytest.warns(RuntimeWarning, match=r"Pallas interpreter, thousands of times slower.*cuda13"):
        bi_jax.sum(x, axis=-1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bi_jax.sum(x, axis=-1)  # once only
    monkeypatch.setenv("BI_DEVICE", "gpu")
    with pytest.raises(RuntimeError, match="BI_DEVICE=gpu, but JAX has no GPU backend"):
        bi_jax.sum(x, axis=-1)


@pytest.mark.skipif(PROFILE.native, reason="the interpreters' own path")
def test_the_cpu_suite_runs_the_interpreters():
    """The suite's own premise on a machine without a GPU."""
    from bi_torch._checks import interpreting

    assert interpreting()
    import jax

    assert jax.default_backend() == "cpu"

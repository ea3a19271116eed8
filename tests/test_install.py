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
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BI_DEVICE", "JAX_PLATFORMS")}
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


_CPU_JAXLIB_ON_A_GPU_MACHINE = """
    import warnings
    import bi_core.devices
    bi_core.devices.nvidia_gpu_present = lambda: True  # what the driver says on a GPU machine
    import jax
    import jax.numpy as jnp
    import bi_jax
    if jax.default_backend() != "cpu":
        print("skip: JAX has its GPU backend here")
        raise SystemExit(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            bi_jax.sum(jnp.ones((2, 4)), axis=-1)
            bi_jax.sum(jnp.ones((2, 4)), axis=-1)
        except RuntimeError as err:
            print("error:", err)
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print("warning:", w.message)
"""


def test_cpu_jaxlib_on_a_gpu_machine_warns_once():
    """A CPU backend where the driver sees a GPU (a jaxlib without its CUDA
    plugin): one warning, at the first use, that names the fix."""
    run = _python(_CPU_JAXLIB_ON_A_GPU_MACHINE)  # JAX_PLATFORMS unset: the CPU was not asked for
    assert run.returncode == 0, run.stderr[-2000:]
    if run.stdout.startswith("skip:"):
        pytest.skip(run.stdout.strip())
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: bi_jax: this machine has an NVIDIA GPU"), lines
    assert "thousands of times slower" in lines[0] and "cuda13" in lines[0] and "BI_DEVICE=gpu" in lines[0]
    quiet = _python(_CPU_JAXLIB_ON_A_GPU_MACHINE, JAX_PLATFORMS="cpu")  # asked for: no warning
    assert quiet.returncode == 0 and quiet.stdout.strip() == "", quiet.stdout + quiet.stderr[-2000:]


def test_cpu_jaxlib_with_bi_device_gpu_is_an_error():
    run = _python(_CPU_JAXLIB_ON_A_GPU_MACHINE, BI_DEVICE="gpu")
    assert run.returncode == 0, run.stderr[-2000:]
    if run.stdout.startswith("skip:"):
        pytest.skip(run.stdout.strip())
    assert run.stdout.startswith("error: sum: BI_DEVICE=gpu, but JAX has no GPU backend here"), run.stdout


def test_a_gpu_profile_makes_bi_jax_refuse_its_interpreter():
    """Where the harness picks the GPU (torch sees one), it says so to bi_jax
    (``BI_DEVICE=gpu``), so that a jaxlib without its CUDA plugin fails each
    JAX test with the fix instead of running the interpreter at GPU sizes."""
    run = _python("""
        import os
        from harness import devices
        devices._cuda_available = lambda: True  # as where torch sees a GPU
        profile = devices._configure()
        print(profile.name, os.environ.get("BI_DEVICE"), os.environ.get("TRITON_INTERPRET"))
    """, PYTEST_XDIST_WORKER_COUNT="1")  # one process: the profile asks torch for no GPU memory size
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["gpu", "gpu", "None"], run.stdout


@pytest.mark.skipif(PROFILE.native, reason="the interpreters' own path")
def test_the_cpu_suite_runs_the_interpreters():
    """The suite's own premise on a machine without a GPU."""
    from bi_torch._checks import interpreting

    assert interpreting()
    import jax

    assert jax.default_backend() == "cpu"

"""Test configuration: device selection and Hypothesis profiles.

The device is chosen before any kernel package is imported (the Triton
interpreter is fixed at import time): a CUDA GPU when torch sees one, else the
CPU interpreters. ``BI_DEVICE=gpu|cpu`` forces either.
"""

from __future__ import annotations

import os
import warnings

from harness.devices import configure

# Several test processes share one GPU with torch's caching allocator: let JAX
# allocate on demand instead of growing a pool it never returns.
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
PROFILE = configure()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# JAX marks Pallas's Triton backend deprecated; bi_jax uses it on purpose for
# RMSNorm (see bi_jax/ops/rms_norm.py). Silenced here only, not in the library.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

settings.register_profile(
    "default",
    max_examples=PROFILE.max_examples,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
# CI: the same examples on every run; failures are still reported with the seed.
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_report_header(config):
    return (f"bi device profile: {PROFILE.name}, {PROFILE.max_elements} elements per input "
            f"(BI_DEVICE={os.environ.get('BI_DEVICE', 'auto')})")


def pytest_runtest_logreport(report):
    """``BI_FAILURE_LOG=PATH``: each failure's report is appended to PATH as it
    happens (a run cut by a time limit, or with xdist workers, keeps the
    reasons, which pytest otherwise prints only at the end)."""
    path = os.environ.get("BI_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")


def pytest_collection_modifyitems(config, items):
    if PROFILE.native:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (BI_DEVICE=gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def profile():
    return PROFILE


@pytest.fixture(autouse=True)
def _release_gpu_memory_after_each_test():
    """Several test processes share one GPU: each returns torch's cached
    blocks after every test, so that a JAX test in another process can
    allocate (a 4-worker GPU run ran out of memory without it)."""
    yield
    if PROFILE.native:
        from harness.devices import release_device_memory

        release_device_memory()


@pytest.fixture(scope="session", autouse=True)
def _share_the_gpu():
    """Several test processes share one GPU. Within one test, torch's caching
    allocator keeps every block it frees, and the every-batch-size sweeps ask
    for ever larger outputs, so a torch process grew until a JAX process
    beside it ran out of memory, even with the cache returned after each test
    (2, then 1, of 127 rms_norm tests with 4 processes on an H100). Each
    process caps torch's share of the GPU; at the cap torch frees its cache
    and retries. The profile's element budget shrinks to fit the share
    (``harness.devices.gpu_profile``)."""
    from harness.devices import TORCH_MEMORY_SHARE

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if PROFILE.native and workers > 1:
        import torch

        torch.cuda.set_per_process_memory_fraction(TORCH_MEMORY_SHARE / workers)
    yield

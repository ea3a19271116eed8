"""Device selection: native GPU runs or CPU interpreters.

``BI_DEVICE`` = ``auto`` (default), ``gpu`` or ``cpu`` picks where kernels run;
once the GPU is picked, ``BI_DEVICE=gpu`` is set for the process (and its
children), so that bi_jax refuses its interpreter there (``jax_off_the_gpu``).
``BI_MAX_EXAMPLES`` overrides the profile's Hypothesis examples per property
(a shorter GPU run; say how many examples a run drew when quoting it).
``configure()`` must run before ``triton``, ``bi_torch`` or ``jax`` is
imported, because the Triton interpreter is chosen at import time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

from bi_core.devices import nvidia_gpu_present, requested_device


@dataclass(frozen=True)
class Profile:
    """Sizes the properties draw from on one kind of device."""

    name: str  # "gpu" or "cpu"
    max_batch: int  # largest batch (rows) in one call
    max_elements: int  # cap on batch * features per input, to bound memory and time
    feature_sizes: tuple[int, ...]  # realistic sizes drawn often
    max_features: int  # any size in 1..max_features is drawn too
    max_examples: int  # Hypothesis examples per property

    @property
    def native(self) -> bool:
        return self.name == "gpu"


GPU = Profile(
    name="gpu",
    max_batch=16384,
    max_elements=2**25,
    # 24576 and 32000 exercise the chunked path for rows over 16384 elements.
    feature_sizes=(4096, 5120, 8192, 11008, 14336, 16384, 24576, 32000),
    max_features=16384,
    max_examples=15,
)
CPU = Profile(
    name="cpu",
    max_batch=24,
    max_elements=24 * 320,
    feature_sizes=(64, 96, 128, 257),
    max_features=320,
    max_examples=12,
)


# Parallel test processes on one GPU (pytest-xdist): torch's share of the GPU
# memory, split between the workers (tests/conftest.py caps each process), the
# rest left to JAX and the CUDA contexts.
TORCH_MEMORY_SHARE = 0.6
# GPU memory a property may need per element of the profile's budget (inputs,
# fp32 copies, outputs, a control's partial sums). Measured: at 2**25
# elements, 14 GB per worker (6 workers on an H200) was too little for the
# matmul split-by-batch control at 32000 features.
BYTES_PER_BUDGET_ELEMENT = 512


def gpu_profile(memory_bytes: int, workers: int) -> Profile:
    """The GPU profile for ``workers`` test processes sharing a GPU of
    ``memory_bytes``: the element budget shrinks to what one worker's share
    holds (never past the single-process budget, 2**25)."""
    share = int(memory_bytes * TORCH_MEMORY_SHARE / max(1, workers)) if workers > 1 else memory_bytes
    budget = min(GPU.max_elements, share // BYTES_PER_BUDGET_ELEMENT)
    if budget >= GPU.max_elements:
        return GPU
    return dataclasses.replace(GPU, max_elements=budget, max_batch=min(GPU.max_batch, budget))


def _cuda_available() -> bool:
    """Whether the installed frameworks can run on a CUDA GPU: torch's CUDA
    build sees one, or (without torch) the driver sees one and JAX's CUDA
    plugin is installed."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return bool(torch.cuda.is_available())
    plugins = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")
    return nvidia_gpu_present() and any(_find(p) for p in plugins)


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=1)
def configure() -> Profile:
    """Resolve ``BI_DEVICE`` and set the interpreter switches for a CPU run
    (``BI_MAX_EXAMPLES``: the examples per property, if set)."""
    profile = _configure()
    examples = os.environ.get("BI_MAX_EXAMPLES")
    if examples:
        if not examples.isdigit() or int(examples) < 1:
            raise ValueError(f"BI_MAX_EXAMPLES must be a positive integer, not {examples!r}")
        profile = dataclasses.replace(profile, max_examples=int(examples))
    return profile


def _configure() -> Profile:
    choice = requested_device()
    # JAX would otherwise reserve most of the GPU memory that torch needs too.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if choice == "auto":
        choice = "gpu" if _cuda_available() else "cpu"
    if choice == "gpu":
        if not _cuda_available():
            raise RuntimeError("BI_DEVICE=gpu but no framework here can use a CUDA GPU")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise RuntimeError("BI_DEVICE=gpu conflicts with TRITON_INTERPRET=1")
        # The GPU profile's sizes are for compiled kernels: a framework that
        # would run its interpreter instead (a jaxlib without its CUDA plugin
        # beside torch's CUDA build) must fail at once with the fix, not crawl.
        os.environ["BI_DEVICE"] = "gpu"
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        if workers > 1 and importlib.util.find_spec("torch") is not None:
            import torch

            return gpu_profile(torch.cuda.get_device_properties(0).total_memory, workers)
        return GPU
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return CPU


def jax_off_the_gpu() -> str | None:
    """On a GPU run: why bi_jax cannot run compiled here (JAX has no GPU
    backend: a jaxlib without its CUDA plugin), or None where it can."""
    import jax

    backend = jax.default_backend()
    if backend == "gpu":
        return None
    return (f"JAX runs on its {backend} backend here while torch runs on the GPU, so bi_jax would run in the "
            "Pallas interpreter at GPU sizes: install JAX's CUDA plugin, for example pip install -c "
            "constraints/gpu-image.txt -e '.[torch,jax,cuda13]' (cuda12 for JAX on a CUDA 12 driver)")


def release_device_memory() -> None:
    """Hand back what the last job cached on the GPU.

    torch's caching allocator keeps freed blocks; a JAX job after a large torch
    job in the same process, or in another process on the same GPU (parallel
    test workers), could otherwise run out of memory.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The cached Triton launch (``bi_torch._launch.fast``): a hit launches the
kernel that Triton returned for the same key, with Triton's argument order;
anything that Triton specialises on makes a new key."""

from __future__ import annotations

import pytest
import torch

from bi_torch import _launch


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self) -> None:
        self.runs = []

    def run(self, *args) -> None:
        self.runs.append(args)


class _Jitted:
    """Triton's ``JITFunction`` as ``fast`` sees it: ``[grid](...)`` launches
    and returns the compiled kernel."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.launches = []
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.compiled
        return launch


def _kernel(x_ptr, y_ptr, n, scale, BLOCK, MODE="sum"):  # noqa: N803  (a kernel's constexpr names)
    pass


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_device_stream", lambda: (0, 1234))
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    return _launch.fast(_Jitted(_kernel))


def test_a_hit_runs_the_compiled_kernel_with_tritons_argument_order(kernel):
    x, y = torch.zeros(64), torch.zeros(64)
    kernel[(3, 2)](x, y, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.kernel.launches) == 1 and not kernel.kernel.compiled.runs
    kernel[(5,)](x, y, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.kernel.launches) == 1  # not Triton's path again
    (run,) = kernel.kernel.compiled.runs
    # grid (padded with 1s), stream, function, metadata, no launch hooks, then
    # every parameter in order: the positional ones, the constexprs, defaults.
    assert run == (5, 1, 1, 1234, "function", "metadata", None, None, None, x, y, 64, 0.5, 32, "sum")


@pytest.mark.parametrize("change", ["alignment", "dtype", "int", "float", "constexpr", "option"])
def test_what_triton_specialises_on_makes_a_new_key(kernel, change):
    base = torch.zeros(64)
    kernel[(1,)](base, base, 64, 0.5, BLOCK=32, num_warps=4)
    args, kwargs = [base, base, 64, 0.5], {"BLOCK": 32, "num_warps": 4}
    if change == "alignment":
        args[0] = base[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[1] = torch.zeros(64, dtype=torch.float16)
    elif change == "int":
        args[2] = 16
    elif change == "float":
        args[3] = 1.0
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    else:
        kwargs["num_warps"] = 8
    kernel[(1,)](*args, **kwargs)
    assert len(kernel.kernel.launches) == 2 and not kernel.kernel.compiled.runs


def test_tritons_path_for_other_arguments_hooks_and_when_off(kernel, monkeypatch):
    x = torch.zeros(8)
    for _ in range(2):
        kernel[(1,)](x, object(), 8, 0.5, BLOCK=8)  # an argument the key cannot describe
    assert len(kernel.kernel.launches) == 2
    kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
    kernel[(1,)](x, x, 8, 0.5, BLOCK=8)  # a profiler's launch hook sees every launch
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(_launch, "_ENABLED", False)
    kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
    assert len(kernel.kernel.launches) == 5 and not kernel.kernel.compiled.runs


def test_a_launch_hook_is_seen_only_while_one_is_set():
    from triton import knobs

    assert not _launch._hooks_set()  # Triton's empty hook chains
    hook = lambda *args: None  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert _launch._hooks_set()
        finally:
            chain.remove(hook)
    else:
        knobs.runtime.launch_enter_hook = hook
        try:
            assert _launch._hooks_set()
        finally:
            knobs.runtime.launch_enter_hook = chain
    assert not _launch._hooks_set()


def test_the_kernels_attributes_show_through(kernel):
    assert kernel.fn is _kernel
    assert _launch.cdiv(65, 64) == 2 and _launch.cdiv(64, 64) == 1 and _launch.cdiv(0, 64) == 0


@pytest.mark.gpu
def test_on_the_gpu_the_cached_launch_gives_tritons_bits(monkeypatch):
    import bi_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(5632, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    h = torch.randn(2048, device="cuda", dtype=torch.bfloat16, generator=g)
    calls = {"linear": lambda: bi_torch.linear(x, w), "rms_norm": lambda: bi_torch.rms_norm(x, h, 1e-6),
             "softmax": lambda: bi_torch.softmax(x @ w.T, -1), "mean": lambda: bi_torch.mean(x[:, 1:], -1)}
    from bi_torch.ops import matmul, rms_norm, rows

    kernels = (matmul._matmul_kernel, rms_norm._rms_norm_kernel, rows._row_kernel)
    for name, call in calls.items():
        monkeypatch.setattr(_launch, "_ENABLED", False)
        expected = call()
        monkeypatch.setattr(_launch, "_ENABLED", True)
        first = call()
        hits = [k.hits for k in kernels]
        second = call()  # a hit
        assert sum(k.hits for k in kernels) > sum(hits), name
        assert torch.equal(first, expected) and torch.equal(second, expected), name

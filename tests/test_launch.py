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


class _Launcher:
    """Triton's CUDA launcher object: its C ``launch`` and the settings it passes."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self) -> None:
        self.calls = []

    def launch(self, *args) -> None:
        self.calls.append(args)


def test_a_bound_launch_calls_tritons_c_launcher_with_the_new_tensors(kernel, monkeypatch):
    monkeypatch.setattr(_launch, "_stream", lambda device: 99)
    x, y = torch.zeros(64), torch.zeros(64)
    with _launch.recording() as launches:
        kernel[(3, 2)](x, y, 64, 0.5, BLOCK=32, num_warps=4)
    (launch,) = launches
    assert launch.kernel is kernel and launch.grid == (3, 2) and launch.args == (x, y, 64, 0.5)
    launcher = _Launcher()
    kernel.kernel.compiled.run = launcher  # as Triton's compiled kernel holds it
    bound = kernel.bind(launch, 2)
    x2, y2 = torch.ones(64), torch.ones(64)
    bound(x2, y2)
    (call,) = launcher.calls
    # grid, stream, function, cooperative, PDL, no scratch, metadata, no launch
    # metadata or hooks, then the addresses of the tensors given (the launcher
    # need not ask the driver about a tensor) and the rest of the launch.
    assert call == (3, 2, 1, 99, "function", False, True, None, None, "metadata", None, None, None,
                    x2.data_ptr(), y2.data_ptr(), 64, 0.5, 32, "sum")
    assert len(kernel.kernel.launches) == 1  # nothing through Triton's binder


def test_a_bound_launch_with_scratch_memory_or_hooks_keeps_tritons_launcher(kernel, monkeypatch):
    monkeypatch.setattr(_launch, "_stream", lambda device: 99)
    x = torch.zeros(8)
    with _launch.recording() as launches:
        kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
    launcher = _Launcher()
    calls = []
    kernel.kernel.compiled.run = lambda *args: calls.append(args)
    kernel.kernel.compiled.run.launch = launcher.launch
    kernel.kernel.compiled.run.global_scratch_size = 128
    bound = kernel.bind(launches[0], 2)
    bound(x, x)
    assert calls == [(1, 1, 1, 99, "function", "metadata", None, None, None, x, x, 8, 0.5, 8, "sum")]
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
    bound(x, x)  # a profiler's hook: Triton's own path
    assert len(calls) == 1 and len(kernel.kernel.launches) == 2 and not launcher.calls


def test_a_bound_launch_rebuilds_tensor_descriptors_on_the_new_tensors(kernel, monkeypatch):
    """Descriptors go Triton's way when launched (the key cannot describe
    them); bound, each is rebuilt on the tensor given at its place, with the
    launch's shape, strides, block and padding, for the compiled kernel that
    ran, and the bound launch keeps no tensor of the call it was made from."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(_launch, "_stream", lambda device: 99)
    x, y = torch.zeros(8, 16), torch.zeros(16)
    with _launch.recording() as launches:
        kernel[(4,)](TensorDescriptor.from_tensor(x, [4, 8]), y, 16, 0.5, BLOCK=8)
    assert len(kernel._cache) == 0 and launches[0].compiled is kernel.kernel.compiled
    launcher = _Launcher()
    kernel.kernel.compiled.run = launcher
    bound = kernel.bind(launches[0], 2)
    x2, y2 = torch.ones(8, 16), torch.ones(16)
    bound(x2, y2)
    (call,) = launcher.calls
    desc = call[13]
    assert desc.base is x2 and tuple(desc.shape) == (8, 16) and tuple(desc.strides) == (16, 1)
    assert desc.padding == "zero" and call[14:] == (y2, 16, 0.5, 8, "sum")
    cells = [c.cell_contents for c in bound.__closure__]
    assert not any(isinstance(v, torch.Tensor) for c in cells for v in (c if isinstance(c, tuple) else (c,)))
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)
    bound(x2, y2)  # Triton's path: a checked descriptor of x2
    grid, args, _ = kernel.kernel.launches[-1]
    assert isinstance(args[0], TensorDescriptor) and args[0].base is x2 and args[0].block_shape == [4, 8]
    with pytest.raises(ValueError, match="every tensor argument"):
        kernel.bind(launches[0], 1)  # the descriptor would keep x for good


def test_a_launch_triton_did_not_cache_binds_to_tritons_path(kernel, monkeypatch):
    monkeypatch.setattr(_launch, "_ENABLED", False)
    x = torch.zeros(8)
    with _launch.recording() as launches:
        kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
    bound = kernel.bind(launches[0], 2)
    bound(torch.ones(8), x)
    assert len(kernel.kernel.launches) == 2 and kernel.kernel.launches[1][1][0].sum() == 8
    with pytest.raises(ValueError, match="every tensor argument"):
        kernel.bind(launches[0], 1)  # it would keep x for good


def test_recording_nests_and_records_only_inside(kernel):
    x = torch.zeros(8)
    kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
    with _launch.recording() as outer:
        kernel[(1,)](x, x, 8, 0.5, BLOCK=8)
        with _launch.recording() as inner:
            kernel[(2,)](x, x, 8, 0.5, BLOCK=8)
        kernel[(3,)](x, x, 8, 0.5, BLOCK=8)
    assert [launch.grid for launch in outer] == [(1,), (3,)] and [launch.grid for launch in inner] == [(2,)]


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

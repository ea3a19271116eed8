"""Launching the Triton kernels at a low host cost.

``kernel[grid](*args, **constexprs)`` through Triton binds the arguments,
specialises each one, builds a cache key (a string of the options) and looks
the compiled kernel up on every call: at decode sizes that host time is
larger than the kernel's GPU time. :func:`fast` wraps a ``@triton.jit``
kernel so that the first call with a given key goes through Triton (which
compiles and launches it) and later calls launch the compiled kernel that
Triton returned, with the same arguments in the same order.

The key holds everything Triton specialises on, or more: each tensor's
dtype and whether its address is 16-byte aligned, each integer's value
(Triton looks at its width, its divisibility by 16 and whether it is 1),
every other argument with its type, the keyword arguments (constexprs and
launch options), and the current device. So a hit launches the very kernel
that Triton would have picked: the bits are Triton's.

Triton's own path is kept where the fast one would not be its equal: under
the CPU interpreter, while a launch hook is set (profilers), for arguments
of other types (tensor descriptors), and everywhere with
``BI_TRITON_LAUNCH=triton`` in the environment at import.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch

from bi_torch._checks import interpreting

_ENABLED = os.environ.get("BI_TRITON_LAUNCH", "fast").strip().lower() != "triton"
_MAX_ENTRIES = 4096  # per kernel; a cache that outgrows it starts again


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` is a jitted function:
    a Python call costs it microseconds)."""
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    """The SM count of a CUDA device (cached: a launch-time question)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Other(Exception):
    """An argument the key cannot describe: Triton's path."""


def _device_stream() -> tuple[int, int]:
    """The current device and its current stream, as Triton's CUDA driver
    reads them."""
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _active(hook) -> bool:
    # Triton 3.6 keeps its hooks in chains (empty unless a profiler adds one);
    # earlier versions hold a function or None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    from triton import knobs

    return _active(knobs.runtime.launch_enter_hook) or _active(knobs.runtime.launch_exit_hook)


def _arg_key(args) -> tuple:
    key = []
    for v in args:
        if isinstance(v, torch.Tensor):
            key.append(v.dtype)
            key.append(v.data_ptr() % 16 == 0)
        elif type(v) is int:
            key.append(v)
        elif v is None or type(v) in (float, bool, str):
            key.append((type(v), v))
        else:
            raise _Other
    return tuple(key)


class fast:  # noqa: N801  (a decorator; used like the kernel it wraps)
    """A ``@triton.jit`` kernel with a cached launch (``@fast`` above
    ``@triton.jit``): ``kernel[grid](*args, **kwargs)`` launches what the
    jitted kernel's would."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._parameters = list(inspect.signature(kernel.fn).parameters.values())
        self._cache: dict = {}
        self.hits = 0  # launches that skipped Triton's binder

    def __getattr__(self, name):  # the kernel's attributes (its caches, its name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        if not _ENABLED or interpreting():
            return self.kernel[grid](*args, **kwargs)
        try:
            device, stream = _device_stream()
            key = (device, _arg_key(args), tuple(kwargs.items()))
            hit = self._cache.get(key)
        except (_Other, TypeError):  # TypeError: an unhashable keyword value
            return self.kernel[grid](*args, **kwargs)
        if hit is None or _hooks_set():
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and not hasattr(compiled, "result"):
                if len(self._cache) >= _MAX_ENTRIES:
                    self._cache.clear()
                self._cache[key] = (compiled, self._tail(len(args), kwargs))
            return compiled
        compiled, tail = hit
        self.hits += 1
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
        return compiled

    def _tail(self, given: int, kwargs) -> tuple:
        """The values of the parameters after the positional ones, in the
        kernel's order (as Triton's binder passes them to the launcher)."""
        tail = []
        for param in self._parameters[given:]:
            if param.name in kwargs:
                tail.append(kwargs[param.name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:  # Triton has launched it, so this cannot happen
                raise TypeError(f"{param.name}: no value for the launch")
        return tuple(tail)

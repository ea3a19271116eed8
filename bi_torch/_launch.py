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
of other types (tensor descriptors; a bound launch takes them, below), and everywhere with
``BI_TRITON_LAUNCH=triton`` in the environment at import.

A launch can also be *bound* (:meth:`fast.bind`): everything fixed but its
leading tensors, so that an op that has seen a shape before (``bi_torch._plan``)
launches with one call into Triton's C launcher and no key to build. While
:func:`recording` is active, each launch is also recorded, so that the op
that made it can bind it.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from contextlib import contextmanager
from typing import NamedTuple

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


def capturing() -> bool:
    """Whether the current CUDA stream is recording a CUDA graph (launches
    then cost no host time when they run); False in the interpreter."""
    return not interpreting() and torch._C._cuda_isCurrentStreamCapturing()


def _device_stream() -> tuple[int, int]:
    """The current device and its current stream, as Triton's CUDA driver
    reads them."""
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _stream(device: int) -> int:
    """The current stream of ``device``."""
    return torch._C._cuda_getCurrentRawStream(device)


def _active(hook) -> bool:
    # Triton 3.6 keeps its hooks in chains (empty unless a profiler adds one);
    # earlier versions hold a function or None.
    return hook is not None and bool(getattr(hook, "calls", True))


@functools.cache
def _runtime_knobs():
    from triton import knobs

    return knobs.runtime


def _hooks_set() -> bool:
    knobs = _runtime_knobs()
    return _active(knobs.launch_enter_hook) or _active(knobs.launch_exit_hook)


class Launch(NamedTuple):
    """One launch as :func:`recording` saw it: ``kernel[grid](*args, **kwargs)``,
    and the compiled kernel that ran (None under the interpreter)."""

    kernel: "fast"
    grid: tuple
    args: tuple
    kwargs: dict
    compiled: object = None


class _Descriptor:
    """A host tensor descriptor as Triton's launcher reads one (its base
    tensor, shape, strides and padding), without the checks of
    ``TensorDescriptor``'s constructor: a bound launch made from a checked
    descriptor of the same shape, strides and alignment builds these."""

    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base, shape, strides, padding) -> None:
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


def _is_descriptor(v) -> bool:
    return hasattr(v, "block_shape") and isinstance(getattr(v, "base", None), torch.Tensor)


_RECORDING = threading.local()


@contextmanager
def recording():
    """Record this thread's launches of :class:`fast` kernels while the block
    runs, into the list it yields (the launches still run)."""
    outer = getattr(_RECORDING, "launches", None)
    _RECORDING.launches = launches = []
    try:
        yield launches
    finally:
        _RECORDING.launches = outer


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
        compiled = self._run(grid, args, kwargs)
        launches = getattr(_RECORDING, "launches", None)
        if launches is not None:
            launches.append(Launch(self, grid, args, kwargs, compiled))
        return compiled

    def _run(self, grid, args, kwargs):
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

    def bind(self, launch: Launch, leading: int):
        """``launch`` (of this kernel, made before) as a function of its first
        ``leading`` arguments: ``bound(t0, t1, ...)`` launches
        ``kernel[grid](t0, t1, ..., *launch.args[leading:], **launch.kwargs)``
        on the current stream. The tensors given must match those of
        ``launch`` in dtype and 16-byte alignment (what Triton specialised
        them on); the callers' plan keys hold both. Where the launch went
        Triton's way (the interpreter, no cached kernel), so does every bound
        call; while a launch hook is set, too.

        Every tensor argument must be among the leading ones: a bound launch
        keeps the rest for good, and it must not keep a tensor of the call it
        was made from (under CUDA graph trees that call may have allocated it
        in the graph's pool)."""
        rest = launch.args[leading:]
        if any(isinstance(a, torch.Tensor) or _is_descriptor(a) for a in rest):
            raise ValueError(f"{self.kernel.fn.__name__}: bind takes every tensor argument among the first {leading}")
        grid, kwargs = launch.grid, launch.kwargs
        # Tensor descriptors among the leading arguments: a bound call gives
        # each one's base tensor (any tensor at that address), and the shape,
        # strides, block and padding are the launch's.
        # Only their layouts are kept: never a tensor of the call (see above).
        descriptors = tuple((i, type(a), tuple(a.shape), tuple(a.strides), list(a.block_shape), a.padding)
                            for i, a in enumerate(launch.args[:leading]) if _is_descriptor(a))

        def checked(tensors):
            if not descriptors:
                return tensors
            args = list(tensors)
            for i, kind, shape, strides, block, padding in descriptors:
                args[i] = kind(args[i], shape, strides, block, padding)
            return args

        def through_triton(*tensors):
            self._launch(grid, *checked(tensors), *rest, **kwargs)

        if not _ENABLED or interpreting():
            return through_triton
        if descriptors:
            # Triton's binder does not see these launches (not in the cache):
            # bind the kernel that ran.
            compiled = launch.compiled
            if compiled is None or hasattr(compiled, "result"):
                return through_triton
            tail = self._tail(len(launch.args), kwargs)
        else:
            try:
                device, _ = _device_stream()
                hit = self._cache.get((device, _arg_key(launch.args), tuple(kwargs.items())))
            except (_Other, TypeError):
                hit = None
            if hit is None:
                return through_triton
            compiled, tail = hit
        device, _ = _device_stream()
        fixed = (*rest, *tail)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        runner = compiled.run  # loads the kernel if it is not yet (Triton's property)
        function, metadata = compiled.function, compiled.packed_metadata
        direct = getattr(runner, "launch", None)
        if direct is None or getattr(runner, "global_scratch_size", 1) or getattr(runner, "profile_scratch_size", 1):
            # Triton's launcher object: it allocates the kernel's scratch memory.
            def bound(*tensors):
                if _hooks_set():
                    return through_triton(*tensors)
                self.hits += 1
                runner(g0, g1, g2, _stream(device), function, metadata, None, None, None, *checked(tensors), *fixed)
            return bound
        cooperative, pdl = runner.launch_cooperative_grid, runner.launch_pdl
        if descriptors:
            light = tuple((i, shape, strides, padding) for i, _, shape, strides, _, padding in descriptors)

            def bound(*tensors):
                if _hooks_set():
                    return through_triton(*tensors)
                self.hits += 1
                args = list(tensors)
                for i, shape, strides, padding in light:
                    args[i] = _Descriptor(args[i], shape, strides, padding)
                # Triton's launcher turns each descriptor into a TMA map of the new base.
                direct(g0, g1, g2, _stream(device), function, cooperative, pdl, None, None, metadata, None, None,
                       None, *args, *fixed)
            return bound

        def bound(*tensors):
            if _hooks_set():
                return through_triton(*tensors)
            self.hits += 1
            # Triton's C launcher, as its launcher object calls it: grid, stream,
            # function, cooperative, PDL, no scratch, metadata, no hooks, arguments.
            # Each pointer goes as its address: given a tensor, the launcher
            # calls its data_ptr() and then asks the driver whether that
            # address is device memory (cuPointerGetAttribute, one driver call
            # per tensor per launch). The plan's key fixed the device, so the
            # answer is known.
            direct(g0, g1, g2, _stream(device), function, cooperative, pdl, None, None, metadata, None, None, None,
                   *[t.data_ptr() for t in tensors], *fixed)
        return bound

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

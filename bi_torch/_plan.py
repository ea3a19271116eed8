"""Plans: an op's launches for a call signature it has run before, replayed
at a low host cost.

At decode sizes the host time of a bi_ call is mostly Python: the checks,
the views, the config lookups and the launch's argument handling. All of it
is a function of the call's *signature*: each tensor's shape, strides, dtype,
device and the 16-byte alignment of its address (what Triton specialises a
pointer on), the other arguments, the current device, and the few global
settings an op reads (``allow_tf32`` for fp32 products). An op that has run a
signature through its full path keeps a *plan* for it: a function that
allocates the outputs and calls the bound launches (``fast.bind``) on the new
tensors. A plan is made only where the full path launched its kernels on the
caller's tensors themselves (no copy, no cast), so a plan launches exactly
what the full path would: the same kernels, configs and arguments, so the
same bits. What the full path checks, the signature fixes, so a plan checks
nothing again.

Not planned: inputs that require grad while grad mode is on (the full path
refuses them), tensor subclasses (their own dispatch must see the call), and
what each op leaves to its full path (copies, casts, empty tensors, values
read from the device). ``BI_PLANS=0`` in the environment at import turns
plans off; :func:`stats` counts them.
"""

from __future__ import annotations

import functools
import os

import torch

from bi_torch._checks import interpreting

ENABLED = os.environ.get("BI_PLANS", "1").strip().lower() not in ("0", "off", "false", "no")
_MAX_PLANS = 1024  # per op; a cache that outgrows it starts again
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ALL: list[Plans] = []


def current_device() -> int:
    """The current CUDA device (the kernels launch on it); -1 in the interpreter."""
    return -1 if interpreting() else torch._C._cuda_getDevice()


def plain(*tensors) -> bool:
    """Tensors (or None) that a plan may take: plain tensors where the
    kernels run (CUDA; the CPU in the interpreter) that autograd need not see."""
    grad = torch.is_grad_enabled()
    cpu = interpreting()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad) or not (t.is_cuda or cpu):
            return False
    return True


def allocator(shape, dtype: torch.dtype, device):
    """A function of no arguments that returns a new uninitialised tensor of
    ``shape``, ``dtype`` and ``device``: a plan's output. ``torch.empty``
    parses sizes given one by one in about half the time of a tuple (1.7
    against 3.6 us on a 2-core CPU, torch 2.11; a ``torch.Size`` took 5.3),
    so the sizes are bound as separate arguments."""
    sizes = tuple(int(s) for s in shape)
    if not sizes:  # torch.empty() takes no sizes at all: a 0-d tensor needs ()
        return functools.partial(torch.empty, (), dtype=dtype, device=device)
    return functools.partial(torch.empty, *sizes, dtype=dtype, device=device)


def signature(t: torch.Tensor | None) -> tuple | None:
    """What a plan depends on in a tensor: shape, strides, dtype, device, and
    its address modulo 16 (Triton specialises pointers on 16-byte alignment)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


class Plans:
    """An op's plans, by call signature."""

    def __init__(self, op: str) -> None:
        self.op = op
        self._plans: dict = {}
        self.hits = 0
        self.made = 0
        _ALL.append(self)

    def get(self, key):
        """The plan for ``key`` (None: no plan, or plans are off)."""
        plan = self._plans.get(key)
        if plan is not None:
            self.hits += 1
        return plan

    def peek(self, key):
        """The plan for ``key``, not counted as a hit."""
        return self._plans.get(key) if key is not None else None

    def add(self, key, plan) -> None:
        if not ENABLED or key is None or plan is None:
            return
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        self.made += 1

    def clear(self) -> None:
        self._plans.clear()
        self.hits = self.made = 0


def stats() -> dict[str, dict[str, int]]:
    """Per op: plans made and calls that ran one."""
    return {p.op: {"made": p.made, "hits": p.hits} for p in _ALL}


def clear() -> None:
    """Forget every plan and the counts (the next call of each signature
    takes the full path)."""
    for p in _ALL:
        p.clear()


def single(launches, kernel, leading: int):
    """The bound form of ``launches`` when they are one launch of ``kernel``
    (else None), taking its first ``leading`` arguments."""
    if len(launches) != 1 or launches[0].kernel is not kernel:
        return None
    return kernel.bind(launches[0], leading)


def same_memory(*pairs) -> bool:
    """Each (given, launched) pair is one tensor, or the launched one a view
    at the same address (no copy was made)."""
    return all(a is b or (a is not None and b is not None and a.data_ptr() == b.data_ptr()) for a, b in pairs)

"""Parametrisations shared by the test modules: op x framework x dtype."""

from __future__ import annotations

import pytest

from harness import registry
from harness.frameworks import FRAMEWORKS, adapter


def kernel_cases():
    """Every (op, framework, dtype) whose bi_ kernel exists."""
    out = []
    for spec in registry.all_specs():
        for fw in FRAMEWORKS:
            if adapter(fw).kernel(spec.name) is None:
                continue
            for dtype in spec.dtypes:
                out.append(pytest.param(spec.name, fw, dtype, id=f"{spec.name}-{fw}-{dtype}"))
    return out


def cross_framework_cases():
    """Every (op, dtype) implemented in all frameworks."""
    out = []
    for spec in registry.all_specs():
        if all(adapter(fw).kernel(spec.name) is not None for fw in FRAMEWORKS):
            for dtype in spec.dtypes:
                out.append(pytest.param(spec.name, dtype, id=f"{spec.name}-{dtype}"))
    return out


def control_cases():
    """Every negative control of every op, in every framework that has the op;
    ``default`` (the framework's own kernel, GPU only) where the spec says
    where it varies."""
    out = []
    for spec in registry.all_specs():
        for fw in FRAMEWORKS:
            if spec.impl(fw) is None:
                continue
            for name in spec.controls:
                out.append(pytest.param(spec.name, fw, name, id=f"{spec.name}-{fw}-{name}"))
            if spec.default_varies is not None:
                out.append(pytest.param(spec.name, fw, "default", id=f"{spec.name}-{fw}-default", marks=[pytest.mark.gpu]))
    return out


def training_step(device, ctx, direct=False, padding_idx=None, weight_grad=True, compile=None):
    """Gradients of a small embedding -> RMSNorm -> linear -> log_softmax ->
    softmax step, through torch's functions under ``ctx`` or (``direct``)
    the bi_ ops themselves; ``compile``: a wrapper for the loss function
    (``torch.compile`` with a backend)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    import bi_torch

    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, 3, 0, 3], [2, 0, 1, 1]], device=device)
    table, w, lin = (torch.randn(*s, generator=g).to(device).requires_grad_(r)
                     for s, r in (((5, 64), True), ((64,), weight_grad), ((32, 64), True)))

    def loss(ids, table, w, lin):
        if direct:
            x = bi_torch.embedding(ids, table)
            y = bi_torch.log_softmax(bi_torch.linear(bi_torch.rms_norm(x, w, 1e-6), lin), -1)
            z = bi_torch.softmax(y, -1)
        else:
            x = F.embedding(ids, table, padding_idx=padding_idx)
            y = F.log_softmax(F.linear(F.rms_norm(x, (64,), w, 1e-6), lin), -1)
            z = torch.softmax(y, -1)
        return (y * z).sum()

    with ctx or contextlib.nullcontext():
        (compile(loss) if compile else loss)(ids, table, w, lin).backward()
    return table.grad, w.grad, lin.grad


def count_backward_kernels(monkeypatch):
    """A Counter of calls of bi_torch's embedding, softmax and RMSNorm
    backward entry points, counted from now on (``monkeypatch``: pytest's)."""
    from collections import Counter

    from bi_torch.ops import embedding, rows_grad

    calls = Counter()
    for module, name in ((embedding, "embedding_backward"), (rows_grad, "normalise_backward"),
                         (rows_grad, "rms_norm_backward")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls

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

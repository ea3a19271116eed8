"""The op registry: the specs of ``harness.specs.SPECS``, by name."""

from __future__ import annotations

from harness.opspec import OpSpec
from harness.specs import SPECS

_BY_NAME: dict[str, OpSpec] = {}
for _spec in SPECS:
    if _spec.name in _BY_NAME:
        raise ValueError(f"op {_spec.name!r} is listed twice in harness.specs.SPECS")
    _BY_NAME[_spec.name] = _spec


def names() -> list[str]:
    return [s.name for s in SPECS]


def get(name: str) -> OpSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; known ops: {', '.join(names())}") from None


def all_specs() -> list[OpSpec]:
    return list(SPECS)

"""The device profile resolved by conftest (importable from test modules)."""

from harness.devices import configure

PROFILE = configure()

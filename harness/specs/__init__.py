"""Op specs. Each module registers one op; importing this package loads all."""

from harness.specs import matmul, rms_norm, rows  # noqa: F401

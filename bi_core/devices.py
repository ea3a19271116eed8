"""What the machine has, without importing a framework."""

from __future__ import annotations

import glob
import os


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver sees a GPU on this machine (its device
    nodes or its /proc entries), whatever the Python frameworks can use."""
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


def requested_device() -> str:
    """``BI_DEVICE``: ``auto`` (default), ``gpu`` or ``cpu``."""
    choice = os.environ.get("BI_DEVICE", "auto").strip().lower() or "auto"
    if choice not in ("auto", "gpu", "cpu"):
        raise ValueError(f"BI_DEVICE must be auto, gpu or cpu, got {os.environ.get('BI_DEVICE')!r}")
    return choice

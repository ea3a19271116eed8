"""Bitwise comparison of numpy arrays and ULP distances."""

from __future__ import annotations

import ml_dtypes
import numpy as np

_INT_VIEW = {2: np.int16, 4: np.int32, 8: np.int64}


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for ``float32`` / ``bfloat16`` / ``float16`` / ``float64``."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def as_bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(_INT_VIEW[a.dtype.itemsize])


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise distance in units in the last place (same dtype).

    Bit patterns are mapped to integers that are ordered like the floats, so
    the difference counts the representable values between ``a`` and ``b``.
    Equal bit patterns (NaNs included) give 0.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"cannot compare {a.dtype}{a.shape} with {b.dtype}{b.shape}")
    ia = as_bits(a).astype(np.int64)
    ib = as_bits(b).astype(np.int64)
    bits = a.dtype.itemsize * 8
    lowest = -(1 << (bits - 1))
    oa = np.where(ia < 0, lowest - ia, ia)
    ob = np.where(ib < 0, lowest - ib, ib)
    return np.abs(oa - ob)


def differing_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices along axis 0 where ``a`` and ``b`` differ in any bit."""
    diff = as_bits(a) != as_bits(b)
    return np.nonzero(diff.reshape(diff.shape[0], -1).any(axis=1))[0]

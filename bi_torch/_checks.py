"""Input validation and layout canonicalisation shared by the bi_torch ops."""

from __future__ import annotations

import os

import torch

from bi_core.validation import check_eps  # noqa: F401  (re-exported for the ops)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton picks its CPU interpreter when a kernel is defined, that is when
# bi_torch is imported: that choice, not the variable's value now, decides
# where the kernels run.
_INTERPRETING = _interpret_requested()


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``
    was set when bi_torch was imported)."""
    return _INTERPRETING


def check_float_tensor(name: str, t: object, op: str | None = None) -> None:
    """``t`` is a tensor of a supported float dtype; else a TypeError naming
    ``op`` (the public function called) and the argument."""
    where = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where}{name} has dtype {t.dtype}; supported dtypes are float32, bfloat16 and float16"
        )


def check_launchable(op: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    if _interpret_requested() != _INTERPRETING:
        now = "set" if _interpret_requested() else "unset"
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET was {now} after bi_torch was imported; Triton chooses between the GPU "
            "and its CPU interpreter when the kernels are defined, at import. Set TRITON_INTERPRET=1 "
            "before importing bi_torch to run on the CPU, and leave it unset to run on a GPU."
        )
    if t.device.type == "cuda":
        if _INTERPRETING:
            raise RuntimeError(
                f"{op}: bi_torch was imported with TRITON_INTERPRET=1 (the CPU interpreter) but the input is "
                f"on {t.device}; pass CPU tensors, or import bi_torch without TRITON_INTERPRET to use the GPU"
            )
        return
    if t.device.type == "cpu" and _INTERPRETING:
        return
    raise ValueError(
        f"{op}: input is on device '{t.device}'; bi_torch kernels need a CUDA tensor "
        "(CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before importing bi_torch)"
    )


# Within a row, offsets are int32 (chunk index times block plus lane): rows may
# have at most this many elements, the masked lanes of the last chunk included.
MAX_ROW_ELEMENTS = 2**31 - 1 - 8192


def check_row_length(op: str, n: int) -> None:
    if n > MAX_ROW_ELEMENTS:
        raise ValueError(f"{op}: rows of {n} elements are too long (at most {MAX_ROW_ELEMENTS}: int32 offsets)")


def check_no_autograd(op: str, *tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"{op}: this call is forward-only (inference): among the attention ops only "
            "bi_torch.attention and varlen_attention without a window, and scaled_dot_product_attention "
            "without attn_mask, have a backward pass; call under torch.no_grad() "
            "or torch.inference_mode(), or detach the inputs"
        )


def canonical(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned.

    Triton specialises a kernel on pointer alignment and stride divisibility, and
    the specialisation can change the register layout and so the reduction order.
    Copying views into a fresh buffer makes the compiled kernel a function of the
    shape alone, so a row gives the same bits whether it arrives as a view or not.
    """
    if not t.is_contiguous():
        t = t.contiguous()
    if t.data_ptr() % 16 != 0:
        t = t.clone(memory_format=torch.contiguous_format)
    return t

"""Launch-side helpers shared by the Triton-backed ops: availability, input checks, the checked triton range."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings

import torch

from ..kernels.limits import CHECKED_TRITON

__all__ = ["HAS_TRITON", "SUPPORTED_DTYPES", "check_triton_inputs"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether triton is importable; it is imported lazily, only when a Triton path runs."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_version_checked = False


def _check_triton_version() -> None:
    """Warn once when the installed triton is outside the versions ``make aot`` checks (compiles, no spills)."""
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    version = importlib.metadata.version("triton")
    if ".".join(version.split(".")[:2]) not in CHECKED_TRITON:
        warnings.warn(
            f"triton {version} is outside the versions fastmil's kernels are checked on ({', '.join(CHECKED_TRITON)}: "
            "ahead-of-time compile without register spills); they may compile with spills or not at all",
            RuntimeWarning, stacklevel=3,
        )


def check_triton_inputs(op: str, dtype: torch.dtype, dim: int, *tensors: torch.Tensor | None) -> None:
    """Errors the Triton path reports before launching: input dtype, feature width, one device for every
    tensor; and a warning for an unchecked triton version."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the Triton kernels take fp32/fp16/bf16 inputs, got {dtype}")
    if dim < 2:
        raise ValueError(
            f"{op}: the Triton kernels need a feature width D >= 2 (D = 1 would compile a specialisation that "
            "`make aot` does not check); use backend='torch'"
        )
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    _check_triton_version()

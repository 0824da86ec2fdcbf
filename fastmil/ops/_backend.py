"""Backend selection shared by every op: ``backend="auto"|"triton"|"torch"`` and ``FASTMIL_BACKEND``.

``auto`` means: Triton for CUDA tensors when the op has a Triton implementation and the GPU is one the kernels are
checked for (compute capability >= 8.0, :data:`TRITON_MIN_CAPABILITY`: ``make aot`` compiles them for sm_80 and
sm_90; before Ampere every ``tl.dot`` lowers to FMA and ``linear_relu_dropout`` spills), the torch path otherwise
(said once per device, as a warning).
The environment variable ``FASTMIL_BACKEND`` (same three values) overrides ``auto`` for every op; an explicit
``backend=`` argument other than ``auto`` always wins. Asking for ``triton`` where it cannot run is an error,
never a silent fall-back to torch.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from ..kernels._launch import interpreting

__all__ = ["BACKENDS", "TRITON_MIN_CAPABILITY", "check_torch_only", "interpreting", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")
TRITON_MIN_CAPABILITY = (8, 0)
"""The oldest GPU architecture ``auto`` runs the Triton kernels on (the targets ``make aot`` checks start here)."""
_warned_devices: set[str] = set()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA device (asked once per device; ``cuda`` without an index is
    the current device)."""
    return _capability(torch.cuda.current_device() if device.index is None else device.index)


def _checked_gpu(device: torch.device) -> bool:
    """True if ``device`` is a GPU the kernels are checked for; else warns once for that device."""
    name = str(device)
    capability = device_capability(device)
    if capability >= TRITON_MIN_CAPABILITY:
        return True
    if name not in _warned_devices:
        _warned_devices.add(name)
        warnings.warn(f"fastmil: {name} has compute capability {capability[0]}.{capability[1]}, below the "
                      f"{TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} the Triton kernels are checked for: "
                      "backend='auto' runs the torch path there (backend='triton' forces the kernels)", stacklevel=3)
    return False


def resolve_backend(backend: str, op: str, device: torch.device, has_triton: bool) -> str:
    """Return ``"torch"`` or ``"triton"`` for running ``op`` on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``triton`` requested but the op has no Triton kernel, or the tensors are on the CPU
            without ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("FASTMIL_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"FASTMIL_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if (device.type == "cuda" and has_triton and _checked_gpu(device)) else "torch"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError(f"{op}: no Triton kernel is available for this op; use backend='torch'")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported"
            )
    return backend


def check_torch_only(backend: str, op: str) -> None:
    """For ops with a torch implementation only: ``auto`` and ``torch`` run it (``FASTMIL_BACKEND``, which selects
    among an op's kernels, does not apply); ``triton`` is an error, never a silent fall-back."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise RuntimeError(f"{op}: no Triton kernel is available for this op (its torch path runs on every "
                           "device); use backend='torch' or 'auto'")

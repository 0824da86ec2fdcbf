"""Backend selection shared by every op: ``backend="auto"|"triton"|"torch"`` and ``FASTMIL_BACKEND``.

``auto`` means: Triton for CUDA tensors when the op has a Triton implementation, the torch path otherwise.
The environment variable ``FASTMIL_BACKEND`` (same three values) overrides ``auto`` for every op; an explicit
``backend=`` argument other than ``auto`` always wins. Asking for ``triton`` where it cannot run is an error,
never a silent fall-back to torch.
"""
from __future__ import annotations

import os

import torch

from ..kernels._launch import interpreting

__all__ = ["BACKENDS", "check_torch_only", "interpreting", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


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
        return "triton" if (device.type == "cuda" and has_triton) else "torch"
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

"""Launch-side helpers shared by the Triton-backed ops: availability, dtype policy, deterministic segment sums."""
from __future__ import annotations

import importlib.util

import torch

from ._backend import interpreting

__all__ = ["HAS_TRITON", "SUPPORTED_DTYPES", "cdiv", "check_triton_inputs", "dot_precision", "segment_sum", "upcast_dots"]

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether triton is importable; it is imported lazily, only when a Triton path runs."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def upcast_dots(dtype: torch.dtype) -> bool:
    """Cast the score GEMM's ``tl.dot`` operands to fp32: for fp32 inputs, and for bf16 under the interpreter
    (its bf16 arithmetic is wrong). fp16 keeps native fp16 operands under the interpreter too, so the tests run
    the same code path (fp16 weights, fp16 tensor-core-style products) that a GPU runs."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def dot_precision(dtype: torch.dtype) -> str:
    """Mode of the fp32 ``tl.dot`` products (weighted sums, gradient GEMMs; the fp32 score GEMM).

    fp16/bf16 inputs: ``"tf32"`` (TF32 holds their mantissas exactly; the fp32 operand is rounded to 10 bits).
    fp32 inputs: ``"tf32"`` where torch itself would use TF32 (``torch.backends.cuda.matmul.allow_tf32``),
    else ``"tf32x3"`` (three TF32 products, close to fp32 accuracy, still on tensor cores; the FMA-based
    ``"ieee"`` mode spills registers in these tile shapes). Under the interpreter: ``"ieee"`` (numpy fp32)."""
    if interpreting():
        return "ieee"
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-bag sums of ``values [N, ...]`` -> ``[B, ...]`` fp32, deterministic on every device (fp64 prefix sums
    instead of atomics)."""
    prefix = torch.zeros((values.shape[0] + 1, *values.shape[1:]), dtype=torch.float64, device=values.device)
    torch.cumsum(values.double(), 0, out=prefix[1:])
    return (prefix[offsets[1:]] - prefix[offsets[:-1]]).float()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids."""
    return -(-a // b)


def check_triton_inputs(op: str, dtype: torch.dtype, *tensors: torch.Tensor | None) -> None:
    """Errors the Triton path reports before launching: input dtype, and one device for every tensor."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the Triton kernels take fp32/fp16/bf16 inputs, got {dtype}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")

"""Kernel launches as values, and the precision policy every launcher shares.

A :class:`Launch` is one kernel call: the ``@triton.jit`` function, its grid, every argument by name
(runtime values and constexprs alike) and the launch options. Each kernels module builds its launches with
one function per kernel (``*_launch``) from the real tensors; ``fastmil.ops`` calls that function and runs
the result, and ``make aot`` (``fastmil.aot``) calls the same function with representative tensors and
compiles the result with Triton's own argument binder. So the specialisation that is checked for register
spills (dtypes, divisibility-by-16 and equal-to-1 integer specialisation, pointer alignment, constexprs,
warps, stages) is, by construction, the one the GPU runs.

This module does not import triton: ``fastmil.ops`` uses the policy functions on every device.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "AOT_DIMS", "AotTiles", "DEFAULT_NUM_STAGES", "KernelConfig", "Launch", "aot_views", "canonical", "dot_precision",
    "interpreting", "is_canonical", "pow2_at_least", "upcast_dots",
]

DEFAULT_NUM_STAGES = 3
"""Triton's default software-pipelining depth; every launch states its stages explicitly anyway."""


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes (constexprs) and launch options of one kernel specialisation."""

    block_n: int
    block_d: int
    num_warps: int
    num_stages: int = DEFAULT_NUM_STAGES


@dataclass(frozen=True)
class Launch:
    """One kernel call. ``args`` maps every kernel parameter name to its value (tensors, ints, constexprs)."""

    kernel: Any
    grid: tuple[int, ...]
    args: Mapping[str, Any]
    num_warps: int
    num_stages: int
    strided: tuple[str, ...] = ()
    """Arguments the kernel addresses with a row-stride argument of their own; every other tensor must be
    contiguous."""

    def __post_init__(self) -> None:
        names = list(self.kernel.arg_names)
        if set(names) != set(self.args):
            missing, extra = sorted(set(names) - set(self.args)), sorted(set(self.args) - set(names))
            raise TypeError(f"{self.name}: launch arguments do not match the kernel (missing {missing}, extra {extra})")
        devices = {str(v.device) for v in self.args.values() if isinstance(v, torch.Tensor)}
        if len(devices) > 1:
            where = {name: str(v.device) for name, v in self.args.items() if isinstance(v, torch.Tensor)}
            raise ValueError(f"{self.name}: the tensors are on different devices ({where}); move them to one device")
        for name, value in self.args.items():
            if isinstance(value, torch.Tensor) and not is_canonical(value, strided=name in self.strided):
                raise ValueError(
                    f"{self.name}: argument {name} has a layout the kernel does not address or that is outside "
                    f"the checked specialisations (shape {tuple(value.shape)}, strides {value.stride()}, "
                    f"address mod 16 = {value.data_ptr() % 16}); pass it through "
                    "fastmil.kernels._launch.canonical() first"
                )

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def device(self) -> torch.device | None:
        """The device of the launch's tensors (one, checked at construction), or None without tensors."""
        return next((v.device for v in self.args.values() if isinstance(v, torch.Tensor)), None)

    def __call__(self) -> None:
        """Run the kernel (on a GPU, or through the interpreter on CPU tensors). Triton launches on the *current*
        CUDA device and its current stream: the launch enters the tensors' device first, so a batch on ``cuda:1``
        runs there, ordered with that device's current stream, whatever device is current in the caller."""
        if min(self.grid, default=0) <= 0:
            return
        device = self.device
        on_device = torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext()
        with on_device:
            self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def is_canonical(t: torch.Tensor, strided: bool = False) -> bool:
    """The tensor layouts the kernels are compiled for (and ``make aot`` checks): a 16-byte-aligned base address
    and contiguous elements; or, for an argument the kernel addresses with its own row stride (``strided``), a
    2-D tensor with unit column stride and either contiguous rows or, when the width is a multiple of 16, a row
    stride that is a multiple of 16 (a column slice of a wider matrix, or a broadcast row with stride 0).
    Together with the argument values this fixes Triton's specialisation of every pointer and stride."""
    if t.data_ptr() % 16 != 0:
        return False
    if strided and t.dim() == 2:
        rows, cols = t.stride()
        width = t.shape[1]
        return (cols == 1 or width == 1) and (rows == width or (width % 16 == 0 and rows % 16 == 0))
    return t.is_contiguous()


def canonical(t: torch.Tensor, strided: bool = False) -> torch.Tensor:
    """``t`` itself when :func:`is_canonical` (with the same ``strided``), else a fresh contiguous copy (a
    misaligned view such as ``x[:, 1:]``, a transposed matrix, a sliced or broadcast gradient). The copy costs
    one pass over ``t`` and happens only for such views; what the kernels see is always a checked layout."""
    if is_canonical(t, strided):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (it must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two ``>= max(n, floor)`` (``tl.dot`` needs every dimension >= 16)."""
    p = floor
    while p < n:
        p *= 2
    return p


def upcast_dots(dtype: torch.dtype) -> bool:
    """Cast the score GEMM's ``tl.dot`` operands to fp32: for fp32 inputs, and for bf16 under the interpreter
    (whose bf16 arithmetic is wrong). fp16 keeps native fp16 operands under the interpreter too, so the tests run
    the code path a GPU runs (fp16 weights, fp16 products accumulated in fp32)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def dot_precision(dtype: torch.dtype) -> str:
    """Mode of the fp32 ``tl.dot`` products (weighted sums, gradient GEMMs, the fp32 score GEMM).

    fp16/bf16 inputs: ``"tf32"`` (TF32 holds their mantissas exactly; the fp32 operand is rounded to 10 bits).
    fp32 inputs: ``"tf32"`` where torch itself would use TF32 (``torch.backends.cuda.matmul.allow_tf32``),
    else ``"tf32x3"`` (three TF32 products, close to fp32 accuracy, still on tensor cores). Under the
    interpreter: ``"ieee"`` (it computes every dot in full fp32 whatever the mode says)."""
    if interpreting():
        return "ieee"
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


# ----------------------------------------------------------------------------------------------------------------
# representative arguments for the ahead-of-time checks
# ----------------------------------------------------------------------------------------------------------------
AOT_DIMS = (384, 512, 768, 1024, 1536, 2048, 36)
"""Feature widths the AOT checks feed the launchers: the common encoder widths (one specialisation class:
divisible by 16) and one that is not (the colour features of ``fastmil tile``)."""


@dataclass(frozen=True)
class AotTiles:
    """A small tile table (3 tiles, 2 bags) for representative launches: only dtypes reach the compiler."""

    tile_bag: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int32))
    tile_start: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))
    tile_end: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))
    bag_tiles: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))
    n: int = 64
    n_tiles: int = 3
    n_bags: int = 2


def aot_views(n: int, dim: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``[n, dim]`` CPU tensors in each canonical row layout (values are irrelevant: only dtype, strides and
    alignment reach the compiler): contiguous, and, for widths divisible by 16, a column slice ``x[:, :dim]`` of
    a wider matrix (non-unit row stride)."""
    yield torch.zeros(n, dim, dtype=dtype)
    if dim % 16 == 0:
        yield torch.zeros(n, dim + 16, dtype=dtype)[:, :dim]

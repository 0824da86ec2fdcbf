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
    "AOT_DIMS", "AotTiles", "DEFAULT_NUM_STAGES", "KernelConfig", "Launch", "aot_views", "canonical",
    "compiled_dot_precision", "dot_precision", "interpreting", "is_canonical", "pow2_at_least", "upcast_dots",
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


def compiled_dot_precision(dtype: torch.dtype, allow_tf32: bool | None = None) -> str:
    """Mode of the fp32 ``tl.dot`` products of compiled kernels (a GPU) for ``dtype`` inputs: ``"tf32"`` only
    for fp32 inputs where the user opted in to TF32 for fp32 GEMMs (``allow_tf32``, default
    ``torch.backends.cuda.matmul.allow_tf32``), ``"tf32x3"`` otherwise. :func:`dot_precision` explains why."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if dtype == torch.float32 and allow_tf32 else "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    """Mode of the fp32 ``tl.dot`` products (``DOT_PRECISION``): the weighted sums ``p x`` with fp32 softmax
    weights, the gradient GEMMs over fp32 ``dpre``/``grad_pooled``/weights, the fp32 score GEMMs and the fp32
    embed GEMM. (A ``tl.dot`` of fp16/bf16 operands, the score and embed GEMMs of half inputs, ignores it: its
    products are exact in fp32.)

    The accuracy contract: every fp32 ``tl.dot`` errs like an fp32 computation, unless the user opted in to TF32.

    - ``"tf32x3"`` (every input dtype by default): each fp32 operand ``a`` becomes ``hi + lo`` with ``hi`` its
      TF32 rounding (``cvt.rna``) and ``lo = a - hi`` (exact), which the tensor core truncates to TF32;
      ``hi*hi + hi*lo + lo*hi`` on tensor cores (``_dot.fp32_dot``: two products, ``hi*b + lo*b``, when the other
      operand ``b`` holds fp16/bf16 values, exact in TF32). Per product, the relative error is at most ``2^-21``
      per inexact operand (``2^-22`` more for the dropped ``lo*lo``), without bias; the accumulation is fp32 and
      up to three dots' worth long (``tests/tolerance.py: dot_product_roundoff``). The pooling dots move far more
      bytes than they compute, so the extra products cost no time there; the gated backward's two GEMMs over
      ``dpre`` (4 N D hidden flops each) become tensor-core bound at large ``hidden`` (``docs/performance.md``).
      Plain ``"tf32"`` is not used for them: the tensor core *truncates* fp32 operands to 10 mantissa bits, so
      the fp32 softmax weights, ``dpre`` and gradients would lose ~``2^-11`` of their magnitude on average, a
      bias that shrinks every pooled vector and gradient by ~``2^-11`` relative (~``2^-10`` when both operands
      are fp32) and does not average out over a bag. (fp16/bf16 values are exact in TF32; the other operand is
      not.)
    - ``"tf32"``: fp32 inputs with ``torch.backends.cuda.matmul.allow_tf32``, as torch's own fp32 GEMMs then
      run. The kernels round both operands to nearest TF32 first (``_dot.round_tf32``), so the tensor core's
      truncation drops nothing and the products err by at most ``2^-11`` per operand, without bias.
    - ``"ieee"`` under the interpreter, which computes every dot in full fp32 whatever the mode says. The
      interpreter tests therefore check fp32-level bounds; ``tests/ops/test_tf32_emulation.py`` checks the GPU
      modes by emulating their operand rounding."""
    if interpreting():
        return "ieee"
    return compiled_dot_precision(dtype)


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

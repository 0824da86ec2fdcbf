"""Ragged packed batches for the op and model tests, and per-bag comparison against fp64 references.

Bag sizes are chosen so that no tile or block size divides them (but the bag of one), with an empty bag and an
all-masked bag where a case asks for them. Feature widths ``DIMS`` span several D blocks of every kernel with a
ragged tail (the merge kernel's D block is 128, the tile kernels' 16..64).
"""
from __future__ import annotations

import torch

SIZES = [1, 7, 129, 1000, 4096]
"""The main ragged batch: a bag of one, sizes that are not multiples of any block, a 4096-row bag."""

SMALL_SIZES = [1, 70, 33, 200]
"""A cheaper ragged batch for the wide-feature cases (the interpreter pays per program and per D block)."""

WIDE_DIM = 16 * 16 + 3
"""259 = 2 merge blocks of 128 + a 3-column tail; 5 blocks of 64, 9 of 32, 17 of 16 in the tile kernels."""


def offsets_of(sizes: list[int]) -> torch.Tensor:
    """``int64 [B+1]`` offsets of bags with the given sizes."""
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def make_mask(sizes: list[int], kind: str, generator: torch.Generator, masked_bag: int = 2) -> torch.Tensor | None:
    """``None`` (``kind="none"``), a random mask keeping ~70% (``"random"``), one keeping ~20% (``"sparse"``, as
    MHIM's student sees a bag), or a random mask where bag ``masked_bag`` sees nothing (``"all-masked-bag"``)."""
    if kind == "none":
        return None
    n = sum(sizes)
    mask = torch.rand(n, generator=generator) > (0.8 if kind == "sparse" else 0.3)
    if kind == "all-masked-bag":
        off = offsets_of(sizes)
        mask[off[masked_bag] : off[masked_bag + 1]] = False
    elif kind not in ("random", "sparse"):
        raise ValueError(kind)
    return mask


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``x`` ``[N, D]`` (same values) in a layout the kernels must handle: ``"column-slice"``
    (``big[:, :D]`` of a matrix 2D + 16 wide), ``"misaligned"`` (``big[:, 1:D+1]``: a base address that is not 16-byte
    aligned), ``"row-stride"`` (every other row of a taller matrix), ``"transposed"`` (column-major)."""
    n, d = x.shape
    if layout == "contiguous":
        return x.clone()
    if layout == "column-slice":
        big = torch.full((n, 2 * d + 16), float("nan"), dtype=x.dtype)
        big[:, :d] = x
        return big[:, :d]
    if layout == "misaligned":
        big = torch.full((n, d + 3), float("nan"), dtype=x.dtype)
        big[:, 1 : d + 1] = x
        return big[:, 1 : d + 1]
    if layout == "row-stride":
        big = torch.full((2 * n, d), float("nan"), dtype=x.dtype)
        big[::2] = x
        return big[::2]
    if layout == "transposed":
        return x.T.contiguous().T
    raise ValueError(layout)


LAYOUTS = ["column-slice", "misaligned", "row-stride", "transposed"]

STRIDED_DIM = {"column-slice": 272, "row-stride": 272, "misaligned": WIDE_DIM, "transposed": WIDE_DIM}
"""Feature width per layout: 272 = 17 x 16 keeps the column slice and the row-strided view in a layout the
kernels take as is (a row stride that is a multiple of 16), so the kernels address inputs and outputs with
different strides; the misaligned and transposed views are copied into a checked layout first."""


def per_bag_error(actual: torch.Tensor, expected: torch.Tensor, offsets: torch.Tensor) -> float:
    """Largest error of any bag's rows relative to that bag's own largest reference magnitude (so that the
    ~1/4096 weights of a large bag are checked as tightly as the weights of a small one)."""
    a, e = actual.detach().double(), expected.detach().double()
    worst = 0.0
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        scale = float(e[lo:hi].abs().max())
        err = float((a[lo:hi] - e[lo:hi]).abs().max())
        if scale == 0.0:
            worst = max(worst, float("inf") if err > 0 else 0.0)
        else:
            worst = max(worst, err / scale)
    return worst


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error relative to the largest reference magnitude of the whole tensor."""
    e = expected.detach().double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((actual.detach().double() - e).abs().max()) if e.numel() else 0.0
    return err / scale if scale else err

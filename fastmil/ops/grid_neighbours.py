"""``grid_neighbours``: the spatial stencil graph of each bag's patch lattice, in O(N), vectorised.

Contract (DESIGN.md section 3): ``grid_neighbours(coords [N, 2], offsets [B+1], radius=1, step=None) -> int64 [N, K]``
with ``K = (2r+1)^2 - 1``. Slot ``s`` is a fixed direction ``(dy, dx)`` in row-major order over the
``(2r+1) x (2r+1)`` window without its centre; the entry is the packed-batch row of the instance in that cell of
the same bag, or -1. Because the window is symmetric and enumerated row-major, the reverse direction of slot ``s``
is slot ``K - 1 - s``: if ``nbr[i, s] == j`` then ``nbr[j, K - 1 - s] == i``. ``graph_attention``'s backward pulls
gradients through that reverse slot (deterministic, no atomics).

Cells: each bag is snapped to one lattice, ``round((coord - bag minimum) / step)``: CLAM tiles separate tissue
contours on grids that need not align, so exact division would break those bags apart. ``step`` is the bag's patch
stride (the store's ``patch_size_level0`` when known; otherwise inferred per bag by :func:`infer_step`). Two
instances in one cell of a bag is an error naming the slide.

Algorithm, per bag (no Python loop over instances, no KD-tree): a dense cell table over the bag's bounding box,
padded by ``radius`` on every side, holds each cell's row (or -1); the K neighbours of every instance are K
gathers at fixed linear offsets. Cost O(N + cells). When the bounding box is much larger than the bag (scattered
tissue pieces of a huge slide) the table is replaced by a sorted key array and binary search (O(N log N)), so
memory stays O(N).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._backend import check_torch_only

__all__ = ["check_stencil", "grid_neighbours", "grid_neighbours_reference", "infer_step", "n_slots",
           "stencil_directions"]

DENSE_CELLS_PER_INSTANCE = 64
"""A bag whose padded bounding box has more cells than this many per instance (plus a fixed allowance) uses the
sorted-key lookup instead of the dense table."""
_DENSE_ALLOWANCE = 1 << 22


def n_slots(radius: int) -> int:
    """``K = (2 radius + 1)^2 - 1``: the neighbour slots of a stencil of ``radius``."""
    return (2 * radius + 1) ** 2 - 1


def stencil_directions(radius: int) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` of every slot, row-major over the window without ``(0, 0)``: slot ``K-1-s`` is ``-(slot s)``."""
    if radius < 1:
        raise ValueError(f"grid_neighbours: radius must be >= 1, got {radius}")
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if (dy, dx) != (0, 0)]


def infer_step(coords: np.ndarray) -> int:
    """A bag's patch stride in level-0 pixels: the most frequent positive spacing between patches that are
    neighbours along x (same y) or along y (same x); 1 for a bag without such a pair. 512 on all 8 real CLAM files
    of ``../shared/data/clam_coords``."""
    c = np.asarray(coords, dtype=np.int64)
    gaps = []
    for axis in (0, 1):
        other = 1 - axis
        order = np.lexsort((c[:, axis], c[:, other]))
        s = c[order]
        same_line = s[1:, other] == s[:-1, other]
        d = (s[1:, axis] - s[:-1, axis])[same_line]
        gaps.append(d[d > 0])
    gaps = np.concatenate(gaps)
    if gaps.size == 0:
        return 1
    values, counts = np.unique(gaps, return_counts=True)
    return int(values[np.argmax(counts)])


def _bag_steps(coords_cpu: np.ndarray, offsets: Sequence[int], step: int | Sequence[int] | None) -> list[int]:
    n_bags = len(offsets) - 1
    if step is None:
        return [infer_step(coords_cpu[offsets[b]: offsets[b + 1]]) for b in range(n_bags)]
    steps = [int(step)] * n_bags if np.isscalar(step) else [int(s) for s in step]
    if len(steps) != n_bags:
        raise ValueError(f"grid_neighbours: {len(steps)} steps for {n_bags} bags")
    if any(s < 1 for s in steps):
        raise ValueError(f"grid_neighbours: step must be >= 1, got {steps}")
    return steps


def _duplicate_error(slide: str, key: torch.Tensor, cells: torch.Tensor, coords: torch.Tensor) -> ValueError:
    """The error for two instances of one bag in one lattice cell (equal ``key``), naming both."""
    order = torch.argsort(key, stable=True)
    same = torch.nonzero(key[order][1:] == key[order][:-1])[0, 0]
    i, j = int(order[same]), int(order[same + 1])
    return ValueError(
        f"slide {slide!r}: instances {i} and {j} fall in one lattice cell {tuple(cells[i].tolist())} "
        f"(coords {tuple(coords[i].tolist())} and {tuple(coords[j].tolist())}); duplicate or overlapping patches"
    )


def _bag_neighbours(
    coords: torch.Tensor, step: int, directions: torch.Tensor, radius: int, base: int, slide: str
) -> torch.Tensor:
    """``int64 [n, K]`` neighbours of one bag (rows offset by ``base``)."""
    n = coords.shape[0]
    c = coords.to(torch.int64)
    # nearest cell: round-half-to-even of (c - min) / step, as numpy's rint (fastmil.data.grid.lattice_cells)
    cells = torch.round((c - c.min(0).values).to(torch.float64) / step).to(torch.int64)  # [n, 2] (x, y)
    width = int(cells[:, 0].max()) + 1 + 2 * radius
    height = int(cells[:, 1].max()) + 1 + 2 * radius
    linear = (cells[:, 1] + radius) * width + (cells[:, 0] + radius)  # [n]
    delta = directions[:, 0] * width + directions[:, 1]  # [K]
    rows = torch.arange(base, base + n, dtype=torch.int64, device=coords.device)
    if width * height <= DENSE_CELLS_PER_INSTANCE * n + _DENSE_ALLOWANCE:
        table = torch.full((width * height,), -1, dtype=torch.int64, device=coords.device)
        table[linear] = rows
        if int((table >= 0).sum()) != n:
            raise _duplicate_error(slide, linear, cells, coords)
        return table[linear[:, None] + delta[None, :]]
    keys, order = torch.sort(linear)
    if n > 1 and bool((keys[1:] == keys[:-1]).any()):
        raise _duplicate_error(slide, linear, cells, coords)
    query = linear[:, None] + delta[None, :]
    pos = torch.searchsorted(keys, query).clamp_(max=n - 1)
    return torch.where(keys[pos] == query, rows[order[pos]], torch.full_like(query, -1))


def grid_neighbours(
    coords: torch.Tensor,
    offsets: torch.Tensor,
    radius: int = 1,
    step: int | Sequence[int] | None = None,
    *,
    ids: Sequence[str] | None = None,
    offsets_cpu: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Stencil neighbours of every instance: ``int64 [N, K]`` packed-batch rows, -1 where a cell is empty.

    Args:
        coords: ``[N, 2]`` integer level-0 patch coordinates (x, y), any device.
        offsets: ``int64 [B+1]`` bag boundaries; neighbours never cross them.
        radius: stencil radius r (``K = (2r+1)^2 - 1``; SRMIL uses 2: a 5 x 5 window).
        step: the lattice stride in level-0 pixels, one for all bags or one per bag; None infers each bag's.
        ids: slide ids for error messages.
        offsets_cpu: host copy of ``offsets`` (avoids a device sync).
        backend: ``auto`` or ``torch`` (the op is torch code on every device).

    Raises:
        ValueError: bad shapes or dtypes, or two instances of one bag in one lattice cell (naming the slide).
    """
    check_torch_only(backend, "grid_neighbours")
    if coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError(f"grid_neighbours: coords must be [N, 2], got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise ValueError(f"grid_neighbours: coords must be integer patch coordinates, got {coords.dtype}")
    host = (offsets if offsets.device.type == "cpu" else offsets.cpu()) if offsets_cpu is None else offsets_cpu
    bounds = [int(v) for v in host.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != coords.shape[0] or any(
            a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"grid_neighbours: offsets {bounds[:4]}... do not partition {coords.shape[0]} rows")
    n_bags = len(bounds) - 1
    names = [f"bag{b}" for b in range(n_bags)] if ids is None else list(ids)
    directions = torch.tensor(stencil_directions(radius), dtype=torch.int64, device=coords.device)
    steps = _bag_steps(coords.cpu().numpy() if step is None else np.empty((0, 2)), bounds, step)
    out = torch.empty(coords.shape[0], directions.shape[0], dtype=torch.int64, device=coords.device)
    for b in range(n_bags):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            out[lo:hi] = _bag_neighbours(coords[lo:hi], steps[b], directions, radius, lo, names[b])
    return out


def check_stencil(nbr: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``nbr [N, K]`` is a symmetric stencil table: every entry is -1 or a row in
    ``[0, N)``, and ``nbr[i, s] == j >= 0`` implies ``nbr[j, K-1-s] == i`` (what ``graph_attention``'s backward
    relies on). One gather over the table."""
    if nbr.dim() != 2 or nbr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"neighbour table must be an integer [N, K] tensor, got {nbr.dtype} {tuple(nbr.shape)}")
    n, k = nbr.shape
    if bool(((nbr < -1) | (nbr >= n)).any()):
        raise ValueError(f"neighbour table holds rows outside [-1, {n})")
    valid = nbr >= 0
    reverse = nbr.long().flip(1)  # column s of reverse = column K-1-s of nbr
    rows = torch.arange(n, device=nbr.device)[:, None].expand(n, k)
    partner = reverse[nbr.long().clamp(min=0), torch.arange(k, device=nbr.device)[None, :].expand(n, k)]
    bad = valid & (partner != rows)
    if bool(bad.any()):
        i, s = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"neighbour table is not a symmetric stencil: nbr[{i}, {s}] = {int(nbr[i, s])} but "
                         f"nbr[{int(nbr[i, s])}, {k - 1 - s}] = {int(nbr[int(nbr[i, s]), k - 1 - s])}")


def grid_neighbours_reference(coords: np.ndarray, offsets: Sequence[int], radius: int,
                              steps: Sequence[int]) -> np.ndarray:
    """Independent reference (tests only): a Python dict from lattice cell to row per bag, one lookup per
    instance and direction; returns ``int64 [N, K]``. Raises ``ValueError`` on two instances in one cell."""
    directions = stencil_directions(radius)
    out = np.full((len(coords), len(directions)), -1, dtype=np.int64)
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        if hi == lo:
            continue
        c = np.asarray(coords[lo:hi], dtype=np.int64)
        cells = [tuple(v) for v in np.rint((c - c.min(0)) / float(steps[b])).astype(np.int64).tolist()]
        where: dict[tuple[int, int], int] = {}
        for i, cell in enumerate(cells):
            if cell in where:
                raise ValueError(f"bag {b}: instances {where[cell]} and {i} share cell {cell}")
            where[cell] = lo + i
        for i, (x, y) in enumerate(cells):
            for s, (dy, dx) in enumerate(directions):
                out[lo + i, s] = where.get((x + dx, y + dy), -1)
    return out

"""Patch-lattice helpers: the patch stride of a slide and the lattice cell of every patch."""
from __future__ import annotations

import numpy as np

__all__ = ["patch_stride", "lattice_cells"]


def patch_stride(coords: np.ndarray, patch_size_level0: int | None = None) -> int:
    """The slide's patch stride in level-0 pixels.

    ``patch_size_level0`` when known; otherwise the most frequent positive spacing between patches that are
    neighbours along x (same y) or along y (same x). A single patch gives 1.
    """
    if patch_size_level0:
        return int(patch_size_level0)
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


def lattice_cells(coords: np.ndarray, step: int) -> np.ndarray:
    """Snap level-0 coordinates to the nearest cell of one lattice: ``round((coords - min) / step)``,
    ``int64 [N, 2]`` (x, y)."""
    c = np.asarray(coords, dtype=np.int64)
    return np.rint((c - c.min(axis=0)) / float(step)).astype(np.int64)

"""Patch-lattice helpers: the patch stride of a slide and the lattice cell of every patch."""
from __future__ import annotations

import numpy as np

from ..ops.grid_neighbours import infer_step

__all__ = ["patch_stride", "lattice_cells"]


def patch_stride(coords: np.ndarray, patch_size_level0: int | None = None) -> int:
    """The slide's patch stride in level-0 pixels.

    ``patch_size_level0`` when known; otherwise the most frequent positive spacing between patches that are
    neighbours along x (same y) or along y (same x). A single patch gives 1.
    """
    if patch_size_level0:
        return int(patch_size_level0)
    return infer_step(coords)


def lattice_cells(coords: np.ndarray, step: int) -> np.ndarray:
    """Snap level-0 coordinates to the nearest cell of one lattice: ``round((coords - min) / step)``,
    ``int64 [N, 2]`` (x, y)."""
    c = np.asarray(coords, dtype=np.int64)
    return np.rint((c - c.min(axis=0)) / float(step)).astype(np.int64)

"""Patch-lattice helpers: the patch stride of a slide and the lattice cell of every patch."""
from __future__ import annotations

import numpy as np

from ..ops.grid_neighbours import infer_step

__all__ = ["MAX_PATCH_SIZE", "patch_stride", "lattice_cells"]

MAX_PATCH_SIZE = 1 << 20
"""The largest patch side (level-0 pixels) a slide's metadata may state."""


def patch_stride(coords: np.ndarray, patch_size_level0: int | None = None) -> int:
    """The slide's patch stride in level-0 pixels.

    ``patch_size_level0`` when known (an integer in ``[2, MAX_PATCH_SIZE]``, else ValueError; 0 or None: unknown);
    otherwise the most frequent positive spacing between patches that are neighbours along x (same y) or along y
    (same x). A single patch gives 1.
    """
    if patch_size_level0 is not None and patch_size_level0 != 0:  # 0: unknown, as None
        size = patch_size_level0
        whole = isinstance(size, (int, np.integer)) or (isinstance(size, (float, np.floating)) and size.is_integer())
        if isinstance(size, bool) or not whole or not 2 <= size <= MAX_PATCH_SIZE:
            raise ValueError(f"patch_size_level0 must be an integer in [2, {MAX_PATCH_SIZE}] level-0 pixels, got "
                             f"{size!r}")
        return int(size)
    return infer_step(coords)


def lattice_cells(coords: np.ndarray, step: int) -> np.ndarray:
    """Snap level-0 coordinates to the nearest cell of one lattice: ``round((coords - min) / step)``,
    ``int64 [N, 2]`` (x, y)."""
    c = np.asarray(coords, dtype=np.int64)
    return np.rint((c - c.min(axis=0)) / float(step)).astype(np.int64)

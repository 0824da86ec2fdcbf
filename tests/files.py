"""Test input files: TRIDENT-style feature h5 files and patch-grid coordinates."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def write_trident_h5(path: Path, features: np.ndarray, coords: np.ndarray, patch_size_level0: int = 512,
                     chunks: tuple | None = None) -> None:
    """A TRIDENT-style feature file: (1, D) chunked features, coords with patch geometry attrs."""
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=features, chunks=chunks or (1, features.shape[1]))
        c = fh.create_dataset("coords", data=coords)
        c.attrs["patch_size_level0"] = patch_size_level0
        c.attrs["patch_size"] = 256
        c.attrs["target_magnification"] = 20
        c.attrs["level0_magnification"] = 40
        c.attrs["name"] = path.stem


def grid_coords(n: int, step: int = 512, width: int = 50) -> np.ndarray:
    idx = np.arange(n)
    return np.stack([(idx % width) * step, (idx // width) * step], axis=1).astype(np.int64)

"""Tile a real whole-slide image and compute simple deterministic colour features.

This is the real-slide path of the integration tests and a tiny stand-in for a foundation-model encoder:
tiles are kept where tissue (saturated, not white) covers enough of the tile, and each tile is described by
colour statistics. The output is a TRIDENT-style ``.h5`` (``features`` with TRIDENT's ``(1, D)`` chunking,
``coords`` with the patch geometry in its attrs), which :func:`fastmil.data.ingest` imports.

Needs ``tiffslide`` (``pip install fastmil[wsi]``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from .._atomic import atomic_target

__all__ = ["COLOUR_FEATURE_DIM", "colour_features", "tissue_fraction", "tile_slide_to_h5"]

_HIST_BINS = 8
COLOUR_FEATURE_DIM = 3 * 2 + 3 * 2 + 3 * _HIST_BINS  # RGB mean/std, HSV mean/std, RGB histograms


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` floats in [0, 1] -> HSV in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    delta = cmax - cmin
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(cmax == r, ((g - b) / safe) % 6.0, np.where(cmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue / 6.0, 0.0)
    sat = np.where(cmax > 0, delta / np.where(cmax > 0, cmax, 1.0), 0.0)
    return np.stack([hue, sat, cmax], axis=-1)


def tissue_fraction(tile: np.ndarray, sat_threshold: float = 0.08, white_threshold: float = 0.92) -> float:
    """Fraction of pixels of an RGB uint8 tile ``[h, w, 3]`` that look like stained tissue."""
    hsv = _rgb_to_hsv(tile.astype(np.float32) / 255.0)
    tissue = (hsv[..., 1] > sat_threshold) & (hsv[..., 2] < white_threshold)
    return float(tissue.mean())


def colour_features(tile: np.ndarray) -> np.ndarray:
    """``float32 [COLOUR_FEATURE_DIM]`` colour statistics of an RGB uint8 tile ``[h, w, 3]``."""
    rgb = tile.reshape(-1, 3).astype(np.float32) / 255.0
    hsv = _rgb_to_hsv(rgb)
    hists = [np.histogram(rgb[:, c], bins=_HIST_BINS, range=(0.0, 1.0))[0] / rgb.shape[0] for c in range(3)]
    return np.concatenate(
        [rgb.mean(0), rgb.std(0), hsv.mean(0), hsv.std(0), *hists]
    ).astype(np.float32)


def tile_slide_to_h5(
    slide_path: str | os.PathLike,
    out_h5: str | os.PathLike,
    *,
    patch_size: int = 224,
    min_tissue: float = 0.5,
    progress: bool = True,
) -> int:
    """Tile level 0 of ``slide_path`` into ``patch_size`` squares, keep tissue tiles, write a TRIDENT-style h5.

    Returns the number of tiles kept. The h5 is written to a temporary name and renamed when complete.
    Raises ``ValueError`` when the slide cannot be opened or holds no tissue tile.
    """
    try:
        import tiffslide
    except ImportError as exc:  # pragma: no cover - exercised only without the [wsi] extra
        raise ImportError("tiling needs tiffslide: pip install 'fastmil[wsi]'") from exc
    path = Path(slide_path)
    try:
        slide = tiffslide.TiffSlide(str(path))
    except Exception as exc:  # tifffile raises several types for unreadable files
        raise ValueError(f"{path}: cannot open slide: {exc}") from exc
    width, height = slide.dimensions
    mpp = slide.properties.get("tiffslide.mpp-x")
    objective = slide.properties.get("tiffslide.objective-power")
    if not objective:
        warnings.warn(
            f"{path}: the slide records no objective power; its magnification is stored as unknown "
            "(no level0_magnification/target_magnification attrs)", UserWarning, stacklevel=2,
        )
    feats, coords = [], []
    rows = range(0, height - patch_size + 1, patch_size)
    with slide:
        for y in tqdm(rows, desc=f"tile {path.name}", unit="row", disable=None if progress else True):
            strip = np.asarray(slide.read_region((0, y), 0, (width, patch_size), as_array=True))[..., :3]
            for x in range(0, width - patch_size + 1, patch_size):
                tile = strip[:, x : x + patch_size]
                if tissue_fraction(tile) >= min_tissue:
                    feats.append(colour_features(tile))
                    coords.append((x, y))
    if not feats:
        raise ValueError(f"{path}: no tile of {patch_size}px has >= {min_tissue:.0%} tissue")
    out = Path(out_h5)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as tmp, h5py.File(tmp, "w") as fh:
        f = np.stack(feats)
        fh.create_dataset("features", data=f, chunks=(1, f.shape[1]))  # TRIDENT's chunking
        cds = fh.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        cds.attrs["patch_size"] = patch_size
        cds.attrs["patch_size_level0"] = patch_size
        if objective:
            cds.attrs["level0_magnification"] = float(objective)
            cds.attrs["target_magnification"] = float(objective)
        cds.attrs["overlap"] = 0
        cds.attrs["name"] = path.stem
        if mpp is not None:
            cds.attrs["mpp"] = float(mpp)
        fh.attrs["encoder"] = "colour-stats-v1"
    return len(feats)

"""Pathologist-facing outputs of one slide: attention over the slide thumbnail, a QuPath GeoJSON of the patches,
and the top-k attended patches (CSV, and image crops when the slide file is at hand).

Coordinates are level-0 pixels of the patch's top-left corner (TRIDENT/CLAM); ``patch_size`` is the patch's
level-0 side. Reading slides needs ``tiffslide`` (``pip install "fastmil[wsi]"``).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from .._atomic import write_text_atomic
from ..data.grid import lattice_cells

__all__ = ["SLIDE_SUFFIXES", "find_slide_file", "geojson_patches", "save_slide_overlay", "top_k_patches",
           "write_geojson", "write_top_k"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".mrxs", ".vms", ".svslide")


def find_slide_file(slides_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """``slides_dir/<slide_id><suffix>`` for the first whole-slide suffix that exists, else None."""
    for suffix in SLIDE_SUFFIXES:
        path = Path(slides_dir) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def _open_slide(path: Path):
    try:
        import tiffslide
    except ImportError as exc:  # pragma: no cover - exercised only without the [wsi] extra
        raise ImportError("slide overlays need tiffslide: pip install 'fastmil[wsi]'") from exc
    try:
        return tiffslide.TiffSlide(str(path))
    except Exception as exc:  # tifffile raises several types for unreadable files
        raise ValueError(f"{path}: cannot open slide: {exc}") from exc


def geojson_patches(slide_id: str, coords: np.ndarray, patch_size: int, attention: np.ndarray) -> dict:
    """A GeoJSON FeatureCollection with one square Polygon per patch (level-0 pixels, closed ring), as QuPath
    detections (``objectType: detection``) whose measurements are the attention, the attention divided by the
    slide's maximum, and the rank (1 = most attended)."""
    coords = np.asarray(coords, dtype=np.int64)
    attention = np.asarray(attention, dtype=np.float64)
    if coords.shape[0] != attention.shape[0]:
        raise ValueError(f"slide {slide_id!r}: {coords.shape[0]} patches but {attention.shape[0]} attention values")
    peak = float(attention.max()) if attention.size and attention.max() > 0 else 1.0
    rank = np.empty(len(attention), dtype=np.int64)
    rank[np.argsort(-attention, kind="stable")] = np.arange(1, len(attention) + 1)
    features = []
    for (x, y), a, r in zip(coords.tolist(), attention.tolist(), rank.tolist()):
        ring = [[x, y], [x + patch_size, y], [x + patch_size, y + patch_size], [x, y + patch_size], [x, y]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": f"{slide_id} patch",
                           "measurements": {"attention": a, "attention_rel": a / peak, "attention_rank": r}},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, slide_id: str, coords: np.ndarray, patch_size: int,
                  attention: np.ndarray) -> None:
    """Write :func:`geojson_patches` to ``path`` (atomically); QuPath opens it with File > Import objects."""
    write_text_atomic(path, json.dumps(geojson_patches(slide_id, coords, patch_size, attention)))


def top_k_patches(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most attended patches, highest first (ties by lower index)."""
    return np.argsort(-np.asarray(attention, dtype=np.float64), kind="stable")[:k]


def write_top_k(out_dir: Path, slide_id: str, coords: np.ndarray, patch_size: int, attention: np.ndarray, k: int,
                slide_path: Path | None = None) -> list[int]:
    """``out_dir/<slide_id>.csv`` (rank, index, x, y, attention) of the top-``k`` patches and, with the slide
    file, their level-0 crops as ``out_dir/<slide_id>/rank_<r>.png``. Returns the patch indices."""
    top = top_k_patches(attention, k).tolist()
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["rank", "index", "x", "y", "attention"])
    for r, i in enumerate(top, start=1):
        writer.writerow([r, i, int(coords[i][0]), int(coords[i][1]), f"{float(attention[i]):.8g}"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{slide_id}.csv", buf.getvalue())
    if slide_path is not None:
        from PIL import Image

        crops = out_dir / slide_id
        crops.mkdir(exist_ok=True)
        with _open_slide(slide_path) as slide:
            for r, i in enumerate(top, start=1):
                region = slide.read_region((int(coords[i][0]), int(coords[i][1])), 0, (patch_size, patch_size),
                                           as_array=True)
                Image.fromarray(np.asarray(region)[..., :3]).save(crops / f"rank_{r:03d}.png")
    return top


def save_slide_overlay(path: str | os.PathLike, slide_path: Path, slide_id: str, coords: np.ndarray,
                       stride: int, attention: np.ndarray, max_side: int = 1600, title: str = "") -> None:
    """The slide thumbnail (longest side ``max_side`` px) beside the same thumbnail with the attention drawn over
    it at the patch coordinates (linear, divided by the slide's maximum; patches without attention transparent).
    ``stride``: the patch lattice's step in level-0 pixels (the patch size when patches do not overlap)."""
    from .predict import _figure

    coords = np.asarray(coords, dtype=np.int64)
    with _open_slide(slide_path) as slide:
        width, height = slide.dimensions
        thumb = np.asarray(slide.get_thumbnail((max_side, max_side)).convert("RGB"))
    scale_x, scale_y = thumb.shape[1] / width, thumb.shape[0] / height
    cells = lattice_cells(coords, stride)
    grid = np.full((int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1), np.nan, dtype=np.float32)
    peak = float(attention.max()) if attention.size and attention.max() > 0 else 1.0
    grid[cells[:, 1], cells[:, 0]] = np.asarray(attention, dtype=np.float32) / peak
    x0, y0 = coords.min(axis=0)
    extent = (x0 * scale_x, (x0 + grid.shape[1] * stride) * scale_x,
              (y0 + grid.shape[0] * stride) * scale_y, y0 * scale_y)  # left, right, bottom, top
    fig = _figure((11, 5.5 * thumb.shape[0] / thumb.shape[1] + 0.8))
    axes = fig.subplots(1, 2)
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(thumb)
    img = axes[1].imshow(np.ma.masked_invalid(grid), cmap="inferno", vmin=0, vmax=1, alpha=0.6, extent=extent,
                         interpolation="nearest")
    axes[1].set_xlim(0, thumb.shape[1])
    axes[1].set_ylim(thumb.shape[0], 0)
    axes[1].set_title("attention / max attention")
    fig.colorbar(img, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{slide_id} {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=90)

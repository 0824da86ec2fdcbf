"""Per-slide spatial neighbour tables, built once and cached beside the slide's features.

``slides/<slide_id>/neighbours_r<R>.npz`` holds ``neighbours int32 [N, K]`` (rows local to the slide, -1 where a
lattice cell is empty; the stencil of :func:`fastmil.ops.grid_neighbours`), the lattice ``step`` and the SHA-1 of
the slide's coordinates. A table whose digest, shape or step no longer matches the slide is stale and rebuilt.
Files are written aside and renamed (``fastmil._atomic``): a reader sees the old table, the new one or none.
Overwriting a slide replaces its folder, and with it every cached table.

The cache is derived data, so it is written even through a store opened read-only when the folder is writable;
where it is not (a read-only file system, a shared store without write permission) the table is kept in the
process's memory (the most recent ``MEMORY_CACHE_SLIDES`` slides, checked against the coordinates like the
files), with one warning.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._atomic import atomic_target
from ..ops.grid_neighbours import grid_neighbours, n_slots
from .grid import patch_stride

if TYPE_CHECKING:
    from .store import FeatureStore

__all__ = ["cache_path", "coords_digest", "slide_neighbours"]

_memory: OrderedDict[tuple[str, str, int], tuple[str, int, np.ndarray]] = OrderedDict()
"""Tables of unwritable stores, most recently used last: ``(store, slide, radius) -> (coords digest, step, table)``."""
MEMORY_CACHE_SLIDES = 256
"""At most this many tables are kept in memory (an unwritable store's cohort may not fit)."""
_warned: set[str] = set()


def coords_digest(coords: np.ndarray) -> str:
    """SHA-1 of the coordinates as little-endian int32 (what the store holds)."""
    return hashlib.sha1(np.ascontiguousarray(coords, dtype="<i4").tobytes()).hexdigest()


def cache_path(store: FeatureStore, slide_id: str, radius: int):
    """Where the table of ``slide_id`` for ``radius`` lives."""
    return store._slide_dir(slide_id) / f"neighbours_r{radius}.npz"


def _read_cached(path, n: int, k: int, step: int, digest: str) -> np.ndarray | None:
    """The cached table if present and fresh, else None (a damaged file counts as absent: it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["coords_sha1"]) != digest or int(z["step"]) != step:
                return None
            table = z["neighbours"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # any damage: rebuild
        return None
    return table if table.shape == (n, k) and table.dtype == np.int32 else None


def slide_neighbours(store: FeatureStore, slide_id: str, radius: int, coords: np.ndarray | None = None) -> np.ndarray:
    """``int32 [N, K]`` stencil neighbours of one slide (local rows), from the cache or built and cached.

    Args:
        coords: the slide's coordinates when the caller has read them already.

    Raises:
        StoreError / ValueError: the slide has no coordinates, or two patches fall in one lattice cell.
    """
    from .store import StoreError

    if coords is None:
        coords = store.read_coords(slide_id)
    if coords is None:
        raise StoreError(f"slide {slide_id!r}: no patch coordinates in the store; spatial methods (srmil) need "
                         "them (re-ingest with coordinates)")
    try:
        step = patch_stride(coords, store.slide_attrs(slide_id).get("patch_size_level0"))
    except ValueError as exc:
        raise StoreError(f"slide {slide_id!r}: {exc}") from None
    digest = coords_digest(coords)
    key = (str(store.path), slide_id, radius)
    cached = _memory.get(key)
    if cached is not None and cached[:2] == (digest, step):
        _memory.move_to_end(key)
        return cached[2]
    path = cache_path(store, slide_id, radius)
    table = _read_cached(path, len(coords), n_slots(radius), step, digest)
    if table is not None:
        return table
    c = torch.from_numpy(np.asarray(coords, dtype=np.int64))
    table = grid_neighbours(c, torch.tensor([0, len(coords)]), radius, step, ids=[slide_id]).numpy().astype(np.int32)
    if os.access(path.parent, os.W_OK):
        with atomic_target(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, neighbours=table, step=np.int64(step), coords_sha1=np.str_(digest))
    else:
        if str(store.path) not in _warned:
            _warned.add(str(store.path))
            warnings.warn(f"{store.path}: not writable; neighbour tables are kept in memory for this run only",
                          RuntimeWarning, stacklevel=2)
        _memory[key] = (digest, step, table)
        if len(_memory) > MEMORY_CACHE_SLIDES:
            _memory.popitem(last=False)
    return table

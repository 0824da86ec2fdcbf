"""The cohort cache (``data.cache``): slides kept in memory after their first read, so epochs after the first
never touch the disk.

Tiers:

- ``host``: features as stored (fp16 or fp32), coordinates and neighbour tables in host memory (the loader packs
  and, for a GPU, pins each step from there);
- ``device``: the same resident on the GPU: each step is then packed on the GPU, without a host-to-device copy;
- ``auto``: ``device`` when training on CUDA and the cohort fits, else ``host`` when it fits, else no cache;
- ``none``: every step reads its slides from the store.

What fits: the bytes the cached slides need (:func:`cohort_bytes`) against 80% of the host memory available now
(``MemAvailable``) for ``host``, and half of the GPU's free memory (the rest is left to the model's activations)
for ``device``. ``host`` or ``device`` that does not fit is an error that states both figures, before any
training. Sizes for orientation: a cohort of 1,000 slides of median 8k instances x 1024 in fp16 is ~16 GB; half
of an 80 GB GPU holds ~2,400 such slides.
"""
from __future__ import annotations

import os
import threading
from typing import Literal

import numpy as np
import torch

from .store import FeatureStore

__all__ = ["CacheTier", "CohortCache", "available_host_bytes", "cohort_bytes", "open_cache"]

CacheTier = Literal["none", "host", "device", "auto"]
HOST_SHARE = 0.8
"""Share of the host memory available at start that the cache may take."""
DEVICE_SHARE = 0.5
"""Share of the GPU's free memory that the cache may take (the rest is for the model and its activations)."""


def available_host_bytes() -> int:
    """Host memory available to this process now: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free
    physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cohort_bytes(store: FeatureStore, slide_ids: list[str], neighbour_radius: int | None = None) -> int:
    """Bytes the cache needs for ``slide_ids``: features as stored, int32 coordinates, and the int32 neighbour
    tables (``(2r + 1)^2 - 1`` slots per instance) when a radius is given."""
    per_instance = 2 * 4 + (0 if neighbour_radius is None else ((2 * neighbour_radius + 1) ** 2 - 1) * 4)
    return sum(store.feature_nbytes(s) for s in slide_ids) + int(store.sizes(slide_ids).sum()) * per_instance


class CohortCache:
    """Slides kept after their first read: ``get(store, slide_id, neighbour_radius)`` returns ``(features [N, D]
    as stored, coords [N, 2] int32 or None, neighbour table or None)`` as tensors on the cache's device. Safe to
    fill from the loader's reader thread."""

    def __init__(self, tier: Literal["host", "device"], device: torch.device | None = None) -> None:
        if tier == "device" and (device is None or device.type != "cuda"):
            raise ValueError(f"data.cache=device keeps the cohort on a CUDA device; this run trains on {device}")
        self.tier, self.device = tier, device if tier == "device" else torch.device("cpu")
        self._slides: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # slides read from the store (a hit costs none)

    def __len__(self) -> int:
        return len(self._slides)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for entry in self._slides.values() for t in entry if t is not None)

    def _keep(self, array: np.ndarray | None) -> torch.Tensor | None:
        if array is None:
            return None
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(self.device) if self.tier == "device" else tensor

    def get(self, store: FeatureStore, slide_id: str, neighbour_radius: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The slide's ``(features, coords, neighbour table)``, read from ``store`` on the first request only."""
        with self._lock:
            entry = self._slides.get(slide_id)
        if entry is not None and (neighbour_radius is None or entry[2] is not None):
            return entry
        from .neighbours import slide_neighbours

        features, coords = store.read(slide_id)
        table = None if neighbour_radius is None else slide_neighbours(store, slide_id, neighbour_radius, coords)
        entry = (self._keep(features), self._keep(coords), self._keep(table))
        with self._lock:
            self._slides[slide_id] = entry
            self.reads += 1
        return entry


def open_cache(tier: CacheTier, store: FeatureStore, slide_ids: list[str], device: torch.device,
               neighbour_radius: int | None = None) -> CohortCache | None:
    """The cache of ``tier`` for ``slide_ids`` (None for ``none``, or for ``auto`` when nothing fits); ``host`` or
    ``device`` that does not fit raises ``ValueError`` stating the need and the room."""
    if tier == "none":
        return None
    need = cohort_bytes(store, slide_ids, neighbour_radius)
    gib = 2**30
    fits_device = False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        device_room = int(DEVICE_SHARE * free)
        fits_device = need <= device_room
        if tier == "device" and not fits_device:
            raise ValueError(f"data.cache=device: the {len(slide_ids)} slides need {need / gib:.2f} GiB; "
                             f"{DEVICE_SHARE:.0%} of the GPU's free {free / gib:.2f} GiB is {device_room / gib:.2f} "
                             "GiB. Use data.cache=host or auto")
    if tier == "device" or (tier == "auto" and fits_device):
        return CohortCache("device", device)
    host_room = int(HOST_SHARE * available_host_bytes())
    if need <= host_room:
        return CohortCache("host")
    if tier == "host":
        raise ValueError(f"data.cache=host: the {len(slide_ids)} slides need {need / gib:.2f} GiB; "
                         f"{HOST_SHARE:.0%} of the host memory available now is {host_room / gib:.2f} GiB. "
                         "Use data.cache=none or auto")
    return None

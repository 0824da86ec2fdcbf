"""Host-to-device transfer of batches on a side stream, so that the copy of step i+1 overlaps step i's compute.

Copied on the compute stream, as ``bags.to(device, non_blocking=True)`` alone does, the next step's features queue
behind every kernel of the current step: the GPU computes, then copies, then computes. On a side stream the copy
starts as soon as the host hands the batch over (from pinned memory: :class:`fastmil.data.BagLoader` pins when
training on a GPU), while the current step's kernels still run; the compute stream waits for the copy only where
the next step begins. For a 100k x 1024 bf16 bag (200 MB) over PCIe 4 (~25 GB/s) that is ~8 ms per step taken off
the critical path, of the same order as the step's compute on an H100.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..bags import Bags

__all__ = ["batch_tensors", "device_batches"]


def batch_tensors(bags: Bags) -> list[torch.Tensor]:
    """The tensors a :class:`Bags` carries on its device (features, offsets and, when present, coords, labels and
    the neighbour table; not the host copy of the offsets)."""
    candidates = (bags.features, bags.offsets, bags.coords, bags.labels, bags.neighbours)
    return [t for t in candidates if t is not None]


def device_batches(batches: Iterable[Bags], device: torch.device) -> Iterator[Bags]:
    """Yield each batch of ``batches`` on ``device``.

    On CUDA the copy is issued on one side stream per call and the current (compute) stream is made to wait for it
    before the batch is yielded; every copied tensor is marked as used by the compute stream (``record_stream``),
    so the caching allocator does not hand its memory to the side stream's next copy while kernels still read it.
    Batches already on the device pass through. On other devices this is ``bags.to(device)``.
    """
    if device.type != "cuda":
        for bags in batches:
            yield bags.to(device)
        return
    side = torch.cuda.Stream(device)
    for bags in batches:
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            moved = bags.to(device, non_blocking=True)
        compute.wait_stream(side)
        for tensor in batch_tensors(moved):
            tensor.record_stream(compute)
        yield moved

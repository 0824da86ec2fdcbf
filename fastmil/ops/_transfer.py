"""The one host-to-device copy point of the ops: the small index tables they build on the host (tile tables) reach
the device through :func:`to_device`, as one asynchronous copy each, never a blocking one (a blocking copy is a copy
plus a stream synchronisation, which a training step must not issue). Tests count the copies a step makes by
patching this function."""
from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, same dtype and shape.

    CPU: ``host`` itself (no copy). CUDA: a pinned staging copy, then one ``non_blocking`` copy on the current
    stream; the caching host allocator keeps the staging block alive until that copy has run, so the host may
    drop it at once. Other devices: a plain copy."""
    if host.device.type != "cpu":
        raise ValueError(f"to_device copies host tensors; got one on {host.device}")
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)

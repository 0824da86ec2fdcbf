"""Exponential moving averages of parameters (momentum teachers), as fused foreach updates."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], momentum: float,
                applied: torch.Tensor | None = None) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, elementwise, for every pair of tensors, in
    three fused multi-tensor kernels (no Python loop over parameters). The result is bitwise the expression
    ``momentum * t + (1 - momentum) * s`` evaluated in the tensors' dtype.

    ``applied`` (0-dim bool tensor on the tensors' device, see ``StepContext.step_applied``): where False the
    targets stay bit for bit (momentum 1, weight 0), decided on the device without a host synchronisation; the
    two factors are then fp32 tensors holding the same fp32 values as the Python scalars."""
    if len(target) != len(source):
        raise ValueError(f"ema_update_: {len(target)} target tensors for {len(source)} source tensors")
    if not target:
        return
    keep: float | torch.Tensor = momentum
    take: float | torch.Tensor = 1.0 - momentum
    if applied is not None:
        keep = torch.where(applied, momentum, 1.0).to(torch.float32)
        take = applied.to(torch.float32) * (1.0 - momentum)
    scaled = torch._foreach_mul(list(source), take)
    torch._foreach_mul_(list(target), keep)
    torch._foreach_add_(list(target), scaled)

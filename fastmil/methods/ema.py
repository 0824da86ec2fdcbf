"""Exponential moving averages of parameters (momentum teachers), as fused foreach updates."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, elementwise, for every pair of tensors, in
    three fused multi-tensor kernels (no Python loop over parameters). The result is bitwise the expression
    ``momentum * t + (1 - momentum) * s`` evaluated in the tensors' dtype."""
    if len(target) != len(source):
        raise ValueError(f"ema_update_: {len(target)} target tensors for {len(source)} source tensors")
    if not target:
        return
    scaled = torch._foreach_mul(list(source), 1.0 - momentum)
    torch._foreach_mul_(list(target), momentum)
    torch._foreach_add_(list(target), scaled)

"""``no_autocast``: run the forward/backward of a torch-path autograd Function with autocast off."""
from __future__ import annotations

import functools

import torch

__all__ = ["no_autocast"]


def no_autocast(fn):
    """Decorate an autograd Function's ``forward``/``backward`` so they run with autocast off: their GEMMs then
    take the dtypes the op chose (fp32 accumulation, preallocated fp32/fp64 outputs) under a caller's
    ``torch.autocast`` too, instead of autocast's mix of bf16 and fp32 operands."""

    def wrapper(ctx, *args):
        # forward's first argument is a tensor; in backward every incoming gradient may be None, the saved ones not
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None) or ctx.saved_tensors[0].device
        with torch.autocast(device.type, enabled=False):
            return fn(ctx, *args)

    return functools.wraps(fn)(wrapper)

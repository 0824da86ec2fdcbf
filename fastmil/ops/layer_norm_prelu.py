"""``layer_norm_prelu``: ``PReLU(LayerNorm(x))`` that keeps only ``x`` and the row statistics for backward.

The two-module chain keeps the LayerNorm output (PReLU's input) besides ``x``: one extra ``N x C`` tensor per layer
for the whole backward. This op recomputes the normalised rows from ``x``, the per-row mean and reciprocal standard
deviation (``[N]`` each) in backward, then applies PReLU's and LayerNorm's gradients (``aten``'s own LayerNorm
backward). Values and gradients equal ``F.prelu(F.layer_norm(x, ...), a)`` up to rounding. Torch code on every
device; the graph-attention layers use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["layer_norm_prelu"]


class _LayerNormPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, slope, eps: float):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        out = F.prelu(y, slope)
        ctx.save_for_backward(x, weight, bias, slope, mean, rstd)
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_out):
        x, weight, bias, slope, mean, rstd = ctx.saved_tensors
        # two N x C temporaries at a time: the recomputed LayerNorm output, then the PReLU input gradient
        y = (x - mean).mul_(rstd)
        if weight is not None:
            y.mul_(weight).add_(bias)
        negative = y <= 0
        grad_slope = None
        if ctx.needs_input_grad[3]:
            grad_slope = y.mul_(grad_out).masked_fill_(~negative, 0.0).sum().reshape(slope.shape)
        del y
        grad_y = negative.to(grad_out.dtype).mul_(slope - 1.0).add_(1.0).mul_(grad_out)
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, [x.shape[-1]], mean, rstd, weight, bias,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, grad_slope, None


def layer_norm_prelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor,
                     eps: float = 1e-5) -> torch.Tensor:
    """``PReLU(LayerNorm(x))`` over the last dim of ``x [N, C]``: LayerNorm ``weight``/``bias [C]``, one shared
    PReLU ``slope [1]``."""
    if x.dim() != 2 or weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],) or slope.numel() != 1:
        raise ValueError(f"layer_norm_prelu: x must be [N, C] with weight/bias [C] and one slope, got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(slope.shape)}")
    return _LayerNormPReLU.apply(x, weight, bias, slope, eps)

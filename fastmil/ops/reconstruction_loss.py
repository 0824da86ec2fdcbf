"""``reconstruction_loss``: SRMIL's scaled cosine error on the masked rows.

Contract (DESIGN.md section 3): ``reconstruction_loss(pred [N, D], target [N, D], mask [N], alpha=1.0) -> scalar``,
the mean over rows with ``mask`` True of ``(1 - cos(pred_i, target_i))^alpha`` (``alpha >= 1`` down-weights rows
that are already well reconstructed, as in masked graph autoencoders). Computed in fp32 (fp64 for fp64 inputs);
zero (with a zero gradient) when no row is masked. Each norm is floored at 1e-8, so an all-zero row has cosine 0,
not NaN. Memory: row dot products by ``einsum`` and a hand backward, so the only ``N x D`` tensor it creates is
the gradient it returns (``F.cosine_similarity`` and its autograd make several).
"""
from __future__ import annotations

import torch

__all__ = ["reconstruction_loss"]


class _ScaledCosineError(torch.autograd.Function):
    """Per-row ``(1 - cos(p_i, t_i))^alpha`` masked mean, with row dot products by ``einsum`` (no ``N x D``
    temporaries) and a hand backward that writes ``grad_pred`` (the one ``N x D`` tensor it must return) directly."""

    @staticmethod
    def forward(ctx, pred, target, mask, alpha: float):
        acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
        p, t = pred.to(acc), target.to(acc)
        dot = torch.einsum("nd,nd->n", p, t)
        p_norm = torch.einsum("nd,nd->n", p, p).sqrt().clamp_min(EPS)
        t_norm = torch.einsum("nd,nd->n", t, t).sqrt().clamp_min(EPS)
        cos = dot / (p_norm * t_norm)
        error = (1.0 - cos).clamp_min(0.0)
        count = mask.sum().clamp_min(1).to(acc)
        ctx.save_for_backward(pred, target, mask, cos, p_norm, t_norm, count)
        ctx.alpha = alpha
        return (torch.where(mask, error.pow(alpha), torch.zeros_like(error))).sum() / count

    @staticmethod
    def backward(ctx, grad):
        pred, target, mask, cos, p_norm, t_norm, count = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        alpha = ctx.alpha
        error = (1.0 - cos).clamp_min(0.0)
        # d/dcos of (1 - cos)^alpha, zero outside the mask (and where the error is clamped)
        d_cos = -alpha * error.pow(alpha - 1.0) if alpha != 1.0 else -torch.ones_like(error)
        d_cos = torch.where(mask & (cos < 1.0), d_cos, torch.zeros_like(d_cos)) * (grad / count)
        # dcos/dp = t / (|p| |t|) - cos p / |p|^2
        a = d_cos / (p_norm * t_norm)
        b = -d_cos * cos / (p_norm * p_norm)
        grad_pred = torch.addcmul(b[:, None] * pred.to(cos.dtype), a[:, None], target.to(cos.dtype))
        return grad_pred.to(pred.dtype), None, None, None


EPS = 1e-8
"""Floor of each row norm: an all-zero row has cosine 0, not NaN."""


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        alpha: float = 1.0) -> torch.Tensor:
    """Mean of ``(1 - cos(pred_i, target_i))^alpha`` over the rows where ``mask`` is True (differentiable in
    ``pred``; ``target`` is data)."""
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"reconstruction_loss: pred and target must both be [N, D], got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if mask.dtype != torch.bool or mask.shape != (pred.shape[0],):
        raise ValueError(f"reconstruction_loss: mask must be bool [N] = [{pred.shape[0]}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not alpha > 0:
        raise ValueError(f"reconstruction_loss: alpha must be > 0, got {alpha}")
    return _ScaledCosineError.apply(pred, target.detach(), mask, float(alpha))

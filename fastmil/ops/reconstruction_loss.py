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
from torch.autograd.function import once_differentiable

__all__ = ["projected_reconstruction_loss", "reconstruction_loss"]

CHUNK_ROWS = 4096
"""Rows per chunk of :func:`projected_reconstruction_loss` (its only ``[rows, D]`` temporaries)."""


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
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
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


def _row_stats(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cosine, ``|p|`` and ``|t|`` (norms floored at ``EPS``) of two ``[rows, D]`` blocks."""
    dot = torch.einsum("nd,nd->n", p, t)
    p_norm = torch.einsum("nd,nd->n", p, p).sqrt().clamp_min(EPS)
    t_norm = torch.einsum("nd,nd->n", t, t).sqrt().clamp_min(EPS)
    return dot / (p_norm * t_norm), p_norm, t_norm


class _ProjectedScaledCosineError(torch.autograd.Function):
    """``(1 - cos(h W^T + b, t))^alpha`` masked mean, the projection recomputed chunk by chunk in backward: the
    ``[N, D]`` prediction and its gradient never exist as whole tensors."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, mask, alpha: float, chunk: int):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        w, b = weight.to(acc), bias.to(acc)
        cos = torch.empty(h.shape[0], dtype=acc, device=h.device)
        p_norm, t_norm = torch.empty_like(cos), torch.empty_like(cos)
        for lo in range(0, h.shape[0], chunk):
            hi = min(lo + chunk, h.shape[0])
            pred = torch.addmm(b, h[lo:hi].to(acc), w.T)
            cos[lo:hi], p_norm[lo:hi], t_norm[lo:hi] = _row_stats(pred, target[lo:hi].to(acc))
        count = mask.sum().clamp_min(1).to(acc)
        error = (1.0 - cos).clamp_min(0.0)
        ctx.save_for_backward(h, weight, bias, target, mask, cos, p_norm, t_norm, count)
        ctx.alpha, ctx.chunk = alpha, chunk
        return torch.where(mask, error.pow(alpha), torch.zeros_like(error)).sum() / count

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad):
        h, weight, bias, target, mask, cos, p_norm, t_norm, count = ctx.saved_tensors
        alpha, acc = ctx.alpha, cos.dtype
        error = (1.0 - cos).clamp_min(0.0)
        d_cos = -alpha * error.pow(alpha - 1.0) if alpha != 1.0 else -torch.ones_like(error)
        d_cos = torch.where(mask & (cos < 1.0), d_cos, torch.zeros_like(d_cos)) * (grad / count)
        coef_t = d_cos / (p_norm * t_norm)  # dcos/dp = t / (|p| |t|) - cos p / |p|^2
        coef_p = -d_cos * cos / (p_norm * p_norm)
        w, b = weight.to(acc), bias.to(acc)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w)
        grad_b = torch.zeros_like(b)
        for lo in range(0, h.shape[0], ctx.chunk):
            hi = min(lo + ctx.chunk, h.shape[0])
            hc = h[lo:hi].to(acc)
            grad_pred = torch.addmm(b, hc, w.T).mul_(coef_p[lo:hi, None])
            grad_pred.addcmul_(coef_t[lo:hi, None], target[lo:hi].to(acc))
            if grad_h is not None:
                grad_h[lo:hi] = (grad_pred @ w).to(h.dtype)
            grad_w.addmm_(grad_pred.T, hc)
            grad_b += grad_pred.sum(0)
        return grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype), None, None, None, None


def projected_reconstruction_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                                  mask: torch.Tensor, alpha: float = 1.0, *, chunk_rows: int = CHUNK_ROWS
                                  ) -> torch.Tensor:
    """``reconstruction_loss(h @ weight.T + bias, target, mask, alpha)`` without forming the prediction: ``h [N, E]``,
    ``weight [D, E]``, ``bias [D]``, ``target [N, D]``. The projection runs in chunks of ``chunk_rows`` rows,
    forward and again in backward, so the memory it takes beyond its inputs is ``O(chunk_rows x D + N)``
    (SRMIL's decoder ends in such a projection back to the feature width)."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"projected_reconstruction_loss: need h [N, E], weight [D, E], bias [D]; got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}")
    if target.shape != (h.shape[0], weight.shape[0]):
        raise ValueError(f"projected_reconstruction_loss: target must be [N, D] = {(h.shape[0], weight.shape[0])}, "
                         f"got {tuple(target.shape)}")
    if mask.dtype != torch.bool or mask.shape != (h.shape[0],):
        raise ValueError(f"projected_reconstruction_loss: mask must be bool [N] = [{h.shape[0]}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not alpha > 0 or chunk_rows < 1:
        raise ValueError(f"projected_reconstruction_loss: need alpha > 0 and chunk_rows >= 1, got {alpha}, "
                         f"{chunk_rows}")
    return _ProjectedScaledCosineError.apply(h, weight, bias, target.detach(), mask, float(alpha), int(chunk_rows))

"""``attention_pool``: per-bag softmax of scores over unmasked instances, then the weighted sum of values.

Contract (DESIGN.md section 3)::

    attention_pool(scores [N] or [N, H], values [N, D], offsets int64 [B+1], mask bool [N] | None)
        -> pooled [B, D] (or [B, H, D]), weights [N] (or [N, H])

weights are 0 on masked instances; a bag whose instances are all masked (or that is empty) pools to zeros
with zero weights, never NaN. Differentiable in ``scores`` and ``values``. Softmax and accumulation run in
fp32 whatever the input dtype; outputs are fp32 (``pooled``, ``weights``) so that callers under autocast
keep full precision in the reduction.

The torch path is an ``autograd.Function`` that keeps only ``weights [N, H]`` (plus its inputs) for backward
and never materialises an ``N x D`` product of weights and values: pooling and both gradients are per-bag
matrix products. The Triton kernels (``fastmil.kernels``) slot in behind the same Function signature.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend

__all__ = ["attention_pool", "attention_pool_reference"]


def _check_inputs(scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None) -> None:
    if scores.dim() not in (1, 2):
        raise ValueError(f"attention_pool: scores must be [N] or [N, H], got shape {tuple(scores.shape)}")
    if values.dim() != 2:
        raise ValueError(f"attention_pool: values must be [N, D], got shape {tuple(values.shape)}")
    if scores.shape[0] != values.shape[0]:
        raise ValueError(f"attention_pool: {scores.shape[0]} scores for {values.shape[0]} values")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 2:
        raise ValueError("attention_pool: offsets must be int64 [B+1] with B >= 1")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (values.shape[0],)):
        raise ValueError(f"attention_pool: mask must be bool [N] = [{values.shape[0]}], got {mask.dtype} {tuple(mask.shape)}")


def attention_pool_reference(
    scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent, obviously-correct reference: a Python loop over bags in the inputs' dtype (use fp64)."""
    _check_inputs(scores, values, offsets, mask)
    squeeze = scores.dim() == 1
    s = scores[:, None] if squeeze else scores
    n_bags, heads, dim = offsets.numel() - 1, s.shape[1], values.shape[1]
    pooled = values.new_zeros(n_bags, heads, dim, dtype=s.dtype)
    weights = torch.zeros_like(s)
    bounds = offsets.tolist()
    for b in range(n_bags):
        lo, hi = bounds[b], bounds[b + 1]
        keep = torch.ones(hi - lo, dtype=torch.bool, device=s.device) if mask is None else mask[lo:hi]
        if not bool(keep.any()):
            continue
        w = torch.softmax(s[lo:hi][keep], dim=0)  # [n_keep, H]
        idx = torch.nonzero(keep).flatten() + lo
        weights[idx] = w
        pooled[b] = w.T @ values[idx].to(s.dtype)
    if squeeze:
        return pooled[:, 0], weights[:, 0]
    return pooled, weights


def _bag_index(offsets: torch.Tensor, n: int) -> torch.Tensor:
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=offsets.device), sizes, output_size=n)


def _segment_softmax(scores: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 per-bag softmax of ``scores [N, H]`` over unmasked rows; 0 on masked rows and all-masked bags."""
    s = scores.float()
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf"))
    n, heads = s.shape
    n_bags = offsets.numel() - 1
    bag = _bag_index(offsets, n)
    bag_h = bag[:, None].expand(n, heads)
    bag_max = s.new_full((n_bags, heads), float("-inf")).scatter_reduce(0, bag_h, s, reduce="amax", include_self=True)
    bag_max = torch.where(torch.isfinite(bag_max), bag_max, torch.zeros_like(bag_max))
    e = torch.exp(s - bag_max[bag])  # exp(-inf) = 0 on masked rows
    denom = s.new_zeros(n_bags, heads).index_add_(0, bag, e)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return e / safe[bag]


class _AttentionPoolTorch(torch.autograd.Function):
    """Torch path. Saves ``weights [N, H]`` fp32 and the inputs; per-bag GEMMs, no ``N x D`` temporaries."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None):
        weights = _segment_softmax(scores, offsets, mask)  # [N, H] fp32
        n_bags, heads, dim = offsets.numel() - 1, weights.shape[1], values.shape[1]
        pooled = weights.new_zeros(n_bags, heads, dim)
        bounds = offsets.tolist()
        for b in range(n_bags):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:
                torch.matmul(weights[lo:hi].T, values[lo:hi].float(), out=pooled[b])
        ctx.save_for_backward(weights, values, offsets)
        ctx.scores_dtype = scores.dtype
        return pooled, weights

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor, grad_weights: torch.Tensor | None):
        weights, values, offsets = ctx.saved_tensors
        bounds = offsets.tolist()
        need_scores, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_values = torch.empty_like(values) if need_values else None
        # dL/dw_i = <v_i, g_b> (+ any gradient flowing into the returned weights)
        grad_w = torch.zeros_like(weights) if grad_weights is None else grad_weights.float().clone()
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            if hi == lo:
                continue
            g = grad_pooled[b].float()  # [H, D]
            v = values[lo:hi].float()
            if need_scores:
                grad_w[lo:hi] += v @ g.T
            if need_values:
                grad_values[lo:hi] = (weights[lo:hi] @ g).to(values.dtype)
        grad_scores = None
        if need_scores:
            bag = _bag_index(offsets, weights.shape[0])
            wg = weights * grad_w
            per_bag = wg.new_zeros(len(bounds) - 1, weights.shape[1]).index_add_(0, bag, wg)
            grad_scores = (wg - weights * per_bag[bag]).to(ctx.scores_dtype)
        return grad_scores, grad_values, None, None


def attention_pool(
    scores: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention pooling over packed ragged bags (see the module docstring for the contract)."""
    _check_inputs(scores, values, offsets, mask)
    resolve_backend(backend, "attention_pool", values.device, has_triton=False)
    squeeze = scores.dim() == 1
    pooled, weights = _AttentionPoolTorch.apply(scores[:, None] if squeeze else scores, values, offsets, mask)
    if squeeze:
        return pooled[:, 0], weights[:, 0]
    return pooled, weights

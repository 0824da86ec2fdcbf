"""``attention_pool``: per-bag softmax of scores over unmasked instances, then the weighted sum of values.

Contract (DESIGN.md section 3)::

    attention_pool(scores [N] or [N, H], values [N, D], offsets int64 [B+1], mask bool [N] | None)
        -> pooled [B, D] (or [B, H, D]), weights [N] (or [N, H])

weights are 0 on masked instances; a bag whose instances are all masked (or that is empty) pools to zeros
with zero weights, never NaN. Differentiable in ``scores`` and ``values``. Softmax and accumulation run in
fp32 whatever the input dtype, and the outputs are fp32, so that callers under autocast keep full precision in
the reduction (fp64 inputs on the torch path compute and return fp64).

The torch path is an ``autograd.Function`` that keeps only ``weights [N, H]`` (plus its inputs) for backward
and never materialises an ``N x D`` product of weights and values: pooling and both gradients are per-bag
matrix products. The Triton path (``fastmil.kernels.attention_pool``) runs one program per tile of a bag,
merges the tiles of each bag (flash-decoding) and keeps ``weights`` for backward. Inputs of any strides are
accepted: the Triton path passes every tensor in a checked layout (``kernels._launch.canonical``, a copy only
for unusual views) and writes every output with its own strides.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels._launch import canonical
from ..kernels.limits import MAX_HEADS
from ._backend import resolve_backend
from ._segments import bag_grad_dot, bag_index, lse_grad_rows, pool_per_bag, segment_softmax, segment_sum
from ._tiles import build_tiles, finish_tiled_pool, host_offsets
from ._triton import HAS_TRITON, check_triton_inputs

__all__ = ["MAX_HEADS", "attention_pool", "attention_pool_reference"]


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
        raise ValueError(
            f"attention_pool: mask must be bool [N] = [{values.shape[0]}], got {mask.dtype} {tuple(mask.shape)}"
        )


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


class _AttentionPoolTorch(torch.autograd.Function):
    """Torch path. Saves ``weights [N, H]`` and the inputs; per-bag GEMMs, no ``N x D`` temporaries."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None,
                offsets_cpu: torch.Tensor):
        bounds = offsets_cpu.tolist()
        weights, lse = segment_softmax(scores, offsets, mask, bounds)  # [N, H], [B, H] fp32 (fp64 for fp64 scores)
        pooled = pool_per_bag(weights, values, offsets, bounds)
        ctx.save_for_backward(weights, values, offsets)
        ctx.bounds, ctx.scores_dtype = bounds, scores.dtype
        ctx.set_materialize_grads(False)
        return pooled, weights, lse

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor | None, grad_weights: torch.Tensor | None,
                 grad_lse: torch.Tensor | None):
        weights, values, offsets = ctx.saved_tensors
        bounds = ctx.bounds
        need_scores, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_pooled is None:
            grad_pooled = weights.new_zeros(len(bounds) - 1, weights.shape[1], values.shape[1])
        grad_values = torch.empty(values.shape, dtype=values.dtype, device=values.device) if need_values else None
        # dL/dw_i = <v_i, g_b> (+ any gradient flowing into the returned weights)
        grad_w = torch.zeros_like(weights) if grad_weights is None else grad_weights.to(weights.dtype).clone()
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            if hi == lo:
                continue
            g = grad_pooled[b].to(weights.dtype)  # [H, D]
            v = values[lo:hi].to(weights.dtype)
            if need_scores:
                grad_w[lo:hi] += v @ g.T
            if need_values:
                grad_values[lo:hi] = (weights[lo:hi] @ g).to(values.dtype)
        grad_scores = None
        if need_scores:
            bag = bag_index(offsets, weights.shape[0])
            wg = weights * grad_w
            per_bag = segment_sum(wg, offsets)
            grad_s = wg - weights * per_bag[bag]
            if grad_lse is not None:  # d lse_b / d s_i = a_i
                grad_s = grad_s + weights * grad_lse.to(weights.dtype)[bag]
            grad_scores = grad_s.to(ctx.scores_dtype)
        return grad_scores, grad_values, None, None, None


class _AttentionPoolTriton(torch.autograd.Function):
    """Triton path: tile kernel + merge + weight normalisation forward, one tile kernel backward.

    Saves ``weights [N, H]`` fp32, ``pooled [B, H, D]`` fp32, the values and the tile table."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None,
                offsets_cpu: torch.Tensor):
        from ..kernels import attention_pool as k

        n, heads = scores.shape
        dim = values.shape[1]
        n_bags, dev = offsets.numel() - 1, values.device
        ctx.scores_dtype = scores.dtype
        scores = canonical(scores.float(), strided=True)  # read once by two kernels; fp32 keeps one specialisation
        values = canonical(values, strided=True)
        mask = None if mask is None else canonical(mask)
        cfg = k.pool_config(heads, values.dtype)
        tiles = build_tiles(offsets_cpu, n, cfg.block_n, dev)
        pooled = torch.zeros(n_bags, heads, dim, dtype=torch.float32, device=dev)
        lse = torch.full((n_bags, heads), float("inf"), dtype=torch.float32, device=dev)
        weights = torch.zeros(n, heads, dtype=torch.float32, device=dev)
        if tiles.n_tiles > 0:
            tile_max = torch.empty(tiles.n_tiles, heads, dtype=torch.float32, device=dev)
            tile_sum = torch.empty_like(tile_max)
            partial = torch.empty(tiles.n_tiles, heads, dim, dtype=torch.float32, device=dev)
            k.pool_fwd_launch(scores, values, mask, tiles.tile_start, tiles.tile_end, tile_max, tile_sum, partial)()
            finish_tiled_pool(tile_max, tile_sum, partial, tiles, scores, mask, pooled, lse, weights, cfg.block_n)
        ctx.save_for_backward(values, weights, pooled, offsets, tiles.tile_bag, tiles.tile_start, tiles.tile_end)
        ctx.set_materialize_grads(False)
        return pooled, weights, torch.where(torch.isposinf(lse), -lse, lse)  # log 0 = -inf for empty bags

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_pooled: torch.Tensor | None, grad_weights: torch.Tensor | None,
                 grad_lse: torch.Tensor | None):
        from ..kernels import attention_pool as k

        values, weights, pooled, offsets, tile_bag, tile_start, tile_end = ctx.saved_tensors
        n, heads = weights.shape
        g = canonical(torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.float())
        bag_dot = bag_grad_dot(g, pooled, weights, grad_weights, offsets)
        grad_weights = lse_grad_rows(grad_weights, grad_lse, offsets, n)
        if grad_weights is not None:
            grad_weights = canonical(grad_weights.float())
        grad_scores = torch.zeros(n, heads, dtype=torch.float32, device=values.device)
        grad_values = (torch.empty(values.shape, dtype=values.dtype, device=values.device)
                       if ctx.needs_input_grad[1] else None)
        k.pool_bwd_launch(values, weights, g, bag_dot, grad_weights, tile_bag, tile_start, tile_end, grad_scores,
                          grad_values)()
        return grad_scores.to(ctx.scores_dtype), grad_values, None, None, None


def attention_pool(
    scores: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    offsets_cpu: torch.Tensor | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Masked attention pooling over packed ragged bags (see the module docstring for the contract).

    ``backend``: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``; ``FASTMIL_BACKEND``
    overrides ``"auto"``. The Triton path supports up to ``MAX_HEADS`` = 32 heads and ``D >= 2``.
    ``offsets_cpu``: the host copy of ``offsets`` when the caller has one (``Bags.offsets_cpu``); without it the
    op copies ``offsets`` to the host once (a synchronisation on a GPU). ``return_lse``: also return the
    per-bag log-sum-exp of the scores over unmasked rows, ``[B]`` (or ``[B, H]``), differentiable, ``-inf`` for a
    bag with nothing unmasked; it lets a caller merge this pooling with softmax mass from elsewhere (extra
    tokens) without concatenating the bag.
    """
    _check_inputs(scores, values, offsets, mask)
    chosen = resolve_backend(backend, "attention_pool", values.device, has_triton=HAS_TRITON)
    squeeze = scores.dim() == 1
    s = scores[:, None] if squeeze else scores
    host = host_offsets(offsets, offsets_cpu)
    if chosen == "triton":
        check_triton_inputs("attention_pool", values.dtype, values.shape[1], scores, values, offsets, mask)
        if s.shape[1] > MAX_HEADS:
            raise ValueError(f"attention_pool: the Triton kernels support at most {MAX_HEADS} heads, got {s.shape[1]}")
        pooled, weights, lse = _AttentionPoolTriton.apply(s, values, offsets, mask, host)
    else:
        pooled, weights, lse = _AttentionPoolTorch.apply(s, values, offsets, mask, host)
    if squeeze:
        pooled, weights, lse = pooled[:, 0], weights[:, 0], lse[:, 0]
    return (pooled, weights, lse) if return_lse else (pooled, weights)

"""``normalized_attention_pool``: attention pooling of LayerNorm-normalised rows, without forming them.

Contract::

    normalized_attention_pool(x [N, E], directions [E, M], offsets int64 [B+1], mask bool [N] | None,
                              eps=1e-5, offsets_cpu=None)
        -> pooled [B, M, E], weights [N, M]     (fp32; fp64 for fp64 inputs)

    n_i = (x_i - mean(x_i)) / sqrt(var(x_i) + eps)      (LayerNorm without its affine, biased variance)
    weights[:, m] = per-bag softmax over unmasked rows of  n_i . directions[:, m]
    pooled[b, m] = sum_i weights[i, m] n_i

A bag with no unmasked row pools to zeros with zero weights. Differentiable in ``x`` and ``directions``.
This is the core of the global recycle network's implicit keys and values (``fastmil.nn.recycle``): ``M``
columns are the (query, head) pairs, ``directions`` the key projections folded onto the queries.

Cost: the normalised rows ``n`` are never materialised. Forward = one ``[N, E] x [E, M + 1]`` GEMM for the logits
and the row means, one row-reduction pass (the norms), one per-bag ``[M, n] x [n, E]`` GEMM for the pooling.
Backward = one ``x G^T`` GEMM (the weights' gradient), one ``x^T dS`` GEMM (the directions' gradient) and one
``[N, 2M+1] x [2M+1, E]`` GEMM that writes ``grad_x`` with the LayerNorm backward folded in (its per-row mean terms
reduce to ``M``-sized dot products: ``n_i . G_m`` and ``n_i . directions_m`` are already known), then one
``addcmul`` pass. Saved for backward: ``x`` (as fp32: an fp16/bf16 ``x`` is saved as its fp32 copy), ``directions``,
row statistics ``[N]`` and ``weights``/``logits`` ``[N, M]``: nothing else ``N x E``.

Numerics: logits and pooled values are formed as ``(x . u - mean * sum(u)) / sigma``; this loses relative precision
when a row's mean is large against its spread (``|mean| / sigma`` >> 1). Rows of embedded instances (after a
ReLU) have ``mean / sigma`` of order 1.
"""
from __future__ import annotations

import torch

from ._autocast import no_autocast
from ._backend import check_torch_only
from ._segments import bag_grad_dot, bag_index, pool_per_bag, segment_softmax
from ._tiles import check_offsets, host_offsets

__all__ = ["normalized_attention_pool", "normalized_attention_pool_reference"]


def _check_inputs(x: torch.Tensor, directions: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None) -> None:
    if x.dim() != 2 or directions.dim() != 2:
        raise ValueError(f"normalized_attention_pool: x must be [N, E] and directions [E, M], got "
                         f"{tuple(x.shape)} and {tuple(directions.shape)}")
    if directions.shape[0] != x.shape[1]:
        raise ValueError(f"normalized_attention_pool: directions has {directions.shape[0]} rows for E = {x.shape[1]}")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 2:
        raise ValueError("normalized_attention_pool: offsets must be int64 [B+1] with B >= 1")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0],)):
        raise ValueError(f"normalized_attention_pool: mask must be bool [N] = [{x.shape[0]}], got "
                         f"{mask.dtype} {tuple(mask.shape)}")


def normalized_attention_pool_reference(
    x: torch.Tensor, directions: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: a loop over bags with ``layer_norm``, ``softmax`` and matmul, in the inputs'
    dtype (use fp64); gradients come from autograd through it."""
    _check_inputs(x, directions, offsets, mask)
    n_bags, m = offsets.numel() - 1, directions.shape[1]
    pooled = x.new_zeros(n_bags, m, x.shape[1])
    weights = x.new_zeros(x.shape[0], m)
    bounds = offsets.tolist()
    for b in range(n_bags):
        lo, hi = bounds[b], bounds[b + 1]
        rows = torch.arange(lo, hi, device=x.device)
        if mask is not None:
            rows = rows[mask[lo:hi]]
        if rows.numel() == 0:
            continue
        normed = torch.nn.functional.layer_norm(x[rows], (x.shape[1],), eps=eps)
        a = torch.softmax(normed @ directions, dim=0)  # [n, M]
        pooled = pooled.index_put((torch.tensor([b], device=x.device),), (a.T @ normed)[None])
        weights = weights.index_put((rows,), a)
    return pooled, weights


class _NormalizedAttentionPool(torch.autograd.Function):
    """See the module docstring; computes in fp32 (fp64 for fp64 ``x``)."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, directions, offsets, mask, eps, bounds):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(acc)
        u = directions.to(acc)
        n_dirs, dim = u.shape[1], x.shape[1]
        # one GEMM F.linear(x, [u^T; 1/E]) gives x . u and, from the row of 1/E, the row means: [N, M + 1]; with u^T
        # as a row-major operand it runs ~1.3x faster here than x @ u, and it saves the separate mean pass
        projected = torch.nn.functional.linear(x, torch.cat([u.T, u.new_full((1, dim), 1.0 / dim)]))
        mean = projected[:, n_dirs].clone()  # [N], saved for backward without the [N, M + 1] buffer
        # var = E[x^2] - mean^2 (torch.var_mean's row reduction runs ~40x slower here); its cancellation is the one
        # noted in the module docstring, clamped at 0
        var = (torch.linalg.vector_norm(x, dim=1).square_().div_(dim) - mean * mean).clamp_min_(0.0)
        inv_sigma = torch.rsqrt(var + eps)
        # [N, M] = n @ u = (x . u - mean sum(u)) / sigma
        logits = torch.addcmul(projected[:, :n_dirs], mean[:, None], u.sum(0), value=-1).mul_(inv_sigma[:, None])
        weights, _ = segment_softmax(logits, offsets, mask, bounds)
        scaled = weights * inv_sigma[:, None]  # pooled = sum_i w_i (x_i - mean_i) / sigma_i
        pooled = pool_per_bag(scaled, x, offsets, bounds)
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:  # sum_i w_i mean_i / sigma_i, per column
                pooled[b] -= (scaled[lo:hi].T @ mean[lo:hi])[:, None]
        ctx.save_for_backward(x, u, offsets, mean, inv_sigma, weights, logits, pooled)
        ctx.bounds, ctx.dtypes = bounds, (x.dtype, directions.dtype)
        ctx.set_materialize_grads(False)
        return pooled, weights

    @staticmethod
    @no_autocast
    def backward(ctx, grad_pooled, grad_weights):
        x, u, offsets, mean, inv_sigma, weights, logits, pooled = ctx.saved_tensors
        bounds = ctx.bounds
        n, dim = x.shape
        m = u.shape[1]
        g = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.to(x.dtype)  # [B, M, E]
        # d L / d w_im = n_i . G_bm (+ grad_weights): the per-bag GEMM x_b G_b^T, corrected by the row mean
        grad_w = torch.empty_like(weights)
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:
                torch.mm(x[lo:hi], g[b].T, out=grad_w[lo:hi])
        bag = bag_index(offsets, n)
        grad_w.sub_(mean[:, None] * g.sum(-1)[bag]).mul_(inv_sigma[:, None])
        n_dot_g = grad_w.clone()  # n_i . G_bm, needed by the LayerNorm backward
        if grad_weights is not None:
            grad_w += grad_weights.to(x.dtype)
        # softmax backward: d L / d logit_im = w_im (grad_w_im - sum_j w_jm grad_w_jm)
        grad_logits = weights * (grad_w - bag_grad_dot(g, pooled, weights, grad_weights, offsets)[bag])
        grad_dirs = None
        if ctx.needs_input_grad[1]:  # sum_i n_i grad_logits_i^T, with n_i = (x_i - mean_i) / sigma_i
            scaled = grad_logits * inv_sigma[:, None]
            # (scaled^T x)^T: the [M, N] x [N, E] product runs ~1.4x faster here than x^T scaled
            grad_dirs = (scaled.T @ x).T - torch.outer(x.new_ones(dim), (scaled * mean[:, None]).sum(0))
            grad_dirs = grad_dirs.to(ctx.dtypes[1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad_n_i = w_i G_b + grad_logits_i u^T; LayerNorm backward:
            # grad_x_i = (grad_n_i - mean_e(grad_n_i) - n_i mean_e(grad_n_i * n_i)) / sigma_i, where
            # mean_e(grad_n_i) = w_i . mean_e(G_b) + grad_logits_i . mean_e(u) and
            # mean_e(grad_n_i * n_i) = (w_i . (n_i . G_b) + grad_logits_i . logits_i) / E: no pass over grad_n.
            c1 = (weights * g.mean(-1)[bag]).sum(1) + grad_logits @ u.mean(0)
            c2 = ((weights * n_dot_g).sum(1) + (grad_logits * logits).sum(1)) / dim
            inv2 = inv_sigma * inv_sigma
            # grad_x = [w/sigma | grad_logits/sigma | shift] @ [G_b; u^T; 1] + (-c2/sigma^2) x
            left = torch.cat([weights * inv_sigma[:, None], grad_logits * inv_sigma[:, None],
                              (mean * c2 * inv2 - c1 * inv_sigma)[:, None]], 1)  # [N, 2M + 1]
            right = torch.cat([g.new_zeros(m, dim), u.T, g.new_ones(1, dim)])  # [2M + 1, E]; rows :M per bag
            grad_x = torch.empty_like(x)
            for b in range(len(bounds) - 1):
                lo, hi = bounds[b], bounds[b + 1]
                if hi > lo:
                    right[:m] = g[b]
                    torch.mm(left[lo:hi], right, out=grad_x[lo:hi])
            grad_x.addcmul_(x, (-c2 * inv2)[:, None])
            grad_x = grad_x.to(ctx.dtypes[0])
        return grad_x, grad_dirs, None, None, None, None


def normalized_attention_pool(
    x: torch.Tensor, directions: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
    eps: float = 1e-5, offsets_cpu: torch.Tensor | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. ``offsets_cpu`` (``offsets`` on the host, as ``Bags`` carries it) avoids a
    device synchronisation; the per-bag GEMMs loop over the bags on the host. A torch-only op (its work is GEMMs):
    ``backend`` may be ``auto`` or ``torch``."""
    check_torch_only(backend, "normalized_attention_pool")
    _check_inputs(x, directions, offsets, mask)
    host = host_offsets(offsets, offsets_cpu)
    check_offsets(host, x.shape[0])
    bounds = host.tolist()
    return _NormalizedAttentionPool.apply(x, directions, offsets, mask, eps, bounds)


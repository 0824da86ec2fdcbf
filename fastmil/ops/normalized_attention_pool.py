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
from torch.autograd.function import once_differentiable

from ._autocast import no_autocast
from ._backend import check_torch_only
from ._segments import bag_grad_dot, pool_per_bag, segment_softmax
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
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_pooled, grad_weights):
        x, u, offsets, mean, inv_sigma, weights, logits, pooled = ctx.saved_tensors
        spans = [(b, lo, hi) for b, (lo, hi) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])) if hi > lo]
        n, dim = x.shape
        m = u.shape[1]
        g = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.to(x.dtype)  # [B, M, E]
        g_sum = g.sum(-1)  # [B, M]
        bag_dot = bag_grad_dot(g, pooled, weights, grad_weights, offsets)  # [B, M]: sum_i w_im (grad w)_im
        # n_i . G_bm = (x_i . G_bm - mean_i sum_e G_bme) / sigma_i: per bag, one GEMM and one rank-1 update (the
        # bag's rows are a slice, its [M] vectors broadcast: no [N, M] gathers of per-bag values)
        n_dot_g = torch.empty_like(weights)  # [N, M]
        for b, lo, hi in spans:
            torch.mm(x[lo:hi], g[b].T, out=n_dot_g[lo:hi])
            n_dot_g[lo:hi].addcmul_(mean[lo:hi, None], g_sum[b], value=-1)
        n_dot_g.mul_(inv_sigma[:, None])
        need_x = ctx.needs_input_grad[0]
        # the LayerNorm backward's sum_m w_im (n_i . G_bm), taken before n_dot_g becomes the logits' gradient
        w_dot_g = (weights * n_dot_g).sum(1) if need_x else None
        # softmax backward, in place: d L / d logit_im = w_im ((grad w)_im - bag_dot_bm), where the weights'
        # gradient (grad w) = n . G + grad_weights
        grad_logits = n_dot_g
        if grad_weights is not None:
            grad_logits += grad_weights.to(x.dtype)
        for b, lo, hi in spans:
            grad_logits[lo:hi].sub_(bag_dot[b])
        grad_logits.mul_(weights)
        # grad_x = [w / sigma | grad_logits / sigma | shift] @ [G_b; u^T; 1] + (-c2 / sigma^2) x: the left operand is
        # written in place, its middle block (grad_logits / sigma) doubles as the directions' gradient's operand
        left = torch.empty(n, 2 * m + 1 if need_x else m, dtype=x.dtype, device=x.device)  # [N, 2M + 1] or [N, M]
        scaled = torch.mul(grad_logits, inv_sigma[:, None], out=left[:, m : 2 * m] if need_x else left)
        grad_dirs = None
        if ctx.needs_input_grad[1]:  # sum_i n_i grad_logits_i^T, with n_i = (x_i - mean_i) / sigma_i
            # (scaled^T x)^T: the [M, N] x [N, E] product runs ~1.4x faster here than x^T scaled
            grad_dirs = (scaled.T @ x).T - torch.outer(x.new_ones(dim), scaled.T @ mean)
            grad_dirs = grad_dirs.to(ctx.dtypes[1])
        grad_x = None
        if need_x:
            # grad_n_i = w_i G_b + grad_logits_i u^T; LayerNorm backward:
            # grad_x_i = (grad_n_i - mean_e(grad_n_i) - n_i mean_e(grad_n_i * n_i)) / sigma_i, where
            # mean_e(grad_n_i) = c1_i = w_i . mean_e(G_b) + grad_logits_i . mean_e(u) and
            # mean_e(grad_n_i * n_i) = c2_i = (w_i . (n_i . G_b) + grad_logits_i . logits_i) / E: no pass over grad_n.
            c1 = grad_logits @ u.mean(0)
            for b, lo, hi in spans:
                c1[lo:hi].addmv_(weights[lo:hi], g_sum[b], alpha=1.0 / dim)
            c2 = w_dot_g.add_((grad_logits * logits).sum(1)).div_(dim)
            inv2 = inv_sigma * inv_sigma
            torch.mul(weights, inv_sigma[:, None], out=left[:, :m])
            left[:, 2 * m] = mean * c2 * inv2 - c1 * inv_sigma
            right = torch.empty(2 * m + 1, dim, dtype=x.dtype, device=x.device)  # [G_b; u^T; 1], rows :M per bag
            right[m : 2 * m], right[2 * m] = u.T, 1.0
            grad_x = torch.empty_like(x)  # every row is in a non-empty bag
            for b, lo, hi in spans:
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


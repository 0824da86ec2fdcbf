"""``graph_attention``: GAT aggregation over a stencil neighbour table (SRMIL's encoder and decoder).

Contract (DESIGN.md section 3)::

    graph_attention(x [N, H, C], nbr [N, K], score_src [N, H], score_dst [N, H], negative_slope=0.2,
                    self_loop=True) -> out [N, H, C]

``e_ij = LeakyReLU(score_dst[i] + score_src[j])`` over ``j`` in ``nbr[i, :]`` (entries -1 are skipped) and ``i``
itself when ``self_loop``; ``alpha_i = softmax_j(e_i)``; ``out_i = sum_j alpha_ij x_j``, per head. A row with no
edge (no neighbours, no self loop) gets zeros. Differentiable in ``x``, ``score_src`` and ``score_dst``.

``nbr`` must be a symmetric stencil table (:func:`fastmil.ops.grid_neighbours`): ``nbr[i, s] == j`` implies
``nbr[j, K-1-s] == i``. Both backward paths rely on it to *pull* each row's gradient from the rows that attend to
it (deterministic, no atomics or scatters); :func:`fastmil.ops.grid_neighbours.check_stencil` verifies a table.
Neighbours never cross bags when the table comes from ``grid_neighbours``, so the op needs no offsets.
Every entry must be -1 or a row in ``[0, N)`` (:func:`check_neighbour_rows`, on every call and both backends): a
stale table (built for another batch, or kept after rows were dropped) is an error, not an out-of-bounds read.

Backends: **triton** (``fastmil.kernels.graph_attention``): one fused forward kernel (online softmax over the
slots, gathers one neighbour row block at a time) that keeps only the per-row log-sum-exp ``[N, H]``, and two
backward kernels (per-edge score gradients into an ``[N, K+1, H]`` table, then per-row pulls).
**torch** (CPU, memory-lean): the attention table ``[N, K, H]`` is formed (``K H`` numbers per row, against
``H C`` features), but never the ``[N, K, H, C]`` gathered features: the weighted sums loop over the K slots, one
``[N, H, C]`` gather at a time into a reused buffer. Accumulation is fp32 (fp64 for fp64 inputs); the output has
``x``'s dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..kernels._launch import canonical
from ._backend import resolve_backend
from ._triton import HAS_TRITON, check_triton_inputs

__all__ = ["check_neighbour_rows", "graph_attention", "graph_attention_reference"]


def check_neighbour_rows(nbr: torch.Tensor, n_rows: int) -> None:
    """Refuse a neighbour table with an entry outside ``[-1, n_rows)`` (-1 = no neighbour): the kernels gather
    ``x`` and the scores through it unchecked, so a stale table would read (and the backward pull) out of bounds.

    One min/max pass over the ``[N, K]`` table (``K`` int64 per row, against the ``H C`` features gathered ``K``
    times). CPU tensors (the torch path, the interpreter): ``ValueError`` naming the first bad entry. GPU tensors:
    a device-side assertion (``torch._assert_async``), so a training step stays free of host synchronisation; a
    bad table stops the process with a device-side assert at the next synchronisation instead of reading out of
    bounds (as torch's own indexing kernels do)."""
    if nbr.numel() == 0:
        return
    low, high = torch.aminmax(nbr)
    if nbr.device.type != "cpu":
        torch._assert_async((low >= -1) & (high < n_rows),
                            f"graph_attention: neighbour table entries outside [-1, {n_rows}) (a stale table?)")
        return
    if int(low) >= -1 and int(high) < n_rows:
        return
    bad = (nbr < -1) | (nbr >= n_rows)
    row, slot = (int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"graph_attention: neighbour table entry nbr[{row}, {slot}] = {int(nbr[row, slot])} is outside [-1, "
        f"{n_rows}) (-1 = no neighbour; {int(bad.sum())} such entries): a stale table, built for another batch or "
        "kept after rows were dropped? Build it for these rows (fastmil.ops.grid_neighbours)"
    )


def _check_inputs(x: torch.Tensor, nbr: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, slope: float) -> None:
    if x.dim() != 3 or not x.dtype.is_floating_point:
        raise ValueError(f"graph_attention: x must be a float [N, H, C] tensor, got {x.dtype} {tuple(x.shape)}")
    n, heads = x.shape[0], x.shape[1]
    if nbr.dim() != 2 or nbr.shape[0] != n or nbr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"graph_attention: nbr must be an integer [N, K] = [{n}, K] table, got {nbr.dtype} "
                         f"{tuple(nbr.shape)}")
    for name, t in (("score_src", src), ("score_dst", dst)):
        if t.shape != (n, heads) or not t.dtype.is_floating_point:
            raise ValueError(f"graph_attention: {name} must be a float [N, H] = [{n}, {heads}] tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    devices = {t.device for t in (x, nbr, src, dst)}
    if len(devices) > 1:
        raise ValueError(f"graph_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not (math.isfinite(slope) and slope >= 0):
        raise ValueError(f"graph_attention: negative_slope must be finite and >= 0, got {slope}")
    check_neighbour_rows(nbr, n)


def graph_attention_reference(x: torch.Tensor, nbr: torch.Tensor, score_src: torch.Tensor, score_dst: torch.Tensor,
                              negative_slope: float = 0.2, self_loop: bool = True) -> torch.Tensor:
    """Dense reference (tests; use fp64): gathers the ``[N, K+1, H, C]`` neighbourhood, masked softmax, sum.
    Differentiable through plain autograd (its backward scatters)."""
    _check_inputs(x, nbr, score_src, score_dst, negative_slope)
    n = x.shape[0]
    idx = torch.cat([nbr.long(), torch.arange(n, device=x.device)[:, None]], 1)  # [N, K+1], last = self
    valid = torch.cat([nbr >= 0, torch.full((n, 1), self_loop, device=x.device)], 1)
    safe = idx.clamp(min=0)
    e = F.leaky_relu(score_dst[:, None, :] + score_src[safe], negative_slope)  # [N, K+1, H]
    e = e.masked_fill(~valid[:, :, None], float("-inf"))
    alpha = torch.softmax(e, dim=1).nan_to_num(0.0)  # rows without edges: all -inf -> NaN -> 0
    return (alpha[..., None] * x[safe]).sum(1)


def _leaky_grad(pre: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, slope))


class _GraphAttentionTorch(torch.autograd.Function):
    """Slot-by-slot weighted sums; keeps the attention ``[N, K, H]`` (and self ``[N, H]``) for backward."""

    @staticmethod
    def forward(ctx, x, nbr, src, dst, slope: float, self_loop: bool):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        n, k = nbr.shape
        idx, valid = nbr.long().clamp(min=0), nbr >= 0
        src_a, dst_a = src.to(acc), dst.to(acc)
        e = F.leaky_relu(dst_a[:, None, :] + src_a[idx], slope).masked_fill_(~valid[:, :, None], float("-inf"))
        e_self = F.leaky_relu(dst_a + src_a, slope)
        if not self_loop:
            e_self = torch.full_like(e_self, float("-inf"))
        m = torch.maximum(e.amax(1) if k else e_self, e_self)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        alpha = torch.exp(e - m[:, None, :])
        alpha_self = torch.exp(e_self - m)
        total = alpha.sum(1) + alpha_self
        inv = torch.where(total != 0, 1.0 / total, torch.zeros_like(total))  # NaN propagates; no edge gives 0
        alpha *= inv[:, None, :]
        alpha_self *= inv
        xa = x.to(acc)
        out = alpha_self[..., None] * xa
        buf = torch.empty_like(xa)
        for s in range(k):
            torch.index_select(xa, 0, idx[:, s], out=buf)
            out.addcmul_(alpha[:, s, :, None], buf)
        ctx.save_for_backward(x, nbr, src, dst, alpha, alpha_self)
        ctx.slope = slope
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_out):
        x, nbr, src, dst, alpha, alpha_self = ctx.saved_tensors
        slope = ctx.slope
        acc = alpha.dtype
        n, k = nbr.shape
        idx, valid = nbr.long().clamp(min=0), nbr >= 0
        xa, g_out = x.to(acc), grad_out.to(acc)
        buf = torch.empty_like(xa)
        # g_ij = <dout_i, x_j> per head, slot by slot
        g = torch.empty_like(alpha)
        for s in range(k):
            torch.index_select(xa, 0, idx[:, s], out=buf)
            g[:, s] = torch.einsum("nhc,nhc->nh", g_out, buf)
        g_self = torch.einsum("nhc,nhc->nh", g_out, xa)
        delta = (alpha * g).sum(1) + alpha_self * g_self  # = <dout_i, out_i>
        src_a, dst_a = src.to(acc), dst.to(acc)
        dpre = alpha * (g - delta[:, None, :]) * _leaky_grad(dst_a[:, None, :] + src_a[idx], slope)
        dpre_self = alpha_self * (g_self - delta) * _leaky_grad(dst_a + src_a, slope)
        grad_dst = dpre.sum(1) + dpre_self
        reverse = torch.arange(k - 1, -1, -1, device=nbr.device)[None, :]  # slot K-1-s: the edge back
        dpre_back = dpre[idx, reverse].masked_fill_(~valid[:, :, None], 0.0)  # [N, K, H]
        grad_src = dpre_self + dpre_back.sum(1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            alpha_back = alpha[idx, reverse].masked_fill_(~valid[:, :, None], 0.0)  # alpha of the edge i -> this row
            grad_x = alpha_self[..., None] * g_out
            for s in range(k):
                torch.index_select(g_out, 0, idx[:, s], out=buf)
                grad_x.addcmul_(alpha_back[:, s, :, None], buf)
            grad_x = grad_x.to(x.dtype)
        return grad_x, None, grad_src.to(src.dtype), grad_dst.to(dst.dtype), None, None


class _GraphAttentionTriton(torch.autograd.Function):
    """The fused kernels; keeps the inputs, the output and the per-row log-sum-exp ``[N, H]``."""

    @staticmethod
    def forward(ctx, x, nbr, src, dst, slope: float, self_loop: bool):
        from ..kernels import graph_attention as k

        x, nbr, src, dst = canonical(x), canonical(nbr.long()), canonical(src), canonical(dst)
        out, lse = k.gat_fwd_buffers(x)
        k.gat_fwd_launch(x, nbr, src, dst, out, lse, slope, self_loop)()
        ctx.save_for_backward(x, nbr, src, dst, out, lse)
        ctx.slope, ctx.self_loop = slope, self_loop
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_out):
        from ..kernels import graph_attention as k

        x, nbr, src, dst, out, lse = ctx.saved_tensors
        g_out = canonical(grad_out.to(x.dtype))
        dpre, grad_dst, grad_src, grad_x = k.gat_bwd_buffers(x, nbr.shape[1])
        k.gat_edge_launch(x, nbr, src, dst, out, lse, g_out, dpre, grad_dst, ctx.slope, ctx.self_loop)()
        k.gat_pull_launch(x, nbr, src, dst, lse, g_out, dpre, grad_x, grad_src, ctx.slope, ctx.self_loop)()
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_src.to(src.dtype), grad_dst.to(dst.dtype), None, None


def graph_attention(
    x: torch.Tensor,
    nbr: torch.Tensor,
    score_src: torch.Tensor,
    score_dst: torch.Tensor,
    negative_slope: float = 0.2,
    self_loop: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """GAT aggregation of ``x [N, H, C]`` over the stencil table ``nbr [N, K]`` (see the module docstring).

    ``backend``: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``. Inputs of any strides are
    accepted (the Triton path copies unusual views once). ``score_src``/``score_dst`` ``[N, H]`` may have another
    float dtype than ``x``; their gradients come back in their own dtypes.
    """
    _check_inputs(x, nbr, score_src, score_dst, negative_slope)
    chosen = resolve_backend(backend, "graph_attention", x.device, has_triton=HAS_TRITON)
    if chosen == "triton":
        check_triton_inputs("graph_attention", x.dtype, max(2, x.shape[2]), x, nbr, score_src, score_dst)
        src = score_src.to(x.dtype)
        dst = score_dst.to(x.dtype)
        return _GraphAttentionTriton.apply(x, nbr, src, dst, float(negative_slope), bool(self_loop))
    return _GraphAttentionTorch.apply(x, nbr, score_src, score_dst, float(negative_slope), bool(self_loop))

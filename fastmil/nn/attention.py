"""Attention pooling modules over packed ragged bags."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import attention_pool, gated_attention_pool
from ..ops._segments import bag_index

__all__ = ["AttentionPool", "GatedAttentionPool", "GatedBranchPool", "MeanPool", "pool_with_tokens",
           "predicted_class_attention"]


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): ``score_i = w(tanh(V h_i) * sigmoid(U h_i))``.

    Parameters ``V``, ``U`` (``nn.Linear(in_dim, hidden_dim)``) and ``w`` (``nn.Linear(hidden_dim, 1)``).
    ``forward`` runs the fused op :func:`fastmil.ops.gated_attention_pool`: on CUDA one fused Triton kernel per
    direction, on CPU a chunked torch path; neither keeps the ``N x hidden_dim`` activations for backward.

    ``forward(h [N, in_dim], offsets int64 [B+1], mask bool [N] | None, offsets_cpu=None)
    -> (pooled [B, in_dim] fp32, weights [N] fp32)`` (fp64 for fp64 inputs on the torch path); ``offsets_cpu`` is
    the host copy of ``offsets`` when the caller has it (``Bags.offsets_cpu``). ``sparse_grad``: see
    :func:`fastmil.ops.gated_attention_pool` (the gradient of ``h`` may come back sparse over the unmasked rows);
    every pool module takes it, the others always return a dense gradient.
    """

    def __init__(self, in_dim: int, hidden_dim: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, hidden_dim)
        self.U = nn.Linear(in_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, 1)
        self.backend = backend

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores ``[N]``."""
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
        offsets_cpu: torch.Tensor | None = None, return_lse: bool = False, sparse_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        return gated_attention_pool(
            h, self.V.weight, self.V.bias, self.U.weight, self.U.bias, self.w.weight, self.w.bias,
            offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu, return_lse=return_lse,
            sparse_grad=sparse_grad,
        )


class AttentionPool(nn.Module):
    """Non-gated attention pooling: ``score_i = w(tanh(V h_i))``. Same interface as :class:`GatedAttentionPool`."""

    def __init__(self, in_dim: int, hidden_dim: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, 1)
        self.backend = backend

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(h))).squeeze(-1)

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
        offsets_cpu: torch.Tensor | None = None, return_lse: bool = False, sparse_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        return attention_pool(self.scores(h), h, offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu,
                              return_lse=return_lse)


class MeanPool(nn.Module):
    """Mean over each bag's unmasked instances (equal scores through :func:`attention_pool`); no parameters."""

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Equal scores ``[...]`` (zeros)."""
        return h.new_zeros(h.shape[:-1])

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
        offsets_cpu: torch.Tensor | None = None, return_lse: bool = False, sparse_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        return attention_pool(self.scores(h), h, offsets, mask, offsets_cpu=offsets_cpu, return_lse=return_lse)


def pool_with_tokens(
    pool: nn.Module, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None,
    tokens: torch.Tensor | None, token_valid: torch.Tensor | None = None, offsets_cpu: torch.Tensor | None = None,
    sparse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling of each bag's unmasked instances *and* extra tokens, without concatenating the bag.

    ``h [N, E]`` pools through ``pool`` (fused op, log-sum-exp returned); ``tokens [B, k, E]`` are scored with the
    same ``pool.scores``; the two softmax groups merge exactly: with ``l_A`` the bags' log-sum-exp over their
    instances and ``l_T`` over their tokens, ``pooled = e^(l_A - l) pooled_A + sum_j e^(s_j - l) t_j`` for
    ``l = logaddexp(l_A, l_T)``. Tokens of bags with ``token_valid`` False count for nothing. Returns
    ``(pooled [B, E], instance weights [N])`` (the instances' share of the merged softmax). A multi-head pool
    (scores ``[..., H]``, pooled ``[B, H, E]``, weights ``[N, H]``) merges per head and returns those shapes.
    Without ``tokens`` it is ``pool`` alone; ``token_valid`` defaults to every bag's tokens counting. ``sparse_grad``
    is passed to ``pool`` only when True (a pool without the option still works when it is not asked for)."""
    options = {"sparse_grad": True} if sparse_grad else {}
    if tokens is None:
        return tuple(pool(h, offsets, mask, offsets_cpu=offsets_cpu, **options)[:2])
    if token_valid is None:
        token_valid = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pooled_a, weights_a, lse_a = pool(h, offsets, mask, offsets_cpu=offsets_cpu, return_lse=True, **options)
    acc = torch.promote_types(pooled_a.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    token_scores = pool.scores(tokens).to(acc)  # [B, k] or [B, k, H]
    single = pooled_a.dim() == 2
    if single:
        pooled_a, weights_a, lse_a, token_scores = pooled_a[:, None], weights_a[:, None], lse_a[:, None], \
            token_scores[..., None]
    valid = token_valid[:, None, None].expand_as(token_scores)  # [B, k, H]
    lse_t = torch.where(token_valid[:, None], torch.logsumexp(torch.where(valid, token_scores, 0.0), 1),
                        float("-inf"))  # [B, H]
    # merge the two groups without ever forming inf - inf (whose gradient is NaN even where it is masked out)
    groups = torch.stack([lse_a.to(acc), lse_t])  # [2, B, H]
    present = torch.isfinite(groups)
    safe = torch.where(present, groups, torch.zeros_like(groups))
    top = torch.where(present, safe, torch.full_like(safe, float("-inf"))).amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.where(present, torch.exp(safe - top), torch.zeros_like(safe))  # [2, B, H]
    total = mass.sum(0)
    total = torch.where(total > 0, total, torch.ones_like(total))  # a bag with nothing at all pools to zero
    share_a = mass[0] / total  # [B, H]
    lse = top + torch.log(total)
    share_t = torch.where(valid, torch.exp(torch.where(valid, token_scores, 0.0) - lse[:, None]), 0.0)  # [B, k, H]
    pooled = share_a[..., None] * pooled_a.to(acc) + torch.einsum("bkh,bke->bhe", share_t, tokens.to(acc))
    bag = bag_index(offsets, h.shape[0])
    weights = weights_a * share_a[bag].to(weights_a.dtype)
    return (pooled[:, 0], weights[:, 0]) if single else (pooled, weights)


class GatedBranchPool(nn.Module):
    """Gated attention with ``branches`` score columns (CLAM's multi-branch attention network):
    ``scores_i = W (tanh(V h_i) * sigmoid(U h_i)) + b`` in ``[N, branches]``, one softmax per branch and bag.

    ``forward(h [N, in_dim], offsets, mask, offsets_cpu=None, return_lse=False, sparse_grad=False)
    -> (pooled [B, branches, in_dim], weights [N, branches][, lse [B, branches]])``; fp32 (fp64 for fp64 ``h``).
    One branch runs the fused op :func:`fastmil.ops.gated_attention_pool` (no ``N x hidden_dim`` activations kept;
    Triton on CUDA; ``sparse_grad`` passed on); several score their branches with torch modules (the gate
    activations, ``N x hidden_dim`` each, kept by autograd) and pool through :func:`fastmil.ops.attention_pool`
    (multi-head; ``sparse_grad`` ignored, the gradient of ``h`` is dense)."""

    def __init__(self, in_dim: int, hidden_dim: int, branches: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, hidden_dim)
        self.U = nn.Linear(in_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, branches)
        self.backend = backend

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores ``[..., branches]``."""
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
        offsets_cpu: torch.Tensor | None = None, return_lse: bool = False, sparse_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        if self.w.out_features == 1:
            out = gated_attention_pool(
                h, self.V.weight, self.V.bias, self.U.weight, self.U.bias, self.w.weight, self.w.bias, offsets, mask,
                backend=self.backend, offsets_cpu=offsets_cpu, return_lse=return_lse, sparse_grad=sparse_grad)
            return (out[0][:, None], out[1][:, None], *(t[:, None] for t in out[2:]))
        return attention_pool(self.scores(h), h, offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu,
                              return_lse=return_lse)


def predicted_class_attention(weights: torch.Tensor, logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[N]``: for per-class attention ``weights [N, C]`` (DSMIL, CLAM multi-branch), each instance's weight in the
    column of its bag's predicted class (``logits [B, C]`` argmax): the attention a heatmap of the bag draws."""
    predicted = logits.detach().argmax(-1)  # [B]
    rows = predicted[bag_index(offsets, weights.shape[0])]
    return weights.gather(1, rows[:, None])[:, 0]

"""Attention pooling modules over packed ragged bags."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import attention_pool, gated_attention_pool

__all__ = ["GatedAttentionPool", "AttentionPool", "MeanPool"]


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): ``score_i = w(tanh(V h_i) * sigmoid(U h_i))``.

    Parameters ``V``, ``U`` (``nn.Linear(in_dim, hidden_dim)``) and ``w`` (``nn.Linear(hidden_dim, 1)``).
    ``forward`` runs the fused op :func:`fastmil.ops.gated_attention_pool`: on CUDA one fused Triton kernel per
    direction, on CPU a chunked torch path; neither keeps the ``N x hidden_dim`` activations for backward.

    ``forward(h [N, in_dim], offsets int64 [B+1], mask bool [N] | None, offsets_cpu=None)
    -> (pooled [B, in_dim] fp32, weights [N] fp32)`` (fp64 for fp64 inputs on the torch path); ``offsets_cpu`` is
    the host copy of ``offsets`` when the caller has it (``Bags.offsets_cpu``).
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
        offsets_cpu: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gated_attention_pool(
            h, self.V.weight, self.V.bias, self.U.weight, self.U.bias, self.w.weight, self.w.bias,
            offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu,
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
        offsets_cpu: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_pool(self.scores(h), h, offsets, mask, backend=self.backend, offsets_cpu=offsets_cpu)


class MeanPool(nn.Module):
    """Mean over each bag's unmasked instances (equal scores through :func:`attention_pool`); no parameters."""

    def forward(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
        offsets_cpu: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_pool(h.new_zeros(h.shape[0]), h, offsets, mask, offsets_cpu=offsets_cpu)

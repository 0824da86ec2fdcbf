"""Bag classifiers: ABMIL (attention-based MIL) and a mean-pooling baseline."""
from __future__ import annotations

import torch
from torch import nn

from ..bags import Bags
from .attention import AttentionPool, GatedAttentionPool, MeanPool

__all__ = ["ABMIL", "MeanPoolMIL"]


def _unpack(
    x: Bags | torch.Tensor, offsets: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(x, Bags):
        if offsets is not None:
            raise TypeError("pass either Bags or (features, offsets), not both")
        return x.features, x.offsets, mask
    if offsets is None:
        raise TypeError("forward(features, offsets, mask=None) needs offsets")
    return x, offsets, mask


class _BagClassifier(nn.Module):
    """``embed -> pool -> classifier``; subclasses set ``embed``, ``pool`` and ``classifier``."""

    embed: nn.Module
    pool: nn.Module
    classifier: nn.Linear

    def forward(
        self, x: Bags | torch.Tensor, offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features, offsets, mask = _unpack(x, offsets, mask)
        h = self.embed(features.to(self.classifier.weight.dtype))
        pooled, weights = self.pool(h, offsets, mask)
        return self.classifier(pooled.to(h.dtype)), weights


class ABMIL(_BagClassifier):
    """Attention-based MIL: ``Linear(D -> embed) + ReLU + Dropout -> (gated) attention pooling -> Linear(embed -> C)``.

    ``forward(bags)`` or ``forward(features [N, D], offsets [B+1], mask [N] | None)`` returns
    ``(logits [B, n_classes], weights [N])``; weights are the per-bag attention (0 on masked instances).
    Features of any float dtype are cast to the parameters' dtype.
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int = 512,
        attn_dim: int = 128,
        n_classes: int = 2,
        gated: bool = True,
        dropout: float = 0.25,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = dict(in_dim=in_dim, embed_dim=embed_dim, attn_dim=attn_dim, n_classes=n_classes,
                           gated=gated, dropout=dropout)
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        pool_cls = GatedAttentionPool if gated else AttentionPool
        self.pool = pool_cls(embed_dim, attn_dim, backend=backend)
        self.classifier = nn.Linear(embed_dim, n_classes)


class MeanPoolMIL(_BagClassifier):
    """Baseline: ``Linear + ReLU + Dropout``, mean over the bag's (unmasked) instances, ``Linear``.

    Same interface as :class:`ABMIL`; the returned weights are uniform (1/n per bag, 0 where masked).
    """

    def __init__(self, in_dim: int, embed_dim: int = 512, n_classes: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = dict(in_dim=in_dim, embed_dim=embed_dim, n_classes=n_classes, dropout=dropout)
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.pool = MeanPool()
        self.classifier = nn.Linear(embed_dim, n_classes)

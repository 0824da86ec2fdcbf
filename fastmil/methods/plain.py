"""Plain MIL training objective: a bag classifier trained with (class-weighted) cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bags import Bags
from ..nn import ABMIL, MeanPoolMIL

__all__ = ["PlainMIL"]


class PlainMIL:
    """``loss = CE(model(bags).logits, bags.labels)``. ``model`` is ``"abmil"`` or ``"meanmil"``."""

    MODELS = {"abmil": ABMIL, "meanmil": MeanPoolMIL}

    def __init__(self, model: str = "abmil") -> None:
        if model not in self.MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(self.MODELS)}")
        self.model_name = model

    def build_model(self, in_dim: int, n_classes: int, *, embed_dim: int, attn_dim: int, dropout: float,
                    gated: bool) -> nn.Module:
        if self.model_name == "abmil":
            return ABMIL(in_dim, embed_dim=embed_dim, attn_dim=attn_dim, n_classes=n_classes, gated=gated,
                         dropout=dropout)
        return MeanPoolMIL(in_dim, embed_dim=embed_dim, n_classes=n_classes, dropout=dropout)

    def loss(self, model: nn.Module, bags: Bags, class_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scalar loss, logits [B, C])`` for one training step."""
        if bags.labels is None:
            raise ValueError(f"training step without labels (slides {bags.ids[:3]}...)")
        logits, _ = model(bags)
        return F.cross_entropy(logits.float(), bags.labels, weight=class_weight), logits

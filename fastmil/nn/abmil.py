"""Bag classifiers: ABMIL (attention-based MIL) and a mean-pooling baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionPool, GatedAttentionPool, MeanPool, pool_with_tokens
from .base import EmbeddedMIL, check_sizes, unpack_batch, weighted_instance_logits
from .embed import EmbedBlock
from .output import MILOutput
from .registry import register_model

__all__ = ["ABMIL", "MeanPoolMIL", "check_sizes", "unpack_batch"]


class _BagClassifier(EmbeddedMIL):
    """``embed -> pool -> classifier``; subclasses set ``embed``, ``pool`` and ``classifier``.

    ``forward_all`` returns everything a training method needs from one pass (:class:`MILOutput`);
    ``forward`` returns ``(logits [B, C], attention [N])`` for users. The pieces a method with its own
    pooling needs (MHIM-MIL: masks and recycled tokens) are public: :meth:`embed_instances`, :meth:`aggregate`,
    :meth:`instance_logits`.
    """

    embed: EmbedBlock
    pool: nn.Module
    classifier: nn.Linear

    def aggregate(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
        offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None, sparse_grad: bool = False,
    ) -> MILOutput:
        """Pool the embedded instances ``h`` of each bag (those with ``mask`` True) and, when given, the extra
        ``tokens [B, k, E]`` of each bag (``token_valid [B]``), then classify. ``sparse_grad``: the gradient of
        ``h`` may come back sparse over the unmasked rows (:func:`fastmil.ops.gated_attention_pool`), for a caller
        whose other use of ``h`` returns a dense one."""
        pooled, weights = pool_with_tokens(self.pool, h, offsets, mask, tokens, token_valid, offsets_cpu,
                                           sparse_grad)
        pooled = pooled.to(h.dtype)
        return MILOutput(self.classifier(pooled), weights, pooled, h)

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]``: the classifier applied to each attention-weighted instance embedding ``a_i h_i`` (MHIM's
        class-aware instance probability is the max softmax of these)."""
        return weighted_instance_logits(self.classifier, out.instance_embedding, out.attention)


@register_model("abmil")
class ABMIL(_BagClassifier):
    """Attention-based MIL: ``Linear(D -> embed) + ReLU + Dropout -> (gated) attention pooling -> Linear(embed -> C)``.

    ``forward(bags)`` or ``forward(features [N, D], offsets [B+1], mask [N] | None)`` returns
    ``(logits [B, n_classes], weights [N])``; weights are the per-bag attention (0 on masked instances).
    ``forward_all`` returns a :class:`MILOutput` (also the embedded instances ``[N, embed_dim]`` and the bag
    embedding ``[B, embed_dim]``). Features of any float dtype are cast to the parameters' dtype.
    """

    @dataclass
    class Config:
        """The ``model:`` config section of ABMIL."""

        name: str = "abmil"
        embed_dim: int = 512
        attn_dim: int = 128
        gated: bool = True
        dropout: float = 0.25

        def __post_init__(self) -> None:
            check_sizes(embed_dim=self.embed_dim, attn_dim=self.attn_dim, dropout=self.dropout)

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
        self.embed = EmbedBlock(in_dim, embed_dim, dropout)
        pool_cls = GatedAttentionPool if gated else AttentionPool
        self.pool = pool_cls(embed_dim, attn_dim, backend=backend)
        self.classifier = nn.Linear(embed_dim, n_classes)

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> ABMIL:
        return cls(in_dim, embed_dim=config.embed_dim, attn_dim=config.attn_dim, n_classes=n_classes,
                   gated=config.gated, dropout=config.dropout)


@register_model("meanmil")
class MeanPoolMIL(_BagClassifier):
    """Baseline: ``Linear + ReLU + Dropout``, mean over the bag's (unmasked) instances, ``Linear``.

    Same interface as :class:`ABMIL`; the returned weights are uniform (1/n per bag, 0 where masked).
    """

    @dataclass
    class Config:
        """The ``model:`` config section of the mean-pooling baseline."""

        name: str = "meanmil"
        embed_dim: int = 512
        dropout: float = 0.25

        def __post_init__(self) -> None:
            check_sizes(embed_dim=self.embed_dim, dropout=self.dropout)

    def __init__(self, in_dim: int, embed_dim: int = 512, n_classes: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.embed = EmbedBlock(in_dim, embed_dim, dropout)
        self.pool = MeanPool()
        self.classifier = nn.Linear(embed_dim, n_classes)

    @classmethod
    def from_config(cls, config: Config, in_dim: int, n_classes: int) -> MeanPoolMIL:
        return cls(in_dim, embed_dim=config.embed_dim, n_classes=n_classes, dropout=config.dropout)

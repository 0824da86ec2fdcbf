"""Bag classifiers: ABMIL (attention-based MIL) and a mean-pooling baseline."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bags import Bags
from .attention import AttentionPool, GatedAttentionPool, MeanPool, pool_with_tokens
from .embed import EmbedBlock
from .output import MILOutput
from .registry import register_model

__all__ = ["ABMIL", "MeanPoolMIL", "check_sizes", "unpack_batch"]


def unpack_batch(
    x: Bags | torch.Tensor, offsets: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(features [N, D], offsets [B+1], mask [N] | None, offsets_cpu | None)`` from either calling form of a
    model: ``(bags, mask=None)`` or ``(features, offsets, mask=None)``."""
    if isinstance(x, Bags):
        if offsets is not None:
            raise TypeError("pass either Bags or (features, offsets), not both")
        return x.features, x.offsets, mask, x.offsets_cpu
    if offsets is None:
        raise TypeError("forward(features, offsets, mask=None) needs offsets")
    return x, offsets, mask, None


def check_sizes(dropout: float | None = None, **sizes: int) -> None:
    """Validation shared by model configs: every size >= 1, dropout in [0, 1)."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class _BagClassifier(nn.Module):
    """``embed -> pool -> classifier``; subclasses set ``embed``, ``pool`` and ``classifier``.

    ``forward_all`` returns everything a training method needs from one pass (:class:`MILOutput`);
    ``forward`` returns ``(logits [B, C], attention [N])`` for users. The pieces a method with its own
    pooling needs (MHIM-MIL: masks and recycled tokens) are public: :meth:`embed_instances`, :meth:`aggregate`,
    :meth:`instance_logits`.
    """

    embed: EmbedBlock
    pool: nn.Module
    classifier: nn.Linear

    @property
    def embedding_dim(self) -> int:
        """Width ``E`` of the instance and bag embeddings."""
        return self.classifier.in_features

    def embed_instances(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features (any float dtype) -> ``[N, E]`` instance embeddings, in the parameters' dtype."""
        return self.embed(features.to(self.classifier.weight.dtype))

    def embed_bags(self, bags: Bags) -> torch.Tensor:
        """``[N, E]`` instance embeddings of a batch (what MHIM-MIL's student pools; graph backbones also read
        the batch's neighbour table here)."""
        return self.embed_instances(bags.features)

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

    def activate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map extra tokens (MHIM's recycled summaries) into the space of the embedded instances: the
        activation and dropout that end :attr:`embed` (embedded instances are non-negative, and tokens pooled
        beside them must be too, or they take over the pooled vector and the model learns to read tokens that
        inference never shows it)."""
        return self.embed.activate(tokens)

    def instance_logits(self, out: MILOutput) -> torch.Tensor:
        """``[N, C]``: the classifier applied to each attention-weighted instance embedding ``a_i h_i`` (MHIM's
        class-aware instance probability is the max softmax of these)."""
        # W (a_i h_i) + b = a_i (W h_i) + b: scale the [N, C] product, not the [N, E] embeddings. In fp32 (fp64 for
        # fp64 h): a_i W h_i is ~1e-5 in a 100k bag, and added to the bias in bf16 it would round away
        h = out.instance_embedding
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        # (W h^T)^T: a [C, E] x [E, N] product, ~2x faster here than h W^T with its C-wide output
        projected = (self.classifier.weight.to(h.dtype) @ h.T).T.to(acc)  # [N, C]
        return projected * out.attention.to(acc)[:, None] + self.classifier.bias.to(acc)

    def forward_all(
        self, x: Bags | torch.Tensor, offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        features, offsets, mask, offsets_cpu = unpack_batch(x, offsets, mask)
        return self.aggregate(self.embed_instances(features), offsets, mask, offsets_cpu=offsets_cpu)

    def forward(
        self, x: Bags | torch.Tensor, offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_all(x, offsets, mask)
        return out.logits, out.attention


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

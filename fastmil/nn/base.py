"""What the bag classifiers share: the two calling forms, config checks, and the embed -> aggregate skeleton of the
models MHIM-MIL can wrap (ABMIL, the mean-pooling baseline, DSMIL, CLAM, TransMIL)."""
from __future__ import annotations

import torch
from torch import nn

from ..bags import Bags
from .embed import EmbedBlock
from .output import MILOutput

__all__ = ["EmbeddedMIL", "check_sizes", "unpack_batch", "weighted_instance_logits"]


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


def weighted_instance_logits(classifier: nn.Linear, h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: the bag classifier applied to each attention-weighted instance, ``W (a_i h_i) + b``, for
    ``attention [N]`` (one weight per instance) or ``[N, C]`` (class ``k`` weighted by its own column). Computed as
    ``a_i (W h_i) + b`` in fp32 (fp64 for fp64 ``h``): ``a_i W h_i`` is ~1e-5 in a 100k bag and would round away
    against the bias in bf16."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # (W h^T)^T: a [C, E] x [E, N] product, ~2x faster here than h W^T with its C-wide output
    projected = (classifier.weight.to(h.dtype) @ h.T).T.to(acc)  # [N, C]
    weights = attention.to(acc)
    return projected * (weights[:, None] if weights.dim() == 1 else weights) + classifier.bias.to(acc)


class EmbeddedMIL(nn.Module):
    """``embed`` (an :class:`EmbedBlock`) then ``aggregate``: the skeleton every such model shares. Subclasses set
    ``embed`` and implement ``aggregate(h, offsets, mask, *, offsets_cpu, tokens, token_valid, sparse_grad) ->
    MILOutput``; ``forward_all`` and ``forward`` (both calling forms), ``embed_instances``, ``embed_bags``,
    ``activate_tokens`` and ``embedding_dim`` come from here (what MHIM-MIL needs of a backbone, with the
    subclass's ``instance_logits``)."""

    embed: EmbedBlock

    @property
    def embedding_dim(self) -> int:
        """Width ``E`` of the instance embeddings."""
        return self.embed.linear.out_features

    def embed_instances(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features (any float dtype) -> ``[N, E]`` instance embeddings, in the parameters' dtype."""
        return self.embed(features.to(self.embed.linear.weight.dtype))

    def embed_bags(self, bags: Bags) -> torch.Tensor:
        """``[N, E]`` instance embeddings of a batch (what MHIM-MIL's student pools)."""
        return self.embed_instances(bags.features)

    def activate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map extra tokens (MHIM's recycled summaries) into the space of the embedded instances: the activation and
        dropout that end :attr:`embed` (embedded instances are non-negative, and tokens pooled beside them must be
        too, or they take over the pooled vector and the model learns to read tokens that inference never shows
        it)."""
        return self.embed.activate(tokens)

    def aggregate(
        self, h: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None, *,
        offsets_cpu: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        token_valid: torch.Tensor | None = None, sparse_grad: bool = False,
    ) -> MILOutput:
        raise NotImplementedError

    def forward_all(
        self, x: Bags | torch.Tensor, offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> MILOutput:
        """One pass: everything a training method needs (:class:`MILOutput`)."""
        features, offsets, mask, offsets_cpu = unpack_batch(x, offsets, mask)
        return self.aggregate(self.embed_instances(features), offsets, mask, offsets_cpu=offsets_cpu)

    def forward(
        self, x: Bags | torch.Tensor, offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], attention [N])``."""
        out = self.forward_all(x, offsets, mask)
        return out.logits, out.attention

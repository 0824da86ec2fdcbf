"""What a MIL model computes in one forward pass, for users, methods and teachers alike."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["MILOutput"]


@dataclass
class MILOutput:
    """One forward pass of a bag classifier over a packed batch of B bags and N instances.

    Attributes:
        logits: ``[B, C]``.
        attention: ``[N]`` (or ``[N, H]`` for multi-head pooling): the per-bag attention the model pools with,
            0 on masked instances; what heatmaps draw.
        bag_embedding: ``[B, E]``: the pooled vector the classifier reads.
        instance_embedding: ``[N, E]``: the instance features the model's instance scores read: after the
            embedding layer (ABMIL, DSMIL, CLAM), after the last layer (TransMIL, zero on masked rows); None for
            models without one.
        extras: what a particular model also computes in the pass and needs for its own loss terms or instance
            scores (DSMIL: ``bag_logits``, ``max_logits``, ``instance_logits``, ``class_attention``; CLAM:
            ``branch_weights`` and the ``mask`` it pooled with); empty for models without any.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    bag_embedding: torch.Tensor
    instance_embedding: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

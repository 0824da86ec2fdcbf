"""Plain MIL: the model trained with (class-weighted) cross-entropy on its bag logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..bags import Bags
from .base import Method, StepContext, StepOutput, register_method

__all__ = ["PlainMIL"]


@register_method("plain")
class PlainMIL(Method):
    """``loss = CE(model(bags).logits, bags.labels)``; logged term ``ce``."""

    @dataclass
    class Config:
        """The ``method:`` config section of plain MIL (no options)."""

        name: str = "plain"

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        if bags.labels is None:
            raise ValueError(f"training step without labels (slides {bags.ids[:3]}...)")
        out = self.model.forward_all(bags)
        ce = F.cross_entropy(out.logits.float(), bags.labels, weight=ctx.class_weight)
        return StepOutput(ce, {"ce": ce.detach()})

"""Plain MIL: the model trained with (class-weighted) cross-entropy on its bag logits."""
from __future__ import annotations

from dataclasses import dataclass

from ..bags import Bags
from .base import Method, StepContext, StepOutput, register_method

__all__ = ["PlainMIL"]


@register_method("plain")
class PlainMIL(Method):
    """``loss = CE(model(bags).logits, bags.labels)`` (or the task's loss); logged term ``ce`` (``nll`` for
    survival)."""

    @dataclass
    class Config:
        """The ``method:`` config section of plain MIL (no options)."""

        name: str = "plain"

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        out = self.model.forward_all(bags)
        loss = ctx.supervised_loss(out.logits, bags)
        return StepOutput(loss, {ctx.loss_name: loss.detach()})

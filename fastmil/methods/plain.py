"""Plain MIL: the model trained with (class-weighted) cross-entropy on its bag logits."""
from __future__ import annotations

from dataclasses import dataclass

from ..bags import Bags
from .base import Method, StepContext, StepOutput, model_objective, register_method

__all__ = ["PlainMIL"]


@register_method("plain")
class PlainMIL(Method):
    """``loss = CE(model(bags).logits, bags.labels)`` (or the task's loss); logged term ``ce`` (``nll`` for
    survival). A model with a published objective of its own (DSMIL, CLAM) adds its terms
    (:func:`~fastmil.methods.base.model_objective`)."""

    @dataclass
    class Config:
        """The ``method:`` config section of plain MIL (no options)."""

        name: str = "plain"

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        loss, terms = model_objective(self.model, self.model.forward_all(bags), bags, ctx)
        return StepOutput(loss, terms)

"""The method interface the trainer runs, and the method registry.

A *method* (MIL training objective) is an ``nn.Module`` that owns everything it trains and keeps: the model it
predicts with and any teacher, tokens, queries or buffers. All of it is in ``state_dict()``, so checkpoints and
``--resume`` restore it exactly. The trainer (:func:`fastmil.train.fit`) knows nothing method-specific; it calls

- :meth:`Method.training_step` once per optimiser step -> the loss and its named terms,
- :meth:`Method.after_optimizer_step` after every optimiser step (EMA teachers, query updates),
- :meth:`Method.predict` for validation, evaluation and prediction -> :class:`fastmil.nn.MILOutput`,
- :meth:`Method.trainable_parameters` once, to build the optimiser.

A method registers itself with :func:`register_method` and declares its ``method:`` config section as a
``Config`` dataclass (with a ``name`` field); ``docs/architecture.md`` has a worked example.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import Registry
from ..bags import Bags
from ..nn import MILOutput, build_model

__all__ = ["METHODS", "Method", "StepContext", "StepOutput", "build_method", "get_method", "method_config",
           "model_objective", "register_method"]


@dataclass(frozen=True)
class StepContext:
    """Where a training step is: ``epoch``, ``step`` within it, the totals, and the supervised loss: the class
    weights of cross-entropy (``[C]`` on the step's device, or None), or a task's own ``loss_fn(logits, bags)``
    (``task: survival``: the censored NLL over the step's patients) logged under ``loss_name``.

    ``step_applied`` (set by the stepper for :meth:`Method.after_optimizer_step` only): None when the optimiser
    step certainly ran, else a 0-dim bool tensor on the step's device, False when fp16 loss scaling skipped the
    step (overflowing gradients). A device value, so that deciding costs no host synchronisation: post-step
    updates (EMA teachers, query updates) apply it with device arithmetic."""

    epoch: int
    step: int
    steps_per_epoch: int
    epochs: int
    seed: int
    class_weight: torch.Tensor | None = None
    loss_fn: Callable[[torch.Tensor, Bags], torch.Tensor] | None = None
    loss_name: str = "ce"
    step_applied: torch.Tensor | None = None

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def progress(self) -> float:
        """Fraction of the whole run done before this step, in [0, 1)."""
        return self.global_step / max(1, self.epochs * self.steps_per_epoch)

    def supervised_loss(self, logits: torch.Tensor, bags: Bags) -> torch.Tensor:
        """The label loss of the step's bag logits ``[B, C]``: ``loss_fn`` when set, else the (class-weighted)
        cross-entropy against ``bags.labels``. Every method uses this for its label terms, so each works for
        every task."""
        if self.loss_fn is not None:
            return self.loss_fn(logits, bags)
        if bags.labels is None:
            raise ValueError(f"training step without labels (slides {bags.ids[:3]}...)")
        logits = logits if logits.dtype == torch.float64 else logits.float()  # at least fp32 (bf16 under autocast)
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        return F.cross_entropy(logits, bags.labels, weight=weight)


@dataclass
class StepOutput:
    """A training step's scalar ``loss`` (what is differentiated) and its named ``terms`` (logged per epoch as
    ``train_<name>``: e.g. ``ce``, ``consistency``, ``recon``; scalars, detached by the trainer)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def model_objective(model: nn.Module, out: MILOutput, bags: Bags,
                    ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The supervised loss of one forward pass ``out`` of ``model`` and its named terms (detached).

    A model with its own published objective defines ``objective(out, bags, ctx)`` -> ``{name: (weight, loss)}``
    (DSMIL: bag and max-instance label losses; CLAM: the bag loss and the instance clustering loss); the loss is
    the weighted sum and each unweighted term is logged (the term ``"ce"`` under ``ctx.loss_name``). Any other
    model: ``ctx.supervised_loss(out.logits, bags)`` alone."""
    objective = getattr(model, "objective", None)
    weighted = {"ce": (1.0, ctx.supervised_loss(out.logits, bags))} if objective is None else objective(out, bags, ctx)
    loss = sum(weight * value for weight, value in weighted.values())
    terms = {(ctx.loss_name if name == "ce" else name): value.detach() for name, (_, value) in weighted.items()}
    return loss, terms


class Method(nn.Module):
    """Base class of training methods; subclasses set ``Config`` and implement :meth:`training_step`.

    Args:
        model: the model this method trains and predicts with (``forward_all`` -> :class:`MILOutput`).
        config: this method's ``Config`` instance.
    """

    Config: ClassVar[type]
    name: ClassVar[str] = ""
    default_model: ClassVar[str] = "abmil"
    """The model a config gets when its ``model:`` section names none (SRMIL: its spatial network)."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__()
        self.model = model
        self.config = config

    @classmethod
    def from_config(cls, config: Any, model_config: Any, in_dim: int, n_classes: int) -> Method:
        """Build the method and its model from their config sections (override to build teachers etc.)."""
        return cls(build_model(model_config, in_dim, n_classes), config)

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        """Loss of one optimiser step on a packed batch with labels."""
        raise NotImplementedError

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Called after every optimiser step (default: nothing), also after one that fp16 loss scaling skipped:
        an update that must follow only real steps applies ``ctx.step_applied`` (a device value, no host read)."""

    def predict(self, bags: Bags) -> MILOutput:
        """Inference outputs (logits, attention, bag embedding) of the model this method predicts with."""
        return self.model.forward_all(bags)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (default: the model's)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def neighbour_radius(self) -> int | None:
        """Radius of the spatial stencil table the model reads from each batch (None: no graph); loaders attach
        the cached tables of this radius to every batch."""
        return getattr(self.model, "neighbour_radius", None)


def _check_method(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"{cls!r} is not a fastmil.methods.Method")


METHODS: Registry = Registry("method", default="plain", required=("from_config", "training_step"))

M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`Method` subclass available as ``method.name: <name>`` in configs."""
    register = METHODS.register(name, _check_method)

    def wrap(cls: M) -> M:
        register(cls)
        cls.name = name
        return cls

    return wrap


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    return METHODS.get(name)


def method_config(data: Mapping[str, Any] | None) -> Any:
    """The ``method:`` config section as the chosen method's ``Config`` (default method: ``plain``)."""
    return METHODS.config(data)


def build_method(method_cfg: Any, model_cfg: Any, in_dim: int, n_classes: int) -> Method:
    """Instantiate the method described by ``method_cfg`` around the model described by ``model_cfg``."""
    return get_method(method_cfg.name).from_config(method_cfg, model_cfg, in_dim, n_classes)

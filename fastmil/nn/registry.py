"""Model registry: ``model: {name: ..., ...}`` in a training config picks a class registered here.

A model class registers itself with :func:`register_model`; it carries a ``Config`` dataclass (its config
section, with a ``name`` field) and ``from_config(config, in_dim, n_classes)``. Users add their own models the
same way; every model returns :class:`fastmil.nn.MILOutput` from ``forward_all``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from .._registry import Registry

__all__ = ["MODELS", "build_model", "model_config", "register_model"]

MODELS: Registry = Registry("model", default="abmil", required=("from_config", "forward_all"))

M = TypeVar("M", bound=type)


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model available as ``model.name: <name>`` in configs."""
    return MODELS.register(name)


def model_config(data: Mapping[str, Any] | None) -> Any:
    """The ``model:`` config section as the chosen model's ``Config`` (default model: ``abmil``)."""
    return MODELS.config(data)


def build_model(config: Any, in_dim: int, n_classes: int) -> nn.Module:
    """Instantiate the model described by ``config`` (a registered model's ``Config``)."""
    return MODELS.get(config.name).from_config(config, in_dim, n_classes)

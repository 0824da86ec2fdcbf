"""Model registry: ``model: {name: ..., ...}`` in a training config picks a class registered here.

A model class registers itself with :func:`register_model`; it carries a ``Config`` dataclass (its config
section, with a ``name`` field) and ``from_config(config, in_dim, n_classes)``. Users add their own models the
same way; every model returns :class:`fastmil.nn.MILOutput` from ``forward_all``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from .._config import ConfigError, build, suggest

__all__ = ["MODELS", "build_model", "model_config", "register_model"]

MODELS: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type)


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model available as ``model.name: <name>`` in configs."""

    def wrap(cls: M) -> M:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"a model named {name!r} is already registered ({MODELS[name].__qualname__})")
        for needed in ("Config", "from_config", "forward_all"):
            if not hasattr(cls, needed):
                raise TypeError(f"model {cls.__qualname__} must define {needed}")
        MODELS[name] = cls
        return cls

    return wrap


def model_config(data: Mapping[str, Any] | None) -> Any:
    """The ``model:`` config section as the chosen model's ``Config`` (default model: ``abmil``)."""
    data = dict(data or {})
    name = str(data.get("name", "abmil"))
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}{suggest(name, MODELS)}; registered: {sorted(MODELS)}")
    data["name"] = name
    return build(MODELS[name].Config, data, "model")


def build_model(config: Any, in_dim: int, n_classes: int) -> nn.Module:
    """Instantiate the model described by ``config`` (a registered model's ``Config``)."""
    return MODELS[config.name].from_config(config, in_dim, n_classes)

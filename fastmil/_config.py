"""Typed dataclass configs from plain mappings (YAML, CLI ``key=value``), with clear errors.

``build(cls, data, where)`` converts every value to the field's declared type (``lr: 2e-4`` is a *string* to
PyYAML and becomes a float here), rejects unknown keys with a "did you mean" suggestion, and lets the dataclass
validate itself in ``__post_init__``. Used by the training config, the model configs and the method configs.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "build", "closest", "coerce", "read_yaml_mapping", "suggest", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key (``section.key``)."""


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: ``{}``); ``ConfigError`` naming the file when it is not valid
    YAML or not a mapping (``what`` says what the file should be, e.g. "a training config")."""
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a mapping of key: value, got {type(data).__name__}")
    return data


def closest(key: str, known: Iterable[str]) -> str | None:
    """The known key most like ``key`` (a typo), or None."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or an empty string."""
    match = closest(key, known)
    return f" (did you mean {match!r}?)" if match else ""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
    return False, tp


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the type ``tp`` (int, float, bool, str, Optional, Literal, list/tuple of those)."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            hint = suggest(str(value), map(str, choices))
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if inner is Any:
        return value
    raise TypeError(f"{where}: unsupported config type {inner!r}")


def build(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Instantiate the dataclass ``cls`` from ``data``: unknown keys are an error with a suggestion, values are
    converted to the declared field types, and ``__post_init__`` validates; every error names ``where.key``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{where}: unknown key {key!r}{suggest(str(key), fields)}; known keys: {sorted(fields)}")
    values = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts/lists, for YAML and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj

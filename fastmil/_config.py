"""Typed dataclass configs from plain mappings (YAML, CLI ``key=value``), with clear errors.

``build(cls, data, where)`` converts every value to the field's declared type (``lr: 2e-4`` is a *string* to
PyYAML and becomes a float here), rejects unknown keys with a "did you mean" suggestion, and lets the dataclass
validate itself in ``__post_init__``. Used by the training config, the model configs and the method configs.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "build", "closest", "coerce", "read_yaml_mapping", "short_repr", "suggest", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key (``section.key``)."""


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused unread (configs are a few kB)."""
MAX_CONFIG_NODES = 100_000
"""Values in a config once YAML aliases are expanded: a few dozen aliases can otherwise stand for 10^9 values."""
MAX_CONFIG_DEPTH = 32

_SHORT = reprlib.Repr()  # attributes, not keywords: Python 3.11's Repr takes none
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 6


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a line (nested and long values elided), for error messages."""
    return _SHORT.repr(value)


def _expanded_size(value: Any, depth: int, memo: dict[int, int], where: str) -> int:
    """Values in ``value`` with every shared (aliased) node counted once per use, computed once per node."""
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key not in memo:
        children = value.values() if isinstance(value, dict) else value
        memo[key] = 1 + sum(_expanded_size(v, depth + 1, memo, where) for v in children)
    return memo[key]


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: ``{}``); ``ConfigError`` naming the file when it is not valid
    YAML or not a mapping (``what`` says what the file should be, e.g. "a training config"), and when it is larger
    than :data:`MAX_CONFIG_BYTES`, nests deeper than :data:`MAX_CONFIG_DEPTH` or its aliases expand to more than
    :data:`MAX_CONFIG_NODES` values (an "alias bomb")."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes; {what} is at most {MAX_CONFIG_BYTES} bytes")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({short_repr(str(exc))})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} must be a mapping of key: value, got {type(data).__name__}")
    try:
        nodes = _expanded_size(data, 0, {}, str(path))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if nodes > MAX_CONFIG_NODES:
        raise ConfigError(f"{path}: its YAML aliases expand to {nodes} values (at most {MAX_CONFIG_NODES}); "
                          "write the values out")
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
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {short_repr(value)}{hint}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}") from None
            if number.is_integer():
                return int(number)
        raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {short_repr(value)}") from None
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        if not math.isfinite(number):  # `lr: .inf` trained to NaN and failed in scikit-learn
            raise ConfigError(f"{where}: must be a finite number, got {short_repr(value)}")
        return number
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
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
        raise ConfigError(f"{where}: unknown key {short_repr(key)}{suggest(str(key)[:200], fields)}; "
                          f"known keys: {sorted(fields)}")
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

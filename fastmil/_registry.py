"""A name -> class registry with its config section: what ``model:`` and ``method:`` choose from."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from ._config import ConfigError, build, short_repr, suggest

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes registered by name; each carries a ``Config`` dataclass (its config section, with a ``name``).

    Args:
        kind: what is registered ("model", "method"): the config section and the word in error messages.
        default: the name used when a config section gives none.
        required: attributes every registered class must have.
    """

    def __init__(self, kind: str, default: str, required: tuple[str, ...]) -> None:
        self.kind, self.default, self.required = kind, default, ("Config", *required)
        self.entries: dict[str, T] = {}

    def register(self, name: str, check: Callable[[T], None] | None = None) -> Callable[[T], T]:
        """Class decorator: make the class available as ``<kind>.name: <name>`` in configs."""

        def wrap(cls: T) -> T:
            if check is not None:
                check(cls)
            if name in self.entries and self.entries[name] is not cls:
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({self.entries[name].__qualname__})")
            missing = [attr for attr in self.required if not hasattr(cls, attr)]
            if missing:
                raise TypeError(f"{self.kind} {cls.__qualname__} must define {', '.join(missing)}")
            self.entries[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> T:
        if not isinstance(name, str):  # a YAML mapping or list (an alias bomb) must not be formatted whole
            raise ConfigError(f"{self.kind}.name: must be a string, got a {type(name).__name__} "
                              f"({short_repr(name)})")
        if name not in self.entries:
            raise ConfigError(f"{self.kind}.name: unknown {self.kind} {name!r}{suggest(name, self.entries)}; "
                              f"registered: {sorted(self.entries)}")
        return self.entries[name]

    def config(self, data: Mapping[str, Any] | None) -> Any:
        """The ``<kind>:`` config section as the chosen class's ``Config`` (the default class without a name)."""
        data = dict(data or {})
        name = data.get("name", self.default)
        self.get(name)  # a string naming a registered class, before anything formats it
        data["name"] = name
        return build(self.get(name).Config, data, self.kind)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

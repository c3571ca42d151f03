"""Name -> function tables, so that a config string selects a loss variant.

Adding a variant is one function and one ``@REGISTRY.register("name")`` line; the config, the
command line and the error message for a typo all pick it up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A table of named functions of one kind (e.g. "preference loss").

    Args:
        kind: what the entries are, used in error messages.
        field: the config field that selects an entry (named in errors), e.g. ``"loss_type"``.
    """

    def __init__(self, kind: str, field: str | None = None) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, F] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator registering a function under ``name`` (and optional older ``aliases``)."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ConfigError(f"{self.kind} '{key}' is registered twice", fix="choose a different name")
            self._entries[name] = fn
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return decorator

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` (possibly an alias) stands for."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = ", ".join(repr(n) for n in self.names())
        raise ConfigError(
            f"unknown {self.kind} {name!r}; known: {known}",
            field=self.field,
            fix=f"use one of {known}",
        )

    def get(self, name: str) -> F:
        """The function registered as ``name``; raises ConfigError listing the known names."""
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names, in registration order (aliases excluded)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

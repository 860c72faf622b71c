"""Implementations by name, for a policy setting that picks one (``state.backend``,
``audit.backend``). Entries are ``"module:function"`` strings imported on first use, so an
implementation's driver (psycopg…) loads only for the policies that name it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import PolicyError

__all__ = ["Registry"]


class Registry:
    def __init__(self, setting: str, what: str, entries: dict[str, str | Callable[..., Any]]
                 ) -> None:
        self.setting = setting  # e.g. "state.backend", for the error messages
        self.what = what        # e.g. "backend"
        self._entries = dict(entries)

    def register(self, name: str, opener: str | Callable[..., Any]) -> None:
        self._entries[name] = opener

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str) -> Callable[..., Any]:
        """The opener for ``name``; an unknown or unimportable one is a policy error."""
        opener = self._entries.get(name)
        if opener is None:
            raise PolicyError(f"{self.setting}: unknown {self.what} {name!r} "
                              f"(one of {', '.join(self.names())})")
        if isinstance(opener, str):
            module, _, attr = opener.partition(":")
            try:
                opener = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise PolicyError(f"{self.setting}: {self.what} {name!r} is not available: "
                                  f"{exc}") from exc
            assert callable(opener)
        return opener

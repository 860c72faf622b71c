"""Backends by name: ``state.backend`` in the policy picks one (DESIGN.md §10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..plugins import Registry

if TYPE_CHECKING:
    from ..policy import Policy
    from .protocol import Store

__all__ = ["backends", "open_store", "register_backend"]

Opener = Callable[["Policy"], "Store"]

_BACKENDS = Registry("state.backend", "backend", {
    "diskcache": "authority_sdk.store.disk:open_for_policy",
    "postgres": "authority_sdk.store.postgres:open_for_policy",
})


def register_backend(name: str, opener: str | Opener) -> None:
    """Make ``state.backend: <name>`` open a store with ``opener(policy)``."""
    _BACKENDS.register(name, opener)


def backends() -> list[str]:
    return _BACKENDS.names()


def open_store(policy: Policy) -> Store:
    """The store the policy names. Fails closed: an unreachable backend raises
    ``AuthorityUnavailable``; an unknown name is a policy error."""
    store: Store = _BACKENDS.resolve(policy.state.backend)(policy)
    return store

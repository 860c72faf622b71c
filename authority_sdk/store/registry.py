"""Backends by name: ``state.backend`` in the policy picks one (DESIGN.md §10)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PolicyError

if TYPE_CHECKING:
    from ..policy import Policy
    from .protocol import Store

__all__ = ["backends", "open_store", "register_backend"]

Opener = Callable[["Policy"], "Store"]

# name -> "module:function"; imported on first use, so a backend's driver (psycopg…)
# is only loaded by the policies that name it.
_BACKENDS: dict[str, str | Opener] = {
    "diskcache": "authority_sdk.store.disk:open_for_policy",
    "postgres": "authority_sdk.store.postgres:open_for_policy",
}


def register_backend(name: str, opener: str | Opener) -> None:
    """Make ``state.backend: <name>`` open a store with ``opener(policy)``."""
    _BACKENDS[name] = opener


def backends() -> list[str]:
    return sorted(_BACKENDS)


def open_store(policy: Policy) -> Store:
    """The store the policy names. Fails closed: an unreachable backend raises
    ``AuthorityUnavailable``; an unknown name is a policy error."""
    name = policy.state.backend
    opener = _BACKENDS.get(name)
    if opener is None:
        raise PolicyError(f"state.backend: unknown backend {name!r} "
                          f"(one of {', '.join(backends())})")
    if isinstance(opener, str):
        module, _, attr = opener.partition(":")
        try:
            opener = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PolicyError(f"state.backend: backend {name!r} is not available: {exc}") from exc
        assert callable(opener)
    return opener(policy)

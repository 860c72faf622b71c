"""Run a sync backend's primitives as coroutines, inline on the event loop.

For a local backend (diskcache: SQLite calls of tens of microseconds) a hop to
a worker thread costs more than the call and, under load, waits for the GIL.
A backend on the network provides its own ``aio`` on an async pool instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["InlineAsync"]


class InlineAsync:
    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        fn = getattr(self._target, name)
        if not callable(fn):
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        call.__name__ = name
        return call

"""Group commit for a local store's writes on the async driver.

A keyed, budgeted request writes the state store four times (claim, reservation, settle,
finish), each a SQLite transaction synced to disk. Run inline, every one of those syncs
stopped the proxy's event loop, one request after another. Here the writes of one
database that arrive together run in ONE transaction, off the loop, with one sync: each
write is the store's own method, nested in the batch's transaction (diskcache nests
``transact()``), so its read-check-write is exactly as atomic as alone, and each caller
continues only once the transaction holding its write has committed — durable, as before
(the batch is synced when any write it carries must be: ``DiskStore._UNFLUSHED`` names the
few that need not). What the callers share is the sync and the lock.

A write that raises (a corrupt record, a bad argument) fails only its own caller; it
raises before it writes (every method checks, then sets). A failed commit (disk full, the
lock timing out) fails every caller of the batch, and none of their writes happened.
Reads and rare writes stay inline (``InlineAsync``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..group_commit import Batches, settle_future, uninterrupted
from .inline import InlineAsync

__all__ = ["GroupedAsync"]

# A write: the store's method and its arguments.
_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
# (method name, its keyword arguments) -> must this write be on disk before its caller
# goes on? A batch is synced when any write it carries must be.
Flushes = Callable[[str, dict[str, Any]], bool]


def _always(name: str, kwargs: dict[str, Any]) -> bool:
    return True


class _Group(Batches[_Call]):
    """The batches of one database, on one event loop: each runs in one transaction of the
    store, off the loop."""

    def __init__(self, transact: Callable[[bool], Any], loop: asyncio.AbstractEventLoop,
                 flushes: Flushes = _always) -> None:
        super().__init__(loop)
        self.transact = transact
        self.flushes = flushes

    async def _flush(self, batch: list[tuple[_Call, asyncio.Future[Any]]]) -> None:
        outcomes = await asyncio.to_thread(self._run, [call for call, _ in batch])
        self.batches += 1
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            settle_future(future, **({"result": value} if ok else {"exc": value}))

    def _run(self, calls: list[_Call]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        durable = any(self.flushes(fn.__name__, kwargs) for fn, _, kwargs in calls)
        with self.transact(durable):
            for fn, args, kwargs in calls:
                try:
                    outcomes.append((True, fn(*args, **kwargs)))
                except Exception as exc:
                    outcomes.append((False, exc))
        return outcomes


class GroupedAsync(InlineAsync):
    """``store.aio`` of a local store: the methods in ``grouped`` (name → the transaction
    of the database they write, given whether the batch must be synced) batched per event
    loop; every other method inline."""

    # A lone request (Runtime.in_flight) calls the store directly: with nobody to share a
    # sync with or keep waiting, the hop to a thread would only add its latency.
    inline_when_alone = True

    def __init__(self, target: Any, grouped: Mapping[str, Callable[[bool], Any]], *,
                 flushes: Flushes = _always) -> None:
        super().__init__(target)
        self._grouped = dict(grouped)
        self._flushes = flushes
        self._groups: dict[tuple[int, int], _Group] = {}

    def group_batches(self) -> int:
        """How many committed batches carried grouped writes (tests and diagnostics)."""
        return sum(g.batches for g in self._groups.values())

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        transact = self._grouped.get(name)
        if transact is None:
            return super().__getattr__(name)
        fn = getattr(self._target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            key = (id(loop), id(transact))
            group = self._groups.get(key)
            if group is None or group.loop is not loop:
                self._forget_closed_loops()
                group = self._groups[key] = _Group(transact, loop, self._flushes)
            return await uninterrupted(group.submit((fn, args, kwargs)))

        call.__name__ = name
        return call

    def _forget_closed_loops(self) -> None:
        # An SDK app may run one asyncio.run after another: their groups are done.
        for key in [k for k, g in self._groups.items() if g.loop.is_closed()]:
            del self._groups[key]

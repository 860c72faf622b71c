"""Group commit for the async driver: many requests' writes, one write and one sync.

``Batches`` is the queue every group commit shares (the audit log's here, the state
stores' in ``store/batched.py`` and ``store/postgres.py``); ``GroupCommit`` is the audit
log's.

With the audit log synced on every append, a proxy under load spends its time waiting on
the disk one request after another, on its event loop. Here each request queues its
entries and awaits them; one writer, off the loop, takes everything queued so far and
appends it with the sink's ``append_many`` (one write, one sync), then answers every
waiter with its own entries. A request still continues only once its own entries are
durable, so the record comes before the effect exactly as with a direct append; what it
shares is the sync.

An entry refused before anything is written (malformed) fails only its own request: the
batch is tried again request by request. A failure of the write or the sync fails every
request in the batch, as it would have failed each of them alone; none is retried here,
since a retry could duplicate what reached the file (the engine parks what it could not
record, as for a direct append).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import Any, Generic, TypeVar

from .errors import AuthorityUnavailable

__all__ = ["Batches", "GroupCommit", "settle_future", "uninterrupted"]

Items = list[tuple[str, dict[str, Any]]]
T = TypeVar("T")


class Batches(abc.ABC, Generic[T]):
    """One event loop's writes that go out together (the audit log's here, the state
    stores' in ``store/batched.py`` and ``store/postgres.py``): whatever is queued while a
    batch is out goes in the next one (at most ``max_items``), drained by one task.

    ``_flush`` writes a batch and answers each of its waiters (``settle_future``). If it
    raises, every waiter of the batch not yet answered gets the error; if the drain is
    cancelled, they and everything queued behind them get ``cancelled()`` (fail closed:
    nobody waits for a write that will never be made).
    """

    max_items = 0  # 0: everything queued

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: list[tuple[T, asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self.batches = 0  # how many writes carried the items (tests and diagnostics)

    @property
    def busy(self) -> bool:
        """A batch is being written or waits to be."""
        return self.task is not None

    def submit(self, item: T) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.queue.append((item, future))
        if self.task is None:
            self.task = self.loop.create_task(self._drain())
        return future

    @abc.abstractmethod
    async def _flush(self, batch: list[tuple[T, asyncio.Future[Any]]]) -> None:
        """Write ``batch`` and answer each of its waiters."""

    def cancelled(self) -> Exception:
        return AuthorityUnavailable("state store unavailable: the batch was cancelled")

    async def _drain(self) -> None:
        try:
            while self.queue:
                n = self.max_items or len(self.queue)
                batch = self.queue[:n]
                del self.queue[:n]
                try:
                    await self._flush(batch)
                except BaseException as exc:
                    failure = exc if isinstance(exc, Exception) else self.cancelled()
                    for _, future in batch:
                        settle_future(future, exc=failure)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self.task = None
            if self.queue and not self.loop.is_closed():  # queued while cancelled
                for _, future in self.queue:
                    settle_future(future, exc=self.cancelled())
                self.queue.clear()


async def uninterrupted(future: asyncio.Future[Any]) -> Any:
    """A batched write's result; a caller cancelled meanwhile is cancelled only once its
    write has landed or failed, as a write of its own could not be interrupted halfway:
    the cleanup that follows the cancellation (releasing a claim, a reservation) sees it."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if not future.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(future)
        raise


class GroupCommit(Batches[Items]):
    """An awaitable ``append_many`` over a sync audit sink, for one event loop."""

    def __init__(self, sink: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.sink = sink

    async def append_many(self, items: Items) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.submit(items)
        return result

    def cancelled(self) -> Exception:
        return AuthorityUnavailable("audit log unavailable: the append was cancelled")

    async def _flush(self, batch: list[tuple[Items, asyncio.Future[Any]]]) -> None:
        everything = [item for items, _ in batch for item in items]
        on_loop = getattr(self.sink, "aappend_many", None)
        try:
            # A sink that can append on this loop (PostgreSQL: the state store's pool)
            # saves the hop to a thread and back; None from it: the thread's way.
            fast = await on_loop(everything) if on_loop is not None else None
            entries: list[dict[str, Any]] = fast if fast is not None else \
                await asyncio.to_thread(self.sink.append_many, everything)
        except (ValueError, TypeError) as exc:
            # Refused while the entries were prepared, before anything was written: one
            # request's malformed entry must not fail the others.
            if len(batch) == 1:
                settle_future(batch[0][1], exc=exc)
            else:
                for one in batch:
                    await self._flush([one])
            return
        except Exception as exc:
            # The log could not take the write (or its sync): nothing here is durable, and
            # trying again might duplicate what did reach the file. Every waiter is told.
            for _, future in batch:
                settle_future(future, exc=exc)
            return
        self.batches += 1
        start = 0
        for items, future in batch:
            settle_future(future, result=entries[start:start + len(items)])
            start += len(items)


def settle_future(future: asyncio.Future[Any], *, result: Any = None,
                  exc: Exception | None = None) -> None:
    """Answer one waiter of a batch (unless its request was cancelled meanwhile)."""
    if future.done():  # its request was cancelled (the client went away)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

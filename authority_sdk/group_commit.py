"""Group commit for the async driver: many requests' audit entries, one write and one sync.

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

import asyncio
from typing import Any

__all__ = ["GroupCommit", "settle_future"]

Items = list[tuple[str, dict[str, Any]]]


class GroupCommit:
    """An awaitable ``append_many`` over a sync audit sink, for one event loop."""

    def __init__(self, sink: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.sink = sink
        self.loop = loop
        self._queue: list[tuple[Items, asyncio.Future[list[dict[str, Any]]]]] = []
        self._writing = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many writes carried the entries (for tests and metrics)

    @property
    def busy(self) -> bool:
        """A batch is being written or waits to be (an inline append would queue behind
        it on the sink's lock, blocking the loop meanwhile)."""
        return self._writing

    async def append_many(self, items: Items) -> list[dict[str, Any]]:
        future: asyncio.Future[list[dict[str, Any]]] = self.loop.create_future()
        self._queue.append((items, future))
        if not self._writing:
            self._writing = True
            # Held here: the loop keeps only a weak reference to a task, and a writer
            # collected mid-batch would leave every waiter hanging.
            self._task = self.loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._write(batch)
        finally:
            self._writing = False

    async def _write(self, batch: list[tuple[Items, asyncio.Future[list[dict[str, Any]]]]]
                     ) -> None:
        everything = [item for items, _ in batch for item in items]
        try:
            entries = await asyncio.to_thread(self.sink.append_many, everything)
        except (ValueError, TypeError) as exc:
            # Refused while the entries were prepared, before anything was written: one
            # request's malformed entry must not fail the others.
            if len(batch) == 1:
                settle_future(batch[0][1], exc=exc)
            else:
                for one in batch:
                    await self._write([one])
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
    """Answer one waiter of a batch (also the store's batches, ``store/batched.py``)."""
    if future.done():  # its request was cancelled (the client went away)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)

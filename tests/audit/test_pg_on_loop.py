"""The PostgreSQL audit table's append awaited on the event loop (``aappend_many``, through
the audit group commit): one chain whatever mixes with it — many requests at once, a
thread appending synchronously, another replica appending in between, the database lost
mid-way — and nothing written when it steps aside."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from helpers import PostgresBackend, requires_postgres
from servers import TcpRelay

from authority_sdk.audit.postgres import PgAuditSink
from authority_sdk.audit.verify import verify_sink
from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.group_commit import GroupCommit
from authority_sdk.store.postgres import PgStore

pytestmark = requires_postgres()


def _sink(store: Any) -> PgAuditSink:
    """An audit sink whose head is ``store`` in the same database (the default layout)."""
    return PgAuditSink(store.dsn, head=store).open()


def _entry(i: int, who: str = "loop") -> tuple[str, dict[str, Any]]:
    return ("request", {"request_id": f"req_{who}_{i}", "environment": "prod",
                        "decision": "allow", "actor": who, "details": {"i": i}})


def _counting(sink: PgAuditSink) -> dict[str, int]:
    """How many appends went out on the loop, and how many it handed to the thread."""
    seen = {"on_loop": 0, "stepped_aside": 0}
    real = sink.aappend_many

    async def aappend_many(items: Any) -> Any:
        got = await real(items)
        seen["on_loop" if got is not None else "stepped_aside"] += 1
        return got

    sink.aappend_many = aappend_many  # type: ignore[method-assign]
    return seen


def test_concurrent_requests_and_a_thread_share_one_chain(pg: PostgresBackend) -> None:
    store = pg.open()
    sink = _sink(store)
    seen = _counting(sink)
    try:
        def sync_appends() -> None:
            for i in range(40):
                sink.append_many([_entry(i, "thread")])

        async def main() -> list[list[dict[str, Any]]]:
            group = GroupCommit(sink, asyncio.get_running_loop())
            thread = threading.Thread(target=sync_appends)
            thread.start()
            got: list[list[dict[str, Any]]] = []
            for wave in range(6):  # while the thread appends, then after it is done
                if wave == 5:
                    await asyncio.to_thread(thread.join)
                got += await asyncio.gather(*(
                    group.append_many([_entry(i), _entry(i, "loop2")])
                    for i in range(wave * 20, wave * 20 + 20)))
            await store.aio.aclose()
            return got

        answers = asyncio.run(main())
        result = verify_sink(sink)
    finally:
        sink.close()
        store.close()
    assert result.ok and result.entries == 40 + 240 and not result.losses, result
    # Each request got its own two entries back, in order, contiguous.
    for i, entries in enumerate(answers):
        assert [e["request_id"] for e in entries] == [f"req_loop_{i}", f"req_loop2_{i}"]
        assert entries[1]["seq"] == entries[0]["seq"] + 1
    assert seen["on_loop"] > 0


def test_another_replica_in_between_sends_it_the_full_way_and_nothing_is_lost(
        pg: PostgresBackend) -> None:
    store, other_store = pg.open(), pg.open()
    sink, other = _sink(store), _sink(other_store)
    seen = _counting(sink)
    try:
        async def main() -> None:
            group = GroupCommit(sink, asyncio.get_running_loop())
            for i in range(6):
                await group.append_many([_entry(i)])
                if i % 2 == 0:
                    # The other replica appends: this process's idea of the last entry is
                    # stale, the one statement writes nothing, the thread takes over.
                    await asyncio.to_thread(other.append_many, [_entry(i, "other")])
            await store.aio.aclose()

        asyncio.run(main())
        result = verify_sink(sink)
    finally:
        sink.close()
        other.close()
        store.close()
        other_store.close()
    assert result.ok and result.entries == 9 and not result.losses, result
    assert seen["stepped_aside"] >= 2 and seen["on_loop"] >= 1, seen


def test_the_database_lost_mid_way_fails_closed_then_the_chain_goes_on(
        pg: PostgresBackend) -> None:
    with TcpRelay("127.0.0.1", 5432) as relay:
        store = PgStore(pg.dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        sink = _sink(store)
        seen = _counting(sink)
        try:
            async def main() -> None:
                group = GroupCommit(sink, asyncio.get_running_loop())
                await group.append_many([_entry(0)])
                relay.cut()
                with pytest.raises(AuthorityUnavailable, match="audit log unavailable"):
                    await group.append_many([_entry(1)])
                relay.restore()
                deadline = time.monotonic() + 15
                while True:  # the pool reconnects on its own
                    try:
                        await group.append_many([_entry(2)])
                        break
                    except AuthorityUnavailable:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.2)
                await store.aio.aclose()

            asyncio.run(main())
            result = verify_sink(sink)
            rows = [r.entry["request_id"] for r in sink.records() if r.entry is not None]
        finally:
            sink.close()
            store.close()
    # The lost append wrote nothing; the chain goes on from the last entry it holds.
    assert result.ok and not result.losses, result
    assert rows == ["req_loop_0", "req_loop_2"]
    assert seen["on_loop"] >= 1

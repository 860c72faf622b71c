"""Group commit: concurrent requests' audit entries share one write and one sync; each
request continues only with its own entries durable, and one bad entry fails only its own
request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from authority_sdk.audit import AuditLog, verify
from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.group_commit import GroupCommit


def _items(i: int) -> list[tuple[str, dict[str, Any]]]:
    return [("request", {"request_id": f"req_{i}", "decision": "allow"}),
            ("action", {"request_id": f"req_{i}", "decision": "allow",
                        "action_type": "lookup_customer"})]


def test_concurrent_appends_share_syncs_and_each_gets_its_own(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", fsync=True)

    async def main() -> tuple[list[list[dict[str, Any]]], int]:
        group = GroupCommit(log, asyncio.get_running_loop())
        got = await asyncio.gather(*(group.append_many(_items(i)) for i in range(64)))
        return list(got), group.batches

    got, batches = asyncio.run(main())
    log.close()
    assert batches < 64  # the requests queued behind the first write went together
    for i, entries in enumerate(got):
        assert [e["request_id"] for e in entries] == [f"req_{i}"] * 2
        assert entries[1]["seq"] == entries[0]["seq"] + 1  # a request's entries stay together
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().split("\n") if x]
    assert len(lines) == 128 and verify(tmp_path / "audit.jsonl").ok


def test_a_malformed_entry_fails_only_its_own_request(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)

    async def main() -> list[Any]:
        group = GroupCommit(log, asyncio.get_running_loop())
        bad = [("no_such_event", {"decision": "allow"})]
        calls = [group.append_many(bad if i == 3 else _items(i)) for i in range(8)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    log.close()
    assert isinstance(results[3], ValueError)
    assert all(isinstance(r, list) and len(r) == 2 for i, r in enumerate(results) if i != 3)
    assert verify(tmp_path / "audit.jsonl").ok


def test_a_failed_write_fails_every_request_it_carried(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)
    log.append("request", request_id="first", decision="allow")

    def broken(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    async def main() -> list[Any]:
        group = GroupCommit(log, asyncio.get_running_loop())
        monkeypatch.setattr("authority_sdk.audit.file.os.write", broken)
        return await asyncio.gather(*(group.append_many(_items(i)) for i in range(5)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    monkeypatch.undo()
    assert all(isinstance(r, AuthorityUnavailable) for r in results)
    log.append("request", request_id="after", decision="allow")  # the log goes on
    log.close()
    assert [e["request_id"] for e in map(json.loads, (tmp_path / "audit.jsonl").read_text()
                                         .split("\n")[:-1])] == ["first", "after"]
    assert verify(tmp_path / "audit.jsonl").ok


# -- through the engine: who writes, and where ----------------------------------------------


def _record_threads(gateway: Any) -> list[bool]:
    """Each audit append of the gateway: True when it ran on the event loop's thread."""
    import threading

    sink = gateway.runtime.audit
    on_loop: list[bool] = []
    real = sink.append_many
    loop_thread = threading.get_ident()

    def append_many(items: Any) -> Any:
        on_loop.append(threading.get_ident() == loop_thread)
        return real(items)

    sink.append_many = append_many
    return on_loop


def test_a_lone_request_appends_inline_and_concurrent_ones_share_the_writer(
        write_policy: Any) -> None:
    from helpers import user

    from authority_sdk.client import AsyncAuthorityClient
    from authority_sdk.engine import Gateway

    gateway = Gateway(write_policy())

    async def main() -> tuple[list[bool], list[bool]]:
        client = AsyncAuthorityClient(gateway=gateway, max_retries=0)
        on_loop = _record_threads(gateway)
        for i in range(3):  # one after another: nobody to share a sync with
            await client.chat.completions.create(model="gpt-4o-mini",
                                                 messages=user(f"SAY alone {i}"))
        alone = list(on_loop)
        on_loop.clear()
        await asyncio.gather(*(client.chat.completions.create(
            model="gpt-4o-mini", messages=user(f"SAY together {i}")) for i in range(8)))
        await client.close()
        return alone, on_loop

    try:
        alone, together = asyncio.run(main())
    finally:
        gateway.close()
    assert alone == [True, True, True]
    # Concurrent requests went through the writer thread (the first may still go alone).
    assert together.count(False) >= 1 and sum(together) <= 1


def test_an_open_stream_counts_as_in_flight(write_policy: Any) -> None:
    """A stream ends after Engine.ahandle returned: while it is open, another request is
    not alone, so its append goes to the shared writer instead of blocking the loop."""
    from helpers import user

    from authority_sdk.client import AsyncAuthorityClient
    from authority_sdk.engine import Gateway

    gateway = Gateway(write_policy())

    async def main() -> tuple[list[bool], int, int]:
        client = AsyncAuthorityClient(gateway=gateway, max_retries=0)
        on_loop = _record_threads(gateway)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=user("SAY a long answer in pieces"), stream=True)
        chunks = stream.__aiter__()
        await chunks.__anext__()  # the stream is open
        during = gateway.runtime.in_flight
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=user("SAY meanwhile"))
        async for _ in chunks:
            pass
        await client.close()
        return on_loop, during, gateway.runtime.in_flight

    try:
        on_loop, during, after = asyncio.run(main())
    finally:
        gateway.close()
    assert during == 1 and after == 0
    assert on_loop[0] is False  # the plain request, while the stream was open
    assert on_loop[-1] is True  # the stream's own record, alone by then


@pytest.mark.parametrize("audit_backend", ["file", "postgres"])
def test_a_lone_request_never_waits_on_postgres_on_the_loop(
        write_policy: Any, tmp_path: Path, audit_backend: str) -> None:
    """Inline only where nothing of the append leaves the machine: with the state (so the
    file's head) or the audit table in PostgreSQL, the sync append goes through the writer;
    the audit table's common append is awaited on the loop's own pool instead."""
    from helpers import PostgresBackend, user

    from authority_sdk.audit.verify import verify_sink
    from authority_sdk.client import AsyncAuthorityClient
    from authority_sdk.engine import Gateway

    pg = PostgresBackend(tmp_path / "pg")
    try:
        overrides: dict[str, Any] = pg.policy_overrides()
        if audit_backend == "postgres":
            overrides["audit"] = {"backend": "postgres"}
        gateway = Gateway(write_policy(overrides))

        awaited: list[int] = []
        sink = gateway.runtime.audit
        if audit_backend == "postgres":
            real = sink.aappend_many

            async def aappend_many(items: Any) -> Any:
                got = await real(items)
                awaited.append(len(got) if got is not None else -1)
                return got

            sink.aappend_many = aappend_many

        async def main() -> list[bool]:
            client = AsyncAuthorityClient(gateway=gateway, max_retries=0)
            on_loop = _record_threads(gateway)
            for i in range(3):
                await client.chat.completions.create(model="gpt-4o-mini",
                                                     messages=user(f"SAY alone {i}"))
            await client.close()
            return on_loop

        try:
            on_loop = asyncio.run(main())
            verified = verify_sink(sink) if audit_backend == "postgres" else None
        finally:
            gateway.close()
        if audit_backend == "file":
            assert on_loop == [False, False, False]
        else:
            # The first append opens the chain on the writer's thread; then each request's
            # entries go out on the loop's pool, one statement each.
            assert True not in on_loop and len(on_loop) <= 1, on_loop
            assert len(on_loop) + sum(1 for n in awaited if n > 0) == 3, (on_loop, awaited)
            assert verified is not None and verified.ok and verified.entries == 3, verified
    finally:
        pg.cleanup()

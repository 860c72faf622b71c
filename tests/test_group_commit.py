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

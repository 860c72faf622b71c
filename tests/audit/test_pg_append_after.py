"""Store writes that must take effect before audit entries, with them in one statement
(``effects.AuditOp.first``, ``PgAuditSink.aappend_after``): both or — when a write did not
take effect — only the writes; another replica's append in between, and writes the
statement cannot carry, still end with every write made and one whole chain."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import PostgresBackend, requires_postgres

from authority_sdk.audit.postgres import PgAuditSink
from authority_sdk.audit.verify import verify_sink
from authority_sdk.effects import AuditOp, Runtime, S

pytestmark = requires_postgres()

KEY = "idem:app:prod:k-1"


def _entry(i: int, who: str = "loop") -> tuple[str, dict[str, Any]]:
    return ("request", {"request_id": f"req_{who}_{i}", "environment": "prod",
                        "decision": "allow", "actor": who, "details": {"i": i}})


def _claimed(store: Any, claim_id: str = "req_mine") -> dict[str, Any]:
    record = {"claim_id": claim_id, "status": "in_flight", "fingerprint": "f"}
    assert store.idem_claim(KEY, record, ttl_s=600) is None
    return record


def _first(claim_id: str = "req_mine") -> tuple[Any, ...]:
    """The cost's settlement and the checkpoint, as the engine sends them."""
    kept = {"claim_id": claim_id, "status": "in_flight", "fingerprint": "f",
            "answer": {"id": "chatcmpl-1"}}
    return (S.budget_settle(["budget:prod"], reserved=0.5, actual=0.25, ttl_s=3600),
            S.idem_replace(KEY, claim_id, kept, ttl_s=600))


class _Counted:
    """A store whose async view counts the statements sent on its pool."""

    def __init__(self, pg: PostgresBackend) -> None:
        self.store = pg.open()
        self.sent = 0
        real = self.store.aio.on_connection

        async def on_connection(work: Any) -> Any:
            self.sent += 1
            return await real(work)

        self.store.aio.on_connection = on_connection  # type: ignore[method-assign]
        self.sink = PgAuditSink(self.store.dsn, head=self.store).open()
        self.sink.append_many([_entry(0, "opening")])

    def run(self, effect: AuditOp) -> Any:
        rt = Runtime(self.store, self.sink, None)  # type: ignore[arg-type]

        async def main() -> Any:
            try:
                return await rt.aperform(effect)
            finally:
                await self.store.aio.aclose()

        return asyncio.run(main())

    def close(self) -> None:
        self.sink.close()
        self.store.close()


@pytest.fixture
def db(pg: PostgresBackend) -> Iterator[_Counted]:
    counted = _Counted(pg)
    yield counted
    counted.close()


def _reserved(store: Any) -> None:
    """The reservation the settlement of ``_first`` settles (0.5 reserved, 0.25 spent)."""
    store.budget_reserve([("budget:prod", 10.0)], min_usd=0.5, max_usd=0.5, ttl_s=3600)


def _chain_whole(db: _Counted, entries: int) -> None:
    result = verify_sink(db.sink)
    assert result.ok and result.entries == entries and not result.losses, result


def _another_replica_appends(pg: PostgresBackend) -> None:
    """An entry appended by another replica's sink: the chain moves on without us."""
    store = pg.open()
    sink = PgAuditSink(store.dsn, head=store).open()
    try:
        sink.append_many([_entry(1, "other")])
    finally:
        sink.close()
        store.close()


def test_the_writes_and_the_entries_go_in_one_statement(db: _Counted) -> None:
    _reserved(db.store)
    _claimed(db.store)
    outcomes, entries, _ = db.run(AuditOp((_entry(1), _entry(2)), _first()))
    assert outcomes == [(True, None), (True, True)]
    assert [e["request_id"] for e in entries] == ["req_loop_1", "req_loop_2"]
    assert db.sent == 1
    assert db.store.idem_get(KEY)["answer"] == {"id": "chatcmpl-1"}
    assert abs(db.store.budget_used("budget:prod") - 0.25) < 1e-9
    _chain_whole(db, 3)


def test_a_claim_no_longer_ours_keeps_the_entries_out(db: _Counted) -> None:
    """The checkpoint finds the claim gone to a retry: the settlement is made (the cost is
    real), the entries are not written — the caller decides what goes on the record."""
    _reserved(db.store)
    theirs = _claimed(db.store, "req_theirs")
    outcomes, entries, _ = db.run(AuditOp((_entry(1),), _first("req_mine")))
    assert outcomes == [(True, None), (True, False)] and entries is None
    assert db.sent == 1
    assert db.store.idem_get(KEY) == theirs
    assert abs(db.store.budget_used("budget:prod") - 0.25) < 1e-9
    # Nothing of the entry was written, and the sink goes on from where it was.
    db.sink.append_many([_entry(3)])
    _chain_whole(db, 2)


def test_another_replica_in_between_the_writes_stand_the_entries_go_the_full_way(
        db: _Counted, pg: PostgresBackend) -> None:
    _claimed(db.store)
    _another_replica_appends(pg)  # this sink's idea of the last entry is old
    outcomes, entries, _ = db.run(AuditOp((_entry(2),), _first()))
    assert outcomes == [(True, None), (True, True)]
    assert [e["request_id"] for e in entries] == ["req_loop_2"]
    assert db.store.idem_get(KEY)["answer"] == {"id": "chatcmpl-1"}
    _chain_whole(db, 3)


def test_writes_the_statement_cannot_carry_go_first_by_themselves(
        db: _Counted) -> None:
    """A reservation (whose refusal is no failure the statement can see) goes its usual
    way, then the entries."""
    outcomes, entries, _ = db.run(AuditOp((_entry(1),), (
        S.budget_reserve([("budget:prod", 1.0)], min_usd=0.5, max_usd=0.5, ttl_s=3600),)))
    assert outcomes == [(True, 0.5)] and len(entries) == 1
    assert db.sent == 2
    _chain_whole(db, 2)


def test_a_relaxed_log_keeps_its_writes_apart(db: _Counted) -> None:
    """``fsync: false`` relaxes the log's commits: the writes that must be durable before
    the entries do not share them."""
    db.sink.fsync = False
    _claimed(db.store)
    outcomes, entries, _ = db.run(AuditOp((_entry(1),), _first()))
    assert outcomes == [(True, None), (True, True)] and len(entries) == 1
    assert db.sent >= 2


# -- ``then``: writes after the entries, in their transaction --------------------------------


def _then(claim_id: str = "req_mine") -> tuple[Any, ...]:
    """The finished answer, as the engine sends it after the entries."""
    done = {"claim_id": claim_id, "status": "done", "fingerprint": "f",
            "response": {"status_code": 200, "body": "{}"}}
    return (S.idem_replace(KEY, claim_id, done, ttl_s=600, flush=False),)


def test_the_finished_answer_goes_after_the_entries_in_the_same_statement(
        db: _Counted) -> None:
    _reserved(db.store)
    _claimed(db.store)
    outcomes, entries, after = db.run(AuditOp((_entry(1),), _first(), _then()))
    assert outcomes == [(True, None), (True, True)] and after == [(True, True)]
    assert [e["request_id"] for e in entries] == ["req_loop_1"]
    assert db.sent == 1
    assert db.store.idem_get(KEY)["status"] == "done"
    assert abs(db.store.budget_used("budget:prod") - 0.25) < 1e-9
    _chain_whole(db, 2)


def test_without_first_the_entries_then_the_writes_in_one_statement(
        db: _Counted) -> None:
    """An answer without calls: its entry, then its settlement and finished answer."""
    _reserved(db.store)
    _claimed(db.store)
    settle = S.budget_settle(["budget:prod"], reserved=0.5, actual=0.25, ttl_s=3600)
    outcomes, entries, after = db.run(AuditOp((_entry(1),), (), (settle, *_then())))
    assert outcomes == [] and len(entries) == 1 and after == [(True, None), (True, True)]
    assert db.sent == 1
    assert db.store.idem_get(KEY)["status"] == "done"
    assert abs(db.store.budget_used("budget:prod") - 0.25) < 1e-9
    assert verify_sink(db.sink).ok


def test_then_is_not_made_when_the_first_writes_did_not_take_effect(
        db: _Counted) -> None:
    theirs = _claimed(db.store, "req_theirs")
    outcomes, entries, after = db.run(AuditOp((_entry(1),), _first("req_mine"),
                                              _then("req_theirs")))
    assert outcomes[1] == (True, False) and entries is None and after is None
    assert db.sent == 1
    assert db.store.idem_get(KEY) == theirs  # the finished answer was not written


def test_then_is_not_made_when_the_entries_take_the_full_way(db: _Counted,
                                                            pg: PostgresBackend) -> None:
    """Another replica appended in between: the statement writes ``first`` only, the
    entries go their full way after it, and ``then`` — which must never be seen without
    the entries — is left to the caller."""
    _claimed(db.store)
    _another_replica_appends(pg)
    outcomes, entries, after = db.run(AuditOp((_entry(2),), _first(), _then()))
    assert outcomes == [(True, None), (True, True)] and len(entries) == 1
    assert after is None
    held = db.store.idem_get(KEY)
    assert held["status"] == "in_flight" and held["answer"] == {"id": "chatcmpl-1"}
    _chain_whole(db, 3)


def test_a_relaxed_log_leaves_then_to_the_caller(db: _Counted) -> None:
    db.sink.fsync = False
    _claimed(db.store)
    outcomes, entries, after = db.run(AuditOp((_entry(1),), _first(), _then()))
    assert outcomes == [(True, None), (True, True)] and len(entries) == 1
    assert after is None and db.store.idem_get(KEY)["status"] == "in_flight"

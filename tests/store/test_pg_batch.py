"""Group commit of PostgreSQL's state writes on the async driver (schema version 4,
``authority_state_batch``; ``postgres._Batcher``): concurrent writes of one event loop go
out as one statement and one commit, and keep every promise they had alone — one winner
per key over replicas, no limit passed, a failing write fails only its caller, a lost
connection fails the batch and writes nothing, batches of two replicas never deadlock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PG_DSN, PostgresBackend, pg_dsn, requires_postgres, schema_at

from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store import pg_plans

pytestmark = requires_postgres()

TTL = 3600.0


@pytest.fixture
def store(pg_store: Any) -> Any:
    return pg_store


def _batch(dsn: str, *calls: tuple[str, tuple[Any, ...], dict[str, Any]]) -> list[Any]:
    """Run ``calls`` (store method, args, kwargs) as ONE batch statement; their results."""
    import psycopg

    items = [pg_plans.batch_item(m, a, k) for m, a, k in calls]
    assert all(isinstance(i, pg_plans.BatchItem) for i in items)
    order, (sql, params) = pg_plans.state_batch(items)  # type: ignore[arg-type]
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    out: list[Any] = [None] * len(items)
    for j, i in enumerate(order):
        out[i] = items[i].result(row[0][j])  # type: ignore[union-attr]
    return out


def _sql(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


# -- the statement: every rule of the one-item statements ----------------------------------


def test_a_batch_keeps_the_rules_of_each_idempotency_write(store: Any, pg: PostgresBackend
                                                          ) -> None:
    store.idem_claim("old", {"claim_id": "o"}, ttl_s=TTL)
    _sql(pg.dsn, "UPDATE authority_idem SET expires_at = 0 WHERE key = 'old'")  # lapsed
    store.idem_claim("gone", {"claim_id": "g"}, ttl_s=TTL)
    got = _batch(
        pg.dsn,
        ("idem_claim", ("a", {"claim_id": "1", "n": 1}), {"ttl_s": TTL}),
        ("idem_claim", ("a", {"claim_id": "2", "n": 2}), {"ttl_s": TTL}),  # loses to 1
        ("idem_claim", ("old", {"claim_id": "x"}), {"ttl_s": TTL}),  # takes the lapsed row
        ("idem_replace", ("a", "2", {"claim_id": "2"}), {"ttl_s": TTL}),  # not the owner
        ("idem_replace", ("b", "1", {"claim_id": "1"}), {"ttl_s": TTL, "flush": False}),
        ("idem_put", ("p", {"claim_id": "p", "v": True}), {"ttl_s": TTL}),
        ("idem_delete", ("gone", "nope"), {}),
        ("idem_delete", ("old", "o"), {}),  # the lapsed claim is no longer there
    )
    assert got == [None, {"claim_id": "1", "n": 1}, None, False, False, None, False, False]
    assert store.idem_get("a") == {"claim_id": "1", "n": 1}
    assert store.idem_get("old") == {"claim_id": "x"}
    assert store.idem_get("p") == {"claim_id": "p", "v": True}
    assert store.idem_get("gone") == {"claim_id": "g"}
    assert _batch(pg.dsn, ("idem_replace", ("a", "1", {"claim_id": "1", "done": 1}),
                           {"ttl_s": TTL}),
                  ("idem_delete", ("gone", "g"), {})) == [True, True]
    assert store.idem_get("a") == {"claim_id": "1", "done": 1}
    assert store.idem_get("gone") is None


def test_a_batch_keeps_every_rule_of_a_reservation_and_a_settlement(
        store: Any, pg: PostgresBackend) -> None:
    store.budget_reserve([("lapsed", 1.0)], min_usd=1.0, max_usd=1.0, ttl_s=TTL)
    _sql(pg.dsn, "UPDATE authority_counters SET expires_at = 0 WHERE name = 'lapsed'")
    pair = [("env", 1.0), ("key", 5.0)]
    got = _batch(
        pg.dsn,
        ("budget_reserve", (pair,), {"min_usd": 0.4, "max_usd": 0.6, "ttl_s": TTL}),
        ("budget_reserve", (pair,), {"min_usd": 0.4, "max_usd": 0.6, "ttl_s": TTL}),  # 0.4
        ("budget_reserve", (pair,), {"min_usd": 0.1, "max_usd": 0.6, "ttl_s": TTL}),  # full
        ("budget_reserve", ([("d", 1.0), ("d", 0.5)],),
         {"min_usd": 0.1, "max_usd": 1.0, "ttl_s": TTL}),  # one counter named twice
        ("budget_reserve", ([("lapsed", 1.0)],),  # a new period starts at 0
         {"min_usd": 1.0, "max_usd": 1.0, "ttl_s": TTL}),
    )
    assert got[0] == pytest.approx(0.6) and got[1] == pytest.approx(0.4)
    assert got[2] is None and got[3] == pytest.approx(0.5) and got[4] == pytest.approx(1.0)
    assert store.budget_used("env") == pytest.approx(1.0)
    assert store.budget_used("key") == pytest.approx(1.0)
    assert store.budget_used("d") == pytest.approx(0.5)
    assert _batch(
        pg.dsn,
        ("budget_settle", (["env", "key"],), {"reserved": 0.6, "actual": 0.1, "ttl_s": TTL}),
        ("budget_settle", (["d"],), {"reserved": 5.0, "actual": 0.0, "ttl_s": TTL}),  # floor
        ("budget_reserve", (pair,), {"min_usd": 0.5, "max_usd": 0.5, "ttl_s": TTL}),
    ) == [None, None, pytest.approx(0.5)]
    assert store.budget_used("env") == pytest.approx(1.0)
    assert store.budget_used("key") == pytest.approx(1.0)
    assert store.budget_used("d") == 0.0


def test_nothing_to_send_answers_at_once_and_bad_arguments_raise_before_sending(
        store: Any) -> None:
    assert isinstance(pg_plans.batch_item("budget_reserve", ([],), {
        "min_usd": 0.1, "max_usd": 0.2, "ttl_s": TTL}), pg_plans.Done)
    assert isinstance(pg_plans.batch_item("budget_settle", (["x"],), {
        "reserved": 1.0, "actual": 1.0, "ttl_s": TTL}), pg_plans.Done)

    async def main() -> None:
        assert await store.aio.budget_reserve([], min_usd=0.1, max_usd=0.2, ttl_s=TTL) == 0.2
        with pytest.raises(ValueError):
            await store.aio.idem_claim("k", {"claim_id": "1"}, ttl_s=-1)
        with pytest.raises(ValueError):
            await store.aio.budget_reserve([("x", 1.0)], min_usd=0.5, max_usd=0.1, ttl_s=TTL)

    asyncio.run(main())


def test_the_commit_skips_the_wal_flush_only_when_every_item_may(pg: PostgresBackend) -> None:
    import psycopg

    def sync_commit_after(*calls: tuple[str, tuple[Any, ...], dict[str, Any]]) -> str:
        items = [pg_plans.batch_item(m, a, k) for m, a, k in calls]
        _, (sql, params) = pg_plans.state_batch(items)  # type: ignore[arg-type]
        with psycopg.connect(pg.dsn, autocommit=True) as conn, conn.transaction(
                force_rollback=True):
            conn.execute(sql, params)
            row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
            return str(row[0]) if row else ""

    claim = ("idem_claim", ("k", {"claim_id": "1"}), {"ttl_s": TTL})
    lazy = ("idem_replace", ("k", "1", {"claim_id": "1"}), {"ttl_s": TTL, "flush": False})
    settle = ("budget_settle", (["e"],), {"reserved": 1.0, "actual": 0.5, "ttl_s": TTL})
    kept = ("idem_replace", ("k", "1", {"claim_id": "1"}), {"ttl_s": TTL})
    reserve = ("budget_reserve", ([("e", 1.0)],), {"min_usd": 0.1, "max_usd": 0.1,
                                                   "ttl_s": TTL})
    assert sync_commit_after(claim, lazy, settle) == "off"
    assert sync_commit_after(claim, lazy, kept) == "on"
    assert sync_commit_after(claim, reserve) == "on"
    assert sync_commit_after(("idem_put", ("q", {"claim_id": "q"}), {"ttl_s": TTL})) == "on"


# -- the async driver ----------------------------------------------------------------------


def test_concurrent_claims_of_one_key_have_one_winner_in_few_statements(store: Any) -> None:
    async def main() -> list[Any]:
        out = await asyncio.gather(*(
            store.aio.idem_claim("k", {"claim_id": f"c{i}", "status": "in_flight"},
                                 ttl_s=TTL) for i in range(32)))
        await store.aio.aclose()
        return out

    results = asyncio.run(main())
    assert sum(1 for r in results if r is None) == 1
    owner = store.idem_get("k")
    assert owner is not None and all(r == owner for r in results if r is not None)
    assert 0 < store.aio.group_batches() < 32


def test_concurrent_reservations_never_pass_the_limit(store: Any) -> None:
    async def main() -> list[float | None]:
        out = await asyncio.gather(*(
            store.aio.budget_reserve([("env", 10.0), ("key", 100.0)], min_usd=1.0,
                                     max_usd=1.0, ttl_s=TTL) for _ in range(50)))
        await asyncio.gather(*(
            store.aio.budget_settle(["env", "key"], reserved=1.0, actual=0.5, ttl_s=TTL)
            for g in out if g))
        await store.aio.aclose()
        return out

    grants = asyncio.run(main())
    assert sum(1 for g in grants if g) == 10
    assert store.budget_used("env") == pytest.approx(5.0)
    assert store.budget_used("key") == pytest.approx(5.0)
    assert store.aio.group_batches() > 0


def test_a_failing_write_fails_only_its_own_caller(store: Any, pg: PostgresBackend) -> None:
    _sql(pg.dsn, "INSERT INTO authority_idem (key, claim_id, record, expires_at) VALUES "
                 "('bad', '1', '{not json', extract(epoch from clock_timestamp()) + 3600)")

    async def main() -> list[Any]:
        out = await asyncio.gather(
            store.aio.idem_claim("a", {"claim_id": "1"}, ttl_s=TTL),
            store.aio.idem_claim("bad", {"claim_id": "2"}, ttl_s=TTL),  # a corrupt record
            store.aio.idem_claim("nul\x00", {"claim_id": "3"}, ttl_s=TTL),  # server refuses
            store.aio.idem_claim("b", {"claim_id": "4"}, ttl_s=TTL),
            store.aio.budget_reserve([("env", 1.0)], min_usd=0.5, max_usd=0.5, ttl_s=TTL),
            return_exceptions=True)
        await store.aio.aclose()
        return out

    a, bad, nul, b, granted = asyncio.run(main())
    assert a is None and b is None and granted == 0.5
    assert isinstance(bad, AuthorityUnavailable) and isinstance(nul, AuthorityUnavailable)
    assert store.idem_get("a") == {"claim_id": "1"}
    assert store.idem_get("b") == {"claim_id": "4"}
    assert store.budget_used("env") == pytest.approx(0.5)
    assert sum(b.refused for b in store.aio._batchers.values()) == 1  # then one by one


def test_a_batch_whose_connection_is_lost_fails_every_caller_and_writes_nothing(
        store: Any, pg: PostgresBackend) -> None:
    """The batch has written a counter and eight claims when it waits for a ninth row, held
    by another transaction; its backend is killed: rolled back whole, every one of its
    callers told (fail closed), none of its writes there. The next batch works."""
    import psycopg

    _sql(pg.dsn, "INSERT INTO authority_idem (key, claim_id, record, expires_at) VALUES "
                 "('k9', 'old', '{}', 0)")  # lapsed: a claim takes it over, once it may
    holder = psycopg.connect(pg.dsn, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT 1 FROM authority_idem WHERE key = 'k9' FOR UPDATE")
    killed: list[int] = []

    def kill_the_waiting_batch() -> None:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for _ in range(200):
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE %s", ("%authority_state_batch%",)).fetchall()
                if rows:
                    for (pid,) in rows:
                        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        killed.append(pid)
                    return
                time.sleep(0.05)

    async def main() -> list[Any]:
        aio = store.aio
        assert await aio.idem_claim("warm", {"claim_id": "w"}, ttl_s=TTL) is None
        first = aio.idem_put("k0", {"claim_id": "0"}, ttl_s=TTL)  # by itself: not held
        batch = [aio.budget_reserve([("env", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=TTL),
                 *(aio.idem_claim(f"k{i}", {"claim_id": str(i)}, ttl_s=TTL)
                   for i in range(1, 10))]
        killer = asyncio.get_running_loop().run_in_executor(None, kill_the_waiting_batch)
        out = await asyncio.gather(first, *batch, return_exceptions=True)
        await killer
        return out

    try:
        results = asyncio.run(main())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert killed
    assert results[0] is None
    assert all(isinstance(r, AuthorityUnavailable) for r in results[1:]), results
    assert store.budget_used("env") == 0.0
    assert [store.idem_get(f"k{i}") for i in range(1, 9)] == [None] * 8
    assert store.idem_get("k0") == {"claim_id": "0"}

    async def again() -> list[Any]:
        out = await asyncio.gather(*(store.aio.idem_claim(f"k{i}", {"claim_id": "new"},
                                                          ttl_s=TTL) for i in range(1, 10)))
        await store.aio.aclose()
        return out

    assert asyncio.run(again()) == [None] * 9


def test_a_caller_cancelled_mid_write_ends_only_once_its_write_landed(store: Any) -> None:
    async def main() -> tuple[Any, Any, list[Any]]:
        aio = store.aio
        rest = [asyncio.ensure_future(aio.idem_claim(f"k{i}", {"claim_id": "2"}, ttl_s=TTL))
                for i in range(4)]
        mine = asyncio.ensure_future(aio.idem_claim("a", {"claim_id": "1"}, ttl_s=TTL))
        await asyncio.sleep(0)
        mine.cancel()
        done = (await asyncio.gather(mine, return_exceptions=True))[0]
        seen = store.idem_get("a")  # at the moment the cancelled caller ended
        out = await asyncio.gather(*rest)
        await aio.aclose()
        return done, seen, out

    done, seen, rest = asyncio.run(main())
    assert isinstance(done, asyncio.CancelledError)
    assert seen == {"claim_id": "1"}
    assert rest == [None] * 4


def test_batches_of_two_replicas_over_shared_keys_and_counters_never_deadlock(
        store: Any, pg: PostgresBackend) -> None:
    """Two replicas (stores with their own loops and pools) send batches at once: claims of
    the same keys in opposite orders, reservations and settlements over overlapping
    counters, round after round. Every batch commits as one (none refused: a deadlock
    would be), each key has one winner over both, no counter passes its limit."""
    other = pg.open()
    keys = [f"key-{i}" for i in range(24)]
    limits = {"x": 3.0, "y": 4.0, "z": 2.5}
    pairs = [("x", "y"), ("y", "x"), ("y", "z"), ("z", "x")]
    rounds = 6
    barrier = threading.Barrier(2)
    wins: dict[str, int] = {}
    granted: dict[str, float] = {n: 0.0 for n in limits}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def replica(s: Any, seed: int) -> None:
        rnd = random.Random(seed)

        async def main() -> None:
            for r in range(rounds):
                mine = [f"{k}:{r}" for k in keys]
                rnd.shuffle(mine)
                if seed % 2:
                    mine.reverse()
                names = [[f"{n}:{r}" for n in pairs[(seed + j) % len(pairs)]]
                         for j in range(8)]
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
                got = await asyncio.gather(
                    *(s.aio.idem_claim(k, {"claim_id": f"{seed}"}, ttl_s=TTL) for k in mine),
                    *(s.aio.budget_reserve([(n, limits[n[0]]) for n in ns], min_usd=0.1,
                                           max_usd=0.4, ttl_s=TTL) for ns in names))
                claims, grants = got[:len(mine)], got[len(mine):]
                await asyncio.gather(*(
                    s.aio.budget_settle(ns, reserved=g, actual=g / 2, ttl_s=TTL)
                    for ns, g in zip(names, grants, strict=True) if g))
                with lock:
                    for k, c in zip(mine, claims, strict=True):
                        wins[k] = wins.get(k, 0) + (c is None)
                    for ns, g in zip(names, grants, strict=True):
                        for n in ns:
                            granted[n[0]] += (g or 0.0) / 2
            await s.aio.aclose()

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=replica, args=(s, i))
               for i, s in enumerate((store, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors[:3]
        assert set(wins.values()) == {1} and len(wins) == len(keys) * rounds
        for s in (store, other):
            assert sum(b.refused for b in s.aio._batchers.values()) == 0
        for n, limit in limits.items():
            used = [store.budget_used(f"{n}:{r}") for r in range(rounds)]
            assert all(u <= limit + 1e-9 for u in used)
            assert sum(used) == pytest.approx(granted[n], abs=1e-9)
    finally:
        other.close()


# -- schema version 4 ----------------------------------------------------------------------


@pytest.fixture
def schema_at_3() -> Iterator[str]:
    """A schema as the previous gateway left it (version 3), one claim open."""
    with schema_at(3, "INSERT INTO authority_idem (key, claim_id, record, expires_at) VALUES "
                      "('open', 'c', '{\"claim_id\":\"c\"}', "
                      "extract(epoch from clock_timestamp()) + 3600)") as name:
        yield name


def test_migrate_upgrades_version_3_and_serve_refuses_it_before(schema_at_3: str) -> None:
    import psycopg

    from authority_sdk.store.pg_schema import SCHEMA_VERSION, migrate
    from authority_sdk.store.postgres import PgStore

    assert SCHEMA_VERSION >= 4
    with pytest.raises(AuthorityUnavailable,
                       match=rf"version 3, this gateway needs {SCHEMA_VERSION}"):
        PgStore(pg_dsn(schema_at_3))
    with psycopg.connect(pg_dsn(schema_at_3), autocommit=True) as conn:
        assert migrate(conn) == (3, SCHEMA_VERSION)
        assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
    store = PgStore(pg_dsn(schema_at_3))
    try:
        assert _batch(pg_dsn(schema_at_3),
                      ("idem_claim", ("open", {"claim_id": "d"}), {"ttl_s": TTL}),
                      ("idem_replace", ("open", "c", {"claim_id": "c", "done": 1}),
                       {"ttl_s": TTL})) == [{"claim_id": "c"}, True]
        assert store.idem_get("open") == {"claim_id": "c", "done": 1}
    finally:
        store.close()


# -- the audit append in one statement (schema version 4) ------------------------------------


def _spy_sends(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from authority_sdk.audit.postgres import PgAuditSink

    calls = {"fast": 0, "two sends": 0}
    fast, two = PgAuditSink._append_fast, PgAuditSink._append_two_sends

    def spy_fast(self: Any, conn: Any, work: Any) -> Any:
        out = fast(self, conn, work)
        calls["fast"] += out is not None
        return out

    def spy_two(self: Any, conn: Any, work: Any) -> Any:
        calls["two sends"] += 1
        return two(self, conn, work)

    monkeypatch.setattr(PgAuditSink, "_append_fast", spy_fast)
    monkeypatch.setattr(PgAuditSink, "_append_two_sends", spy_two)
    return calls


def test_an_audit_append_is_one_statement_from_an_empty_table_on(
        pg: PostgresBackend, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from authority_sdk.audit import verify_sink
    from authority_sdk.audit.postgres import PgAuditSink

    calls = _spy_sends(monkeypatch)
    sink = PgAuditSink(pg.dsn, head=store).open()  # an empty table, opened the full way
    try:
        for i in range(4):
            sink.append_many([("request", {"request_id": f"r{i}"}),
                              ("action", {"request_id": f"r{i}"})])
        assert calls == {"fast": 4, "two sends": 0}
        assert store.get_audit_head() == (8, sink._hash)  # moved in the same statement
        result = verify_sink(PgAuditSink(pg.dsn), store.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 8), result.reason
    finally:
        sink.close()


def test_an_audit_table_without_the_function_takes_the_two_sends(
        pg: PostgresBackend, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit table in a database of an older schema (``audit.dsn_env``)."""
    from authority_sdk.audit import verify_sink
    from authority_sdk.audit.postgres import PgAuditSink

    _sql(pg.dsn, "DROP FUNCTION authority_audit_append")
    calls = _spy_sends(monkeypatch)
    sink = PgAuditSink(pg.dsn, head=store)
    try:
        for i in range(4):
            sink.append("request", request_id=f"r{i}")
        assert calls["two sends"] == 3 and not sink._one_send
        result = verify_sink(PgAuditSink(pg.dsn), store.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 4), result.reason
    finally:
        sink.close()


def test_an_audit_append_behind_another_writer_writes_nothing_then_goes_the_full_way(
        pg: PostgresBackend, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from authority_sdk.audit import verify_sink
    from authority_sdk.audit.postgres import PgAuditSink

    a, b = PgAuditSink(pg.dsn, head=store), PgAuditSink(pg.dsn, head=store)
    try:
        a.append("request", request_id="a0")
        b.append("request", request_id="b0")  # a's cached last entry is no longer last
        calls = _spy_sends(monkeypatch)
        a.append("request", request_id="a1")
        assert calls == {"fast": 0, "two sends": 0}  # refused whole, then the full way
        rows = _sql(pg.dsn, "SELECT seq FROM authority_audit ORDER BY seq")
        assert [r[0] for r in rows] == [1, 2, 3]
        result = verify_sink(PgAuditSink(pg.dsn), store.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 3), result.reason
    finally:
        a.close()
        b.close()


# -- writes of one request sent together (effects.StoreOps) ---------------------------------


def test_writes_sent_together_go_in_one_statement_even_alone(store: Any) -> None:
    from authority_sdk.effects import Runtime, S, StoreOps

    rt = Runtime(store, None, None)  # type: ignore[arg-type]
    store.idem_claim("k", {"claim_id": "1"}, ttl_s=TTL)
    store.budget_reserve([("e", 1.0)], min_usd=0.5, max_usd=0.5, ttl_s=TTL)

    async def main() -> list[Any]:
        out = await rt.aperform(StoreOps((
            S.budget_settle(["e"], reserved=0.5, actual=0.2, ttl_s=TTL),
            S.idem_replace("k", "1", {"claim_id": "1", "answer": "a"}, ttl_s=TTL),
            S.idem_replace("k", "nope", {"claim_id": "x"}, ttl_s=TTL),
            S.idem_claim("j", {"claim_id": "2"}, ttl_s=-1.0),  # refused before sending
            S.budget_settle(["e"], reserved=1.0, actual=1.0, ttl_s=TTL),  # nothing to send
            S.idem_get("k"))))  # not a grouped write: as usual
        await store.aio.aclose()
        return out

    out = asyncio.run(main())
    assert out[:3] == [(True, None), (True, True), (True, False)]
    assert out[3][0] is False and isinstance(out[3][1], ValueError)
    assert out[4] == (True, None) and out[5][0] is True
    assert store.budget_used("e") == pytest.approx(0.2)
    assert store.idem_get("k") == {"claim_id": "1", "answer": "a"}
    batchers = list(store.aio._batchers.values())
    assert [(b.batches, b.items) for b in batchers] == [(1, 3)]


@contextlib.contextmanager
def _statements(sent: list[list[str]]) -> Iterator[None]:
    """Every statement the async driver sends meanwhile but the kill switch's read, into
    ``sent[-1]`` (once the caller appended a list there)."""
    import psycopg

    real_execute = psycopg.AsyncCursor.execute

    async def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        # Not the kill switch's read: when it happens is the cache's business (its
        # listener, connecting late on a slow machine, drops the cache once), not the gate's.
        if sent and "authority_kill_switch" not in str(query):
            sent[-1].append(str(query))
        return await real_execute(self, query, *args, **kwargs)

    psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign]
    try:
        yield
    finally:
        psycopg.AsyncCursor.execute = real_execute  # type: ignore[method-assign]


def _bench_engine(pg: PostgresBackend, tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    """pg_bench's engine (keyed, budgeted, the audit chain in ``pg``), the module for its
    requests, and the mock upstream's answer (one tool call)."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import pg_bench
        from mock_upstream import completion_body
    finally:
        sys.path.remove(str(bench))
    from authority_sdk.engine import Engine

    os.environ[pg_bench.DSN_ENV] = pg.dsn
    engine = Engine(pg_bench.write_policy(tmp_path / "p", "postgres", "http://127.0.0.1:9/v1"))
    return engine, pg_bench, completion_body()


def _keyed_twice(pg: PostgresBackend, tmp_path: Path, *, calls: bool,
                 sent: list[list[str]] | None = None) -> tuple[Any, Any, Any]:
    """pg_bench's gate of a keyed, budgeted request on the async driver, sent twice (the
    second is a replay), with an answer with one tool call or none: the engine (closed by
    the caller) and the two responses. ``sent``: gets the statements each request sent."""
    from authority_sdk.effects import arun

    engine, pg_bench, body = _bench_engine(pg, tmp_path)
    if not calls:
        body["choices"][0]["message"] = {"role": "assistant", "content": "no calls here"}
        body["choices"][0]["finish_reason"] = "stop"
    assert bool(body["choices"][0]["message"].get("tool_calls")) is calls
    answer = json.dumps(body).encode()

    async def main() -> list[Any]:
        out = []
        rt = engine.runtime
        for _ in range(2):
            if sent is not None:
                sent.append([])
            ctx = await arun(engine.begin_d(pg_bench._request(0, f"calls-{calls}")), rt)
            if hasattr(ctx, "status_code"):
                out.append(ctx)
                continue
            out.append(await arun(engine.complete_d(ctx, 200, answer), rt))
        await engine.store.aio.aclose()
        return out

    try:
        with _statements(sent if sent is not None else []):
            first, again = asyncio.run(main())
    except BaseException:
        engine.close()
        raise
    assert first.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert json.loads(again.body)["choices"] == json.loads(first.body)["choices"]
    return engine, first, again


def test_an_answer_without_calls_settles_with_its_finished_answer(pg: PostgresBackend,
                                                                   tmp_path: Path) -> None:
    """A keyed, budgeted request whose answer has no calls, on the async driver: two
    statements — the claim with its reservation; the audit entry, then in its transaction
    the settlement (nothing of the answer takes effect, so it waited for the entry) and the
    finished answer. The cost is settled, a replay answers the same."""
    sent: list[list[str]] = []
    engine, first, _ = _keyed_twice(pg, tmp_path, calls=False, sent=sent)
    try:
        mine = sent[0]
        assert len(mine) == 2, mine
        assert "authority_claim_reserve" in mine[0]
        assert mine[1].startswith("WITH a(ok) AS MATERIALIZED (SELECT authority_audit_append(")
        assert mine[1].count("authority_state_batch") == 1
        assert [b.batches for b in engine.store.aio._batchers.values()] in ([], [0])
        spent = [n for (n,) in _sql(pg.dsn, "SELECT name FROM authority_counters")]
        # Settled to the answer's actual cost, far below the reservation (the estimate).
        cost = json.loads(first.body)["authority"]["cost"]
        assert cost["actual_usd"] < cost["estimate_usd"] / 10
        assert spent and all(engine.store.budget_used(n) == pytest.approx(cost["actual_usd"])
                             for n in spent)
        [(record,)] = _sql(pg.dsn, "SELECT record FROM authority_idem")
        assert json.loads(record)["status"] == "done"
        assert json.loads(json.loads(record)["response"]["body"]) == json.loads(first.body)
    finally:
        engine.close()


def test_a_keyed_request_settles_checkpoints_and_audits_in_one_statement(
        pg: PostgresBackend, tmp_path: Path) -> None:
    """The gate of a keyed, budgeted request whose answer has a call the app dispatches
    itself, on the async driver: two statements — the claim with its reservation; the
    settlement and the checkpoint, then the audit entries, then the finished answer, all in
    one. The answer is kept, the cost settled, the chain whole, a replay answers the same."""
    sent: list[list[str]] = []
    engine, first, _ = _keyed_twice(pg, tmp_path, calls=True, sent=sent)
    try:
        mine = sent[0]
        assert len(mine) == 2, mine
        assert "authority_claim_reserve" in mine[0]
        assert mine[1].startswith("WITH b(r) AS MATERIALIZED (SELECT authority_state_batch(")
        assert mine[1].count("authority_state_batch") == 2
        assert mine[1].count("authority_audit_append") == 1
        assert [b.batches for b in engine.store.aio._batchers.values()] in ([], [0])
        spent = [n for (n,) in _sql(pg.dsn, "SELECT name FROM authority_counters")]
        assert spent and all(0 < engine.store.budget_used(n) < 1.0 for n in spent)
        rid = json.loads(first.body)["authority"]["request_id"]
        events = [json.loads(e)["event"] for (e,) in _sql(
            pg.dsn, "SELECT entry FROM authority_audit ORDER BY seq")
            if json.loads(e)["request_id"] == rid]
        assert events == ["request", "action"]
        [action] = json.loads(first.body)["authority"]["actions"]
        assert (action["status"], action["dispatch"]) == ("allowed", "client")
        # The finished answer, not the held one: what the app was sent, for replays.
        [(record,)] = _sql(pg.dsn, "SELECT record FROM authority_idem")
        assert json.loads(record)["status"] == "done"
        assert json.loads(json.loads(record)["response"]["body"]) == json.loads(first.body)
        assert "answer" not in json.loads(record)
    finally:
        engine.close()


def test_a_key_taken_before_the_answer_was_held_writes_the_settlement_only(
        pg: PostgresBackend, tmp_path: Path) -> None:
    """The statement that carries the checkpoint with the audit entries finds the claim
    gone to a retry: the cost is settled, the entries stay out; the request goes on the
    record by itself, its call denied and kept from the app."""
    from authority_sdk.effects import arun

    engine, pg_bench, body = _bench_engine(pg, tmp_path)
    answer = json.dumps(body).encode()
    sent: list[list[str]] = []

    async def main() -> Any:
        rt = engine.runtime
        for i, key in enumerate(("warm", "taken")):  # the first opens the audit table
            ctx = await arun(engine.begin_d(pg_bench._request(i, key)), rt)
            theirs = {**ctx.claim.record, "claim_id": "req_theirs"}
            if key == "taken":
                assert engine.store.idem_replace(
                    ctx.claim.key, ctx.claim.record["claim_id"], theirs, ttl_s=600)
                sent.append([])
            resp = await arun(engine.complete_d(ctx, 200, answer), rt)
        await engine.store.aio.aclose()
        return ctx, theirs, resp

    try:
        with _statements(sent):
            ctx, theirs, resp = asyncio.run(main())
        # The settlement and the checkpoint went with the entries, which stayed out; the
        # request's entry by itself after it.
        assert "authority_state_batch" in sent[0][0] and "authority_audit_append" in sent[0][0]
        assert "authority_audit_append" in sent[0][1]
        [action] = json.loads(resp.body)["authority"]["actions"]
        assert (action["status"], action["code"]) == ("denied", "idempotency_claim_lost")
        assert json.loads(resp.body)["choices"][0]["message"].get("tool_calls") in (None, [])
        events = [json.loads(e)["event"] for (e,) in _sql(
            pg.dsn, "SELECT entry FROM authority_audit ORDER BY seq")
            if json.loads(e)["request_id"] == ctx.request_id]
        assert events == ["request"]
        assert engine.store.idem_get(ctx.claim.key) == theirs
        cost = json.loads(resp.body)["authority"]["cost"]
        spent = [n for (n,) in _sql(pg.dsn, "SELECT name FROM authority_counters")]
        # Settled to the answer's cost, as the warm request (the same answer) was.
        assert spent and all(engine.store.budget_used(n) == pytest.approx(
            2 * cost["actual_usd"]) for n in spent)
    finally:
        engine.close()


# -- a batch, then a value, then another batch: each part only after the one before took ---


def test_state_batch_then_runs_each_part_only_after_the_one_before_took(
        pg: PostgresBackend) -> None:
    """``pg_plans.state_batch_then`` over arbitrary writes (hypothesis): the batch always
    runs; the value only if every replace and delete of the batch took; the second batch
    only if the value was true — and then in the same transaction, visible with the rest."""
    import uuid

    import psycopg
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    record = {"claim_id": "c-mine", "status": "in_flight"}
    write = st.sampled_from(["put", "replace-mine", "replace-other", "delete-mine",
                             "delete-other"])

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(seeded=st.lists(st.booleans(), min_size=3, max_size=3),
           writes=st.lists(write, min_size=0, max_size=3), settle=st.booleans(),
           flag=st.sampled_from([True, False, None]), after=st.integers(0, 2))
    def check(seeded: list[bool], writes: list[str], settle: bool, flag: bool | None,
              after: int) -> None:
        run = uuid.uuid4().hex[:8]
        keys = [f"k-{run}-{i}" for i in range(3)]
        for key, present in zip(keys, seeded, strict=True):
            if present:
                _sql(pg.dsn, "INSERT INTO authority_idem VALUES (%s, 'c-mine', %s, 1e12)",
                     (key, json.dumps(record)))
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        took = True
        for key, present, what in zip(keys, seeded, writes, strict=False):
            if what == "put":
                calls.append(("idem_put", (key, record), {"ttl_s": TTL}))
                continue
            verb, whose = what.split("-")
            mine = whose == "mine"
            took = took and present and mine
            if verb == "replace":
                calls.append(("idem_replace", (key, f"c-{whose}", record), {"ttl_s": TTL}))
            else:
                calls.append(("idem_delete", (key, f"c-{whose}"), {}))
        if settle:
            calls.append(("budget_settle", ([f"ctr-{run}"],),
                          {"reserved": 0.5, "actual": 0.25, "ttl_s": TTL}))
        later = [f"after-{run}-{i}" for i in range(after)]
        items = [pg_plans.batch_item(m, a, k) for m, a, k in calls]
        more = [pg_plans.batch_item("idem_put", (key, record), {"ttl_s": TTL})
                for key in later]
        order, after_order, (sql, params) = pg_plans.state_batch_then(
            items, ("SELECT %s::boolean", (flag,)), more)  # type: ignore[arg-type]
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            row = conn.execute(sql, params).fetchone()
        assert row is not None
        assert (row[0] is None) == (not items)
        if items:
            assert len(row[0]) == len(items) and sorted(order) == list(range(len(items)))
        assert row[1] == (flag if took else None)
        ran = row[1] is True
        assert (row[2] is not None) == (ran and bool(more))
        if more and ran:
            assert len(row[2]) == len(more) and sorted(after_order) == list(range(len(more)))
        present = {k for (k,) in _sql(pg.dsn, "SELECT key FROM authority_idem WHERE key = "
                                              "ANY(%s)", (later,))}
        assert present == (set(later) if ran else set())

    check()

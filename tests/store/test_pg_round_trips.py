"""PostgreSQL in few round trips, with the same guarantees: the reservation and the
settlement as server-side functions (schema version 3, and the upgrade to it), plans run
pipelined (a relaxed statement in an implicit transaction of its own, a transactional
plan's BEGIN and COMMIT riding with its statements), and the audit append's fast way."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PostgresBackend, pg_dsn, requires_postgres, schema_at

from authority_sdk.audit import verify_sink
from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store import DiskStore

pytestmark = requires_postgres()

DAY = 86400.0


@pytest.fixture
def store(pg_store: Any) -> Any:
    return pg_store


@pytest.fixture
def schema_at_2() -> Iterator[str]:
    """A schema as the previous gateway left it (version 2), with this period's spending."""
    with schema_at(2, "INSERT INTO authority_counters (name, used, expires_at) VALUES "
                      "('env', 0.4, extract(epoch from clock_timestamp()) + 3600)") as name:
        yield name


# -- schema version 3 ----------------------------------------------------------------------


def test_migrate_upgrades_the_previous_version_keeping_its_counters(schema_at_2: str) -> None:
    import psycopg

    from authority_sdk.store.pg_schema import SCHEMA_VERSION, migrate
    from authority_sdk.store.postgres import PgStore

    assert SCHEMA_VERSION >= 3
    with pytest.raises(AuthorityUnavailable,
                       match=rf"version 2, this gateway needs {SCHEMA_VERSION}"):
        PgStore(pg_dsn(schema_at_2))
    with psycopg.connect(pg_dsn(schema_at_2), autocommit=True) as conn:
        assert migrate(conn) == (2, SCHEMA_VERSION)
        assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
    store = PgStore(pg_dsn(schema_at_2))
    try:
        assert store.budget_used("env") == pytest.approx(0.4)
        assert store.budget_reserve([("env", 1.0), ("key", 5.0)], min_usd=0.1, max_usd=1.0,
                                    ttl_s=DAY) == pytest.approx(0.6)
        assert store.budget_used("env") == pytest.approx(1.0)
        store.budget_settle(["env", "key"], reserved=0.6, actual=0.1, ttl_s=DAY)
        assert store.budget_used("env") == pytest.approx(0.5)
        assert store.budget_used("key") == pytest.approx(0.1)
    finally:
        store.close()


def test_a_reservation_keeps_every_rule_of_the_python_one(store: Any) -> None:
    # A counter named twice keeps the lower of its new values (the tighter limit).
    assert store.budget_reserve([("a", 1.0), ("a", 0.5)], min_usd=0.1, max_usd=0.8,
                                ttl_s=DAY) == 0.5
    assert store.budget_used("a") == 0.5
    # The grant is what is left, at least min_usd; clamped at the limit.
    assert store.budget_reserve([("a", 1.0), ("b", 10.0)], min_usd=0.1, max_usd=0.7,
                                ttl_s=DAY) == 0.5
    assert (store.budget_used("a"), store.budget_used("b")) == (1.0, 0.5)
    assert store.budget_reserve([("a", 1.0)], min_usd=0.0, max_usd=0.7, ttl_s=DAY) == 0.0
    assert store.budget_reserve([("a", 1.0)], min_usd=0.01, max_usd=0.7, ttl_s=DAY) is None
    # A counter already past a lowered limit is not pulled down, nor pushed further.
    assert store.budget_reserve([("b", 0.2)], min_usd=0.0, max_usd=1.0, ttl_s=DAY) is None
    assert store.budget_used("b") == 0.5
    # Float rounding never passes the limit: used + (limit - used) is clamped to limit.
    assert store.budget_reserve([("f", 0.3)], min_usd=0.0, max_usd=0.1, ttl_s=DAY) == 0.1
    store.budget_reserve([("f", 0.3)], min_usd=0.0, max_usd=1.0, ttl_s=DAY)
    assert store.budget_used("f") <= 0.3
    # A settlement never takes a counter below 0, and an expired one counts as 0.
    store.budget_settle(["b"], reserved=5.0, actual=0.0, ttl_s=DAY)
    assert store.budget_used("b") == 0.0
    store.budget_reserve([("e", 1.0)], min_usd=1.0, max_usd=1.0, ttl_s=0.2)
    import time

    time.sleep(0.3)
    assert store.budget_reserve([("e", 1.0)], min_usd=1.0, max_usd=1.0, ttl_s=DAY) == 1.0


def test_reservations_over_overlapping_counters_in_any_order_never_pass_a_limit(
        store: Any, pg: PostgresBackend) -> None:
    """Threads of two stores (two replicas' pools) reserve and release on counters that do
    not exist yet, each naming an overlapping pair in its own order, period after period
    (a period's rows are created under contention: locking the existing rows first and
    inserting the missing ones after deadlocked here): no deadlock, no limit passed, every
    grant accounted for."""
    other = pg.open()
    limits = {"x": 2.0, "y": 3.0, "z": 1.5}
    pairs = [("x", "y"), ("y", "x"), ("y", "z"), ("z", "y"), ("z", "x"), ("x", "z")]
    periods = 4
    lock = threading.Lock()
    held = {f"{n}:{p}": 0.0 for n in limits for p in range(periods)}
    barrier = threading.Barrier(len(pairs) * 2)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        s = store if i % 2 else other
        rnd = random.Random(i)
        try:
            for period in range(periods):
                names = [f"{n}:{period}" for n in pairs[i % len(pairs)]]
                barrier.wait()  # the period starts for everyone at once
                for _ in range(12):
                    got = s.budget_reserve([(n, limits[n[0]]) for n in names],
                                           min_usd=0.01, max_usd=0.13, ttl_s=DAY)
                    if got is None:
                        continue
                    kept = got if rnd.random() < 0.7 else 0.0  # some are released again
                    if kept != got:
                        s.budget_settle(names, reserved=got, actual=kept, ttl_s=DAY)
                    with lock:
                        for n in names:
                            held[n] += kept
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert not errors, errors[:3]
    for name, total in held.items():
        used = store.budget_used(name)
        assert used <= limits[name[0]]
        assert used == pytest.approx(total, abs=1e-9)


# -- how plans run -------------------------------------------------------------------------


def _pid_and_sync() -> Any:
    rows = yield ("SELECT pg_backend_pid(), current_setting('synchronous_commit')", ())
    return rows[0]


def test_a_relaxed_statement_relaxes_its_own_transaction_only(pg: PostgresBackend) -> None:
    import psycopg

    from authority_sdk.store.postgres import _run_sync

    def twice() -> Any:
        first = yield ("SELECT current_setting('synchronous_commit')", ())
        second = yield ("SELECT current_setting('synchronous_commit')", ())
        return [first[0][0], second[0][0]]

    def one() -> Any:
        rows = yield ("SELECT current_setting('synchronous_commit')", ())
        return rows[0][0]

    with psycopg.connect(pg.dsn, autocommit=True) as conn:  # one connection, as pooled
        assert _run_sync(conn, "idem_delete", twice()) == ["off", "off"]  # each relaxed
        # …and back to flushing after: the setting ended with each statement's transaction.
        assert _run_sync(conn, "idem_get", one()) == "on"
        assert _run_sync(conn, "approval_transition", one()) == "on"
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_a_transactional_plan_is_rolled_back_whole_on_any_error(store: Any) -> None:
    store.approval_create({"id": "ap", "status": "pending", "expires_at": 1e12})

    def then(fail: str) -> Any:
        yield ("UPDATE authority_approvals SET status = 'approved' WHERE id = 'ap'", ())
        if fail == "python":
            raise RuntimeError("the plan gave up")
        yield ("SELECT 1 / 0", ())

    with pytest.raises(RuntimeError, match="gave up"):
        store._run("approval_transition", then("python"))
    with pytest.raises(AuthorityUnavailable):
        store._run("approval_transition", then("server"))
    assert store.approval_get("ap")["status"] == "pending"
    assert store._run("approval_transition", _pid_and_sync())[1] == "on"

    async def on_the_async_view() -> Any:
        try:
            with pytest.raises(AuthorityUnavailable):
                await store.aio.run("approval_transition", then("server"))
            return await store.aio.approval_get("ap")
        finally:
            await store.aio.aclose()

    assert asyncio.run(on_the_async_view())["status"] == "pending"
    assert store.approval_transition("ap", "pending", "approved")["status"] == "approved"


def test_without_pipeline_mode_plans_run_the_old_way(store: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from authority_sdk.store import postgres

    monkeypatch.setattr(postgres, "PIPELINE", False)
    assert store._run("idem_delete", _pid_and_sync())[1] == "off"
    assert store._run("idem_get", _pid_and_sync())[1] == "on"
    assert store.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=0.4, ttl_s=DAY) == 0.4
    store.budget_settle(["c"], reserved=0.4, actual=0.1, ttl_s=DAY)
    assert store.budget_used("c") == pytest.approx(0.1)
    store.approval_create({"id": "ap", "status": "pending", "expires_at": 1e12})
    assert store.approval_transition("ap", "pending", "approved")["status"] == "approved"

    async def view() -> Any:
        try:
            return (await store.aio.run("idem_delete", _pid_and_sync()),
                    await store.aio.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=0.4,
                                                   ttl_s=DAY))
        finally:
            await store.aio.aclose()

    relaxed, grant = asyncio.run(view())
    assert relaxed[1] == "off" and grant == 0.4


# -- the audit append's fast way -----------------------------------------------------------


def test_two_writers_alternating_keep_one_chain_and_the_fast_way_when_alone(
        pg: PostgresBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from authority_sdk.audit.postgres import PgAuditSink

    fast: list[bool] = []
    real = PgAuditSink._append_fast

    def spy(self: Any, conn: Any, work: Any) -> Any:
        out = real(self, conn, work)
        fast.append(out is not None)
        return out

    monkeypatch.setattr(PgAuditSink, "_append_fast", spy)
    head = DiskStore(tmp_path / "state")
    a = PgAuditSink(pg.dsn, fsync=False, head=head)
    b = PgAuditSink(pg.dsn, fsync=False, head=head)
    try:
        for i in range(3):
            a.append("request", request_id=f"a{i}")
        assert fast == [True, True]  # the first opens the sink the full way
        fast.clear()
        for i in range(4):
            b.append("request", request_id=f"b{i}")
            a.append("request", request_id=f"a{i}")
        # Each found the other's entry last: rolled back, then the full way.
        assert fast == [False] * 7
        result = verify_sink(PgAuditSink(pg.dsn), head.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 11), result.reason
        events = [r.entry["event"] for r in PgAuditSink(pg.dsn).records() if r.entry]
        assert events == ["request"] * 11  # no recovery entry: nothing was lost
    finally:
        a.close()
        b.close()
        head.close()


def test_a_head_in_the_same_database_moves_in_the_appending_transaction(
        pg: PostgresBackend, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No round trip nor commit of its own: the state store is never asked, the head is
    still where the entries end (the full way, the fast way, two writers)."""
    from authority_sdk.audit.postgres import PgAuditSink

    asked: list[tuple[int, str]] = []
    real = type(store).set_audit_head

    def spy(self: Any, seq: int, hash: str) -> None:
        asked.append((seq, hash))
        real(self, seq, hash)

    monkeypatch.setattr(type(store), "set_audit_head", spy)
    a = PgAuditSink(pg.dsn, fsync=False, head=store)
    b = PgAuditSink(pg.dsn, fsync=False, head=store)
    try:
        for i in range(3):
            last = a.append("request", request_id=f"a{i}")
            assert store.get_audit_head() == (last["seq"], last["hash"])
        last = b.append_many([("request", {"request_id": "b"}),
                              ("action", {"request_id": "b"})])[-1]
        assert store.get_audit_head() == (5, last["hash"])
        last = a.append("request", request_id="a3")
        assert store.get_audit_head() == (6, last["hash"])
        assert asked == []
        result = verify_sink(PgAuditSink(pg.dsn), store.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 6), result.reason
    finally:
        a.close()
        b.close()
    # Another database's head (here: a local store) is still moved after the commit.
    local = DiskStore(pg.directory / "head")
    c = PgAuditSink(pg.dsn, fsync=False, head=local)
    try:
        last = c.append("request", request_id="c")
        assert local.get_audit_head() == (7, last["hash"])
    finally:
        c.close()
        local.close()

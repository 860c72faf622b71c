"""What only the PostgreSQL backend has: its schema and migrations, failing closed when the
database is gone, the kill switch reaching every replica within its bound, and moving a
local diskcache store into it (``authority db import-local``)."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import PG_DSN, PostgresBackend, pg_dsn, requires_postgres
from servers import TcpRelay, free_port
from typer.testing import CliRunner

from authority_sdk import idempotency
from authority_sdk.cli import db_cmd
from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store import DiskStore

pytestmark = requires_postgres()

DAY = 86400.0


def _engine_on(pg: PostgresBackend, tmp_path: Path) -> Any:
    """An engine whose state is ``pg`` (its audit log a file under ``tmp_path``)."""
    from authority_sdk.engine import Engine

    policy = tmp_path / "authority.yaml"
    policy.write_text(yaml.safe_dump({
        "version": 1, **pg.policy_overrides(),
        "audit": {"path": str(tmp_path / "audit.jsonl"), "fsync": False}}))
    return Engine(str(policy))


@pytest.fixture
def empty_schema() -> Iterator[str]:
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _policy(directory: Path, env_var: str) -> Path:
    path = directory / "authority.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "state": {"backend": "postgres", "dsn_env": env_var},
        "audit": {"path": str(directory / "audit.jsonl"), "fsync": False}}))
    return path


def _db(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(db_cmd.app, args, env=env)


# -- schema --------------------------------------------------------------------------------


def test_migrate_creates_then_finds_nothing_to_do(tmp_path: Path, empty_schema: str) -> None:
    from authority_sdk.store.pg_schema import SCHEMA_VERSION
    from authority_sdk.store.postgres import PgStore

    env = {"PGSTORE_TEST_DSN": pg_dsn(empty_schema)}
    policy = str(_policy(tmp_path, "PGSTORE_TEST_DSN"))
    with pytest.raises(AuthorityUnavailable, match=r"no gateway schema.*authority db migrate"):
        PgStore(pg_dsn(empty_schema))
    first = _db(["migrate", "--policy", policy], env)
    assert first.exit_code == 0, first.output
    assert f"migrated from version 0 to {SCHEMA_VERSION}" in first.output
    again = _db(["migrate", "--policy", policy], env)
    assert again.exit_code == 0 and f"already at version {SCHEMA_VERSION}" in again.output
    store = PgStore(pg_dsn(empty_schema))
    store.health()
    store.close()


def _migrator(barrier: Any, results: Any, dsn: str) -> None:
    import psycopg

    from authority_sdk.store.pg_schema import migrate

    barrier.wait()
    with psycopg.connect(dsn, autocommit=True) as conn:
        results.put(migrate(conn))


def test_replicas_migrating_together_serialise(empty_schema: str) -> None:
    from authority_sdk.store.pg_schema import SCHEMA_VERSION

    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_migrator, args=(barrier, results, pg_dsn(empty_schema)))
             for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    # Exactly one did the work; the others waited on the lock and found it done.
    assert outcomes == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3


def test_migrate_refuses_a_policy_on_another_backend(tmp_path: Path) -> None:
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1}))
    out = _db(["migrate", "--policy", str(path)], {})
    assert out.exit_code == 2 and "state.backend is 'diskcache'" in out.output
    unset = _db(["migrate", "--policy", str(_policy(tmp_path, "PGSTORE_UNSET_DSN"))],
                {"PGSTORE_UNSET_DSN": ""})
    assert unset.exit_code == 1 and "PGSTORE_UNSET_DSN" in unset.output


# -- failing closed ------------------------------------------------------------------------


def test_unreachable_database_fails_closed_on_open() -> None:
    from authority_sdk.store.postgres import PgStore

    started = time.monotonic()
    with pytest.raises(AuthorityUnavailable, match="state store unavailable: connect"):
        PgStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert time.monotonic() - started < 10


def test_database_lost_mid_use_fails_closed_then_recovers(pg: PostgresBackend) -> None:
    import asyncio

    from authority_sdk.store.postgres import PgStore

    with TcpRelay("127.0.0.1", 5432) as relay:
        dsn = pg.dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        store = PgStore(dsn)
        try:
            assert store.idem_claim("k", {"claim_id": "a"}, ttl_s=DAY) is None
            relay.cut()
            with pytest.raises(AuthorityUnavailable) as lost:
                store.idem_claim("k2", {"claim_id": "b"}, ttl_s=DAY)
            # Says what failed, never where the database is.
            assert "idem_claim" in lost.value.message
            assert str(relay.port) not in lost.value.message
            assert "127.0.0.1" not in lost.value.message
            with pytest.raises(AuthorityUnavailable):
                store.kill_switch_state(fresh=True)
            with pytest.raises(AuthorityUnavailable):
                asyncio.run(store.aio.budget_used("c"))
            relay.restore()
            deadline = time.monotonic() + 15
            while True:  # the pools reconnect on their own
                try:
                    assert store.idem_get("k") == {"claim_id": "a"}
                    break
                except AuthorityUnavailable:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
        finally:
            store.close()


# -- the kill switch across replicas -------------------------------------------------------


def test_kill_switch_reaches_another_replica_within_its_bound(pg: PostgresBackend) -> None:
    a, b = pg.open(), pg.open()
    try:
        assert b.kill_switch_state() == {}  # b now answers from its cache
        for engaged in (True, False, True):
            a.set_kill_switch("*", engaged, reason="incident", actor="ops")
            t0 = time.monotonic()
            while b.kill_switch_state().get("*", {}).get("engaged") is not engaged:
                time.sleep(0.005)
                assert time.monotonic() - t0 < 1.0, "the switch did not reach b within 1 s"
    finally:
        a.close()
        b.close()


def test_kill_switch_notifications_drop_a_cache_that_would_not_expire(
        pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import authority_sdk.store.postgres as pgmod

    monkeypatch.setattr(pgmod, "KILL_SWITCH_CACHE_S", 3600.0)
    a, b = pg.open(), pg.open()
    try:
        assert b.listening.wait(10)
        assert b.kill_switch_state() == {}
        a.set_kill_switch("*", True, reason="incident", actor="ops")
        t0 = time.monotonic()
        # Only the NOTIFY can make b read again within the hour.
        while not b.kill_switch_state().get("*", {}).get("engaged"):
            time.sleep(0.005)
            assert time.monotonic() - t0 < 1.0, "no notification reached b"
    finally:
        a.close()
        b.close()


def test_kill_switch_cache_bound_holds_without_notifications(pg: PostgresBackend) -> None:
    from authority_sdk.store.postgres import KILL_SWITCH_CACHE_S, PgStore

    a, deaf = pg.open(), PgStore(pg.dsn, listen=False)
    try:
        assert deaf.kill_switch_state() == {}
        a.set_kill_switch("prod", True, reason=None, actor="ops")
        # The authoritative read before an effect sees it at once.
        assert deaf.kill_switch_state(fresh=True)["prod"]["engaged"] is True
        t0 = time.monotonic()
        deaf2 = PgStore(pg.dsn, listen=False)
        assert deaf2.kill_switch_state()["prod"]["engaged"] is True
        a.set_kill_switch("prod", False, reason=None, actor="ops")
        while deaf2.kill_switch_state()["prod"]["engaged"]:
            time.sleep(0.01)
        assert time.monotonic() - t0 <= KILL_SWITCH_CACHE_S + 0.2
        deaf2.close()
    finally:
        a.close()
        deaf.close()


# -- moving from diskcache ---------------------------------------------------------------------


def test_import_local_moves_what_is_open(tmp_path: Path, pg: PostgresBackend) -> None:
    disk = DiskStore(tmp_path / "old-state")
    now = time.time()
    disk.approval_create({"id": "apr_open", "status": "pending", "expires_at": now + 3600})
    disk.approval_create({"id": "apr_done", "status": "pending", "expires_at": now + 3600})
    disk.approval_transition("apr_done", "pending", "executed")
    disk.journal_begin("act_doubt", {"action_type": "issue_refund"}, ttl_s=DAY)
    disk.journal_update("act_doubt", "started", {"status": "in_doubt"}, ttl_s=None)
    disk.journal_begin("act_done", {"action_type": "send_email"}, ttl_s=DAY)
    disk.journal_update("act_done", "started", {"status": "executed", "audited": True},
                        ttl_s=DAY)
    claim = idempotency.begin(disk, "idem1", "fp", claim_id="r1", ttl_s=DAY, lease_s=60)
    idempotency.finish(disk, claim, {"id": "chatcmpl-1"}, ttl_s=DAY)
    disk.idem_put("gone", {"claim_id": "x", "status": "done"}, ttl_s=0.05)
    disk.dedupe_claim("issue_refund:order-1", {"action_key": "act_doubt"}, ttl_s=DAY)
    disk.budget_reserve([("env:prod:day", 10.0)], min_usd=1.0, max_usd=2.5, ttl_s=DAY)
    disk.set_kill_switch("prod", True, reason="migration", actor="ops")
    disk.set_audit_head(7, "ab" * 32)
    disk.outbox_put("audit", "parked1", {"event": "action", "fields": {}})
    disk.close()
    time.sleep(0.1)

    env_var = pg.dsn_env
    policy = str(_policy(tmp_path, env_var))
    args = ["import-local", "--policy", policy, "--from", str(tmp_path / "old-state")]
    out = _db(args, {env_var: pg.dsn})
    assert out.exit_code == 0, out.output
    s = pg.open()
    try:
        assert [a["id"] for a in s.approval_list("pending")] == ["apr_open"]
        assert s.approval_get("apr_done") is None
        assert s.journal_get("act_doubt")["status"] == "in_doubt"
        assert [e["action_key"] for e in s.journal_list("in_doubt")] == ["act_doubt"]
        assert s.journal_get("act_done")["status"] == "executed"
        replay = idempotency.begin(s, "idem1", "fp", claim_id="r2", ttl_s=DAY, lease_s=60)
        assert replay.state == "replay" and replay.record["response"] == {"id": "chatcmpl-1"}
        assert s.idem_get("gone") is None
        assert s.dedupe_claim("issue_refund:order-1", {"action_key": "other"},
                              ttl_s=DAY) == {"action_key": "act_doubt"}
        assert s.budget_used("env:prod:day") == pytest.approx(2.5)
        assert s.kill_switch_state(fresh=True)["prod"]["engaged"] is True
        assert s.get_audit_head() == (7, "ab" * 32)
        assert s.outbox_list("audit") == [("parked1", {"event": "action", "fields": {}})]
    finally:
        s.close()
    # Twice is harmless: nothing is added or counted again.
    again = _db(args, {env_var: pg.dsn})
    assert again.exit_code == 0, again.output
    s = pg.open()
    try:
        assert s.budget_used("env:prod:day") == pytest.approx(2.5)
        assert [a["id"] for a in s.approval_list("pending")] == ["apr_open"]
    finally:
        s.close()


# -- liveness across machines ------------------------------------------------------------------


def test_a_replica_elsewhere_holds_its_claims_while_its_heartbeat_runs(
        tmp_path: Path, pg: PostgresBackend) -> None:
    from authority_sdk.liveness import owner_alive
    from authority_sdk.worker import Worker

    engine = _engine_on(pg, tmp_path)
    store = pg.open()
    try:
        name = "replica-b:4242:ab12cd"
        remote = {"host": "another-machine", "pid": 4242, "pid_start": "1", "replica": name}
        assert not owner_alive(store, remote)  # never heartbeat: not alive
        worker = Worker(engine, interval_s=0.2, replica=name)
        worker.start()  # beats on its own thread, whatever the rounds do
        assert owner_alive(store, remote)
        # Its claim blocks a request on this machine while its heartbeat runs...
        claim = {"claim_id": "theirs", "status": "in_flight", "fingerprint": "fp",
                 "lease_until": time.time() + 3600, "owner": remote}
        assert store.idem_claim("busy", claim, ttl_s=DAY) is None
        assert idempotency.begin(store, "busy", "fp", claim_id="mine", ttl_s=DAY,
                                 lease_s=60).state == "in_progress"
        # ...and is taken over once that replica is gone (its lease released or run out).
        worker.stop()
        assert not owner_alive(store, remote)
        taken = idempotency.begin(store, "busy", "fp", claim_id="mine", ttl_s=DAY, lease_s=60)
        assert taken.state == "new" and taken.record["takeover_of"] == "theirs"
    finally:
        store.close()
        engine.close()


# -- the async path ---------------------------------------------------------------------------


def test_async_view_never_blocks_the_event_loop_while_the_database_waits(
        pg: PostgresBackend) -> None:
    """A reservation stuck behind another transaction's row lock for a second: the loop
    keeps running other work meanwhile (a sync call on the loop would freeze it)."""
    import asyncio

    import psycopg

    store = pg.open()
    store.budget_reserve([("locked", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=DAY)

    async def scenario() -> tuple[float, float | None, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with psycopg.connect(pg.dsn) as blocker:  # a transaction holding the counter's row
            blocker.execute("SELECT used FROM authority_counters WHERE name = 'locked' "
                            "FOR UPDATE")
            t0 = time.monotonic()
            reserve = asyncio.create_task(store.aio.budget_reserve(
                [("locked", 10.0)], min_usd=1.0, max_usd=1.0, ttl_s=DAY))
            await asyncio.sleep(1.0)
            assert not reserve.done()  # still waiting on the lock
            blocker.commit()
        grant = await reserve
        waited = time.monotonic() - t0
        stop.set()
        await tick
        await store.aio.aclose()
        return max(gaps), grant, waited

    try:
        worst_gap, grant, waited = asyncio.run(scenario())
    finally:
        store.close()
    assert grant == 1.0 and waited >= 1.0
    assert worst_gap < 0.25, f"the loop stalled for {worst_gap:.2f} s"


def test_expired_rows_are_swept(pg: PostgresBackend) -> None:
    import psycopg

    store = pg.open()
    try:
        store.idem_put("old", {"claim_id": "a"}, ttl_s=0.05)
        store.idem_put("live", {"claim_id": "b"}, ttl_s=DAY)
        store.dedupe_claim("old", {"action_key": "x"}, ttl_s=0.05)
        store.budget_reserve([("old", 1.0)], min_usd=0.1, max_usd=0.1, ttl_s=0.05)
        store.journal_begin("old", {}, ttl_s=0.05)
        store.journal_begin("doubt", {}, ttl_s=0.05)
        store.journal_update("doubt", "started", {"status": "in_doubt"}, ttl_s=None)
        store.lease_acquire("old", "me", ttl_s=0.05)
        time.sleep(0.1)
        assert store.sweep() == 5
        with psycopg.connect(pg.dsn) as conn:
            left = {t: conn.execute(f"SELECT count(*) FROM authority_{t}").fetchone()[0]
                    for t in ("idem", "dedupe", "counters", "journal", "leases")}
        assert left == {"idem": 1, "dedupe": 0, "counters": 0, "journal": 1, "leases": 0}
        assert store.journal_get("doubt")["status"] == "in_doubt"  # never expires
    finally:
        store.close()


def test_requests_arriving_together_share_one_async_pool(
        pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import psycopg_pool

    import authority_sdk.store.postgres as pgmod

    made: list[Any] = []

    class Counted(psycopg_pool.AsyncConnectionPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pgmod.psycopg_pool, "AsyncConnectionPool", Counted)
    store = pg.open()

    async def burst() -> list[Any]:
        got = await asyncio.gather(*(store.aio.budget_used(f"c{i}") for i in range(20)))
        await store.aio.aclose()
        return list(got)

    try:
        assert asyncio.run(burst()) == [0.0] * 20
    finally:
        store.close()
    assert len(made) == 1


def test_a_long_round_of_recovery_does_not_starve_the_heartbeat(
        tmp_path: Path, pg: PostgresBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import authority_sdk.worker as worker_mod
    from authority_sdk.liveness import owner_alive

    monkeypatch.setattr(worker_mod, "replica_lease_s", lambda interval_s: 0.6)
    engine = _engine_on(pg, tmp_path)
    store = pg.open()
    stuck = threading.Event()
    w = worker_mod.Worker(engine, interval_s=0.1, replica="busy:1:aa")

    def slow_round() -> dict[str, Any]:  # a recovery stuck on a slow executor
        stuck.wait(10)
        return {}

    monkeypatch.setattr(w, "tick", slow_round)
    owner = {"host": "elsewhere", "pid": 1, "replica": "busy:1:aa"}
    try:
        w.start()
        time.sleep(1.5)  # well past the lease, inside one round
        assert owner_alive(store, owner)
    finally:
        stuck.set()
        w.stop()
        store.close()
        engine.close()
    store = pg.open()
    try:
        assert not owner_alive(store, owner)
    finally:
        store.close()


def test_import_local_carries_the_file_chain_into_the_audit_table(
        tmp_path: Path, pg: PostgresBackend) -> None:
    from authority_sdk.audit import FileSink, verify_sink
    from authority_sdk.audit.postgres import PgAuditSink

    disk = DiskStore(tmp_path / "old-state")
    log = FileSink(tmp_path / "old-audit.jsonl", fsync=False, head=disk)
    old = [log.append("request", reason=f"r{i}", actor="test") for i in range(5)]
    log.close()
    disk.close()

    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "state": {"backend": "postgres", "dsn_env": pg.dsn_env},
        "audit": {"backend": "postgres"}}))
    args = ["import-local", "--policy", str(path), "--from", str(tmp_path / "old-state"),
            "--audit-from", str(tmp_path / "old-audit.jsonl")]
    out = _db(args, {pg.dsn_env: pg.dsn})
    assert out.exit_code == 0, out.output
    assert '"audit_entries": 5' in out.output

    store = pg.open()
    sink = PgAuditSink(pg.dsn, fsync=False, head=store)
    try:
        assert [r.entry for r in sink.records()] == old
        new = sink.append("request", reason="after the move", actor="test")
        assert new["seq"] == 6 and new["prev_hash"] == old[-1]["hash"]  # one chain
        result = verify_sink(sink, store.get_audit_head())
        assert result.ok and result.last_seq == 6, result.reason
    finally:
        sink.close()
        store.close()
    again = _db(args, {pg.dsn_env: pg.dsn})  # into a table that has entries: nothing
    assert again.exit_code == 0 and '"audit_entries": 0' in again.output


def test_an_audit_table_with_no_database_named_is_a_policy_error(tmp_path: Path) -> None:
    from authority_sdk.errors import PolicyError
    from authority_sdk.policy import load_policy

    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "audit": {"backend": "postgres"}}))
    with pytest.raises(PolicyError, match=r"audit\.dsn_env"):
        load_policy(path)


def test_only_writes_an_effect_never_rests_on_skip_the_wal_flush(pg: PostgresBackend) -> None:
    """pg_plans.RELAXED commit with ``synchronous_commit = off``; every other primitive
    (reservations, the journal, approvals, dedupe, the kill switch) waits for its flush."""
    import asyncio

    from authority_sdk.store import pg_plans

    def show() -> Any:
        rows = yield ("SHOW synchronous_commit", ())
        return rows[0][0]

    store = pg.open()
    try:
        for name in sorted(pg_plans.PLANS):
            want = "off" if name in pg_plans.RELAXED else "on"  # by the name it runs as
            assert store._run(name, show()) == want, name

        async def both() -> tuple[Any, Any]:
            got = (await store.aio.run("idem_replace_lazy", show()),
                   await store.aio.run("idem_replace", show()))
            await store.aio.aclose()
            return got

        assert asyncio.run(both()) == ("off", "on")
        # The finished answer is lazy; the answer kept before any effect is flushed.
        store.idem_claim("k", {"claim_id": "a"}, ttl_s=DAY)
        assert store.idem_replace("k", "a", {"claim_id": "a", "answer": 1}, ttl_s=DAY)
        assert store.idem_replace("k", "a", {"claim_id": "a", "status": "done"}, ttl_s=DAY,
                                  flush=False)
        assert store.idem_get("k") == {"claim_id": "a", "status": "done"}
    finally:
        store.close()
    assert pg_plans.RELAXED.isdisjoint({"idem_replace", "budget_reserve", "journal_begin",
                                        "journal_update", "approval_create", "approval_transition",
                                        "dedupe_claim", "set_kill_switch", "outbox_put"})

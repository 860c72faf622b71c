"""The shared backend: PostgreSQL, so several replicas of the gateway keep one set of
promises (idempotency, budgets, approvals, the journal, the kill switch, the audit head).

Two pools, one set of plans (:mod:`.pg_plans`): the SDK, the CLI and the background
worker call the sync methods on a ``psycopg_pool.ConnectionPool``; the proxy's async
driver awaits ``store.aio`` on an ``AsyncConnectionPool``, so its event loop never
waits on a socket. Each primitive is atomic: one statement, or one transaction
(``pg_plans.TRANSACTIONAL``).

The kill switch is read on every request without a round trip: the state is cached for
at most :data:`KILL_SWITCH_CACHE_S`, and a listener thread (``LISTEN``) drops the cache
as soon as any replica changes the switch, so a change reaches every replica within
that bound even when the listener is down. ``fresh=True`` (right before an effect)
always reads the table.

Every failure to reach or use the database is ``AuthorityUnavailable`` (fail closed);
the pools wait at most :data:`CONNECT_TIMEOUT_S` for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import psycopg_pool

from ..errors import AuthorityUnavailable
from . import pg_plans
from .pg_plans import CorruptRecord, Plan, Rows
from .pg_schema import SCHEMA_VERSION, schema_version
from .protocol import ExpiryGuard, Record

__all__ = ["CONNECT_TIMEOUT_S", "KILL_SWITCH_CACHE_S", "PgStore", "open_for_policy"]

log = logging.getLogger("authority.store.postgres")

CONNECT_TIMEOUT_S = 3.0
# How long a call waits for a free pooled connection before it fails closed (503): longer
# than a connect, so a burst queues instead of failing while the database is fine.
POOL_WAIT_S = 5.0
# Per replica: sync (SDK, CLI, background worker) + async (the proxy) + the listener stay
# well inside PostgreSQL's default 100 connections for a handful of replicas.
SYNC_POOL_MAX = 8
SWEEP_EVERY_S = 60.0
ASYNC_POOL_MAX = 10
# The bound on how stale a replica's view of the kill switch can be (without LISTEN).
KILL_SWITCH_CACHE_S = 0.5

# pg_plans.RELAXED: this transaction's commit does not wait for its WAL flush.
_RELAX = "SET LOCAL synchronous_commit TO off"

_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, CorruptRecord,
           OSError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unavailable(what: str, exc: BaseException) -> AuthorityUnavailable:
    # The answer names the failure's kind only: psycopg's messages carry the database's
    # host and port, which a caller has no business seeing. The log has the detail.
    log.warning("state store unavailable: %s: %s", what, _describe(exc))
    state = getattr(exc, "sqlstate", None)
    kind = type(exc).__name__ + (f" (SQLSTATE {state})" if state else "")
    return AuthorityUnavailable(f"state store unavailable: {what}: {kind}")


def _conn_kwargs() -> dict[str, Any]:
    # autocommit: each plan opens its own transaction block explicitly.
    return {"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT_S)}


def _drive(plan: Plan, execute: Callable[[str, tuple[Any, ...]], Rows]) -> Any:
    rows: Rows | None = None
    while True:
        try:
            sql, params = plan.send(rows)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        rows = execute(sql, params)


async def _adrive(plan: Plan, cur: Any) -> Any:
    rows: Rows | None = None
    while True:
        try:
            sql, params = plan.send(rows)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        await cur.execute(sql, params)
        rows = await cur.fetchall() if cur.description else []


class _KillSwitchCache:
    def __init__(self) -> None:
        self.state: dict[str, Record] | None = None
        self.at = 0.0

    def get(self) -> dict[str, Record] | None:
        state = self.state
        if state is None or time.monotonic() - self.at > KILL_SWITCH_CACHE_S:
            return None
        return {k: dict(v) for k, v in state.items()}

    def put(self, state: dict[str, Record], read_at: float) -> None:
        # A read that began before the last invalidation must not refill the cache.
        if read_at >= self.at:
            self.state, self.at = state, read_at

    def drop(self) -> None:
        self.state = None
        self.at = time.monotonic()


class _AsyncView:
    """``store.aio``: the same primitives as coroutines on an ``AsyncConnectionPool``.

    A pool belongs to the event loop that opened it; a view used from another loop (a
    test calling ``asyncio.run`` twice) opens a pool of its own for that loop.
    """

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._pool: psycopg_pool.AsyncConnectionPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Task[None] | None = None

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        ready = self._ready
        if (self._pool is None or self._loop is not loop or ready is None
                or (ready.done() and (ready.cancelled() or ready.exception() is not None))):
            # Made and published before the first await, so requests arriving together
            # share one pool; each waits for it to open. A pool of another loop is
            # dropped, not closed: its loop is gone or elsewhere.
            pool = psycopg_pool.AsyncConnectionPool(
                self._store.dsn, min_size=1, max_size=ASYNC_POOL_MAX, open=False,
                timeout=POOL_WAIT_S, kwargs=_conn_kwargs(), name="authority-async")
            ready = loop.create_task(pool.open(wait=False))
            self._pool, self._loop, self._ready = pool, loop, ready
        pool = self._pool
        await ready
        return pool

    async def run(self, name: str, plan: Plan) -> Any:
        try:
            pool = await self._get_pool()
            async with pool.connection() as conn:
                cur = conn.cursor()
                if name in pg_plans.RELAXED:
                    async with conn.transaction():
                        await cur.execute(_RELAX)
                        return await _adrive(plan, cur)
                if name not in pg_plans.TRANSACTIONAL:
                    return await _adrive(plan, cur)
                async with conn.transaction():
                    return await _adrive(plan, cur)
        except _ERRORS as exc:
            raise _unavailable(name, exc) from exc

    async def kill_switch_state(self, *, fresh: bool = False) -> dict[str, Record]:
        cache = self._store._ks_cache
        if not fresh and (cached := cache.get()) is not None:
            return cached
        read_at = time.monotonic()
        state = await self.run("kill_switch_state", pg_plans.kill_switch_state())
        cache.put(state, read_at)
        return {k: dict(v) for k, v in state.items()}

    async def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                              actor: str | None) -> Record:
        entry = await self.run("set_kill_switch", pg_plans.set_kill_switch(
            scope, engaged, reason=reason, actor=actor))
        self._store._ks_cache.drop()
        return dict(entry)

    async def idem_replace(self, key: str, claim_id: str, record: Record, *,
                           ttl_s: float, flush: bool = True) -> bool:
        return bool(await self.run("idem_replace" if flush else "idem_replace_lazy",
                                   pg_plans.idem_replace(key, claim_id, record, ttl_s=ttl_s)))

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        build = pg_plans.PLANS.get(name)
        if build is None:
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self.run(name, build(*args, **kwargs))

        call.__name__ = name
        return call

    async def aclose(self) -> None:
        pool, self._pool, self._ready = self._pool, None, None
        if pool is not None and self._loop is asyncio.get_running_loop():
            await pool.close()


class PgStore:
    """``Store`` on PostgreSQL (see the module doc). ``dsn`` is a libpq URI or key/value
    string; its ``search_path`` option picks the schema."""

    name = "postgres"
    shared = True  # claims may belong to other machines: replicas heartbeat (liveness.py)

    def __init__(self, dsn: str, *, listen: bool = True) -> None:
        self.dsn = dsn
        self._ks_cache = _KillSwitchCache()
        self._closed = threading.Event()
        self._check_schema()
        self._pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=SYNC_POOL_MAX, open=False, timeout=POOL_WAIT_S,
            kwargs=_conn_kwargs(), name="authority-sync")
        self._pool.open(wait=False)
        self.aio = _AsyncView(self)
        self._listener: threading.Thread | None = None
        self.listening = threading.Event()  # set while change notifications arrive
        if listen:
            self._listener = threading.Thread(target=self._listen, daemon=True,
                                              name="authority-kill-switch-listener")
            self._listener.start()

    # -- plumbing ------------------------------------------------------------------------

    def _check_schema(self) -> None:
        try:
            with psycopg.connect(self.dsn, **_conn_kwargs()) as conn, conn.cursor() as cur:
                version = schema_version(cur)
        except _ERRORS as exc:
            raise _unavailable("connect", exc) from exc
        if version != SCHEMA_VERSION:
            what = "has no gateway schema" if version == 0 else (
                f"schema is at version {version}, this gateway needs {SCHEMA_VERSION}")
            raise AuthorityUnavailable(
                f"state store unavailable: the database {what}: run `authority db migrate "
                f"--policy <policy>`" + (" with this gateway's version"
                                         if version > SCHEMA_VERSION else ""))

    def _run(self, name: str, plan: Plan) -> Any:
        try:
            with self._pool.connection() as conn:
                cur = conn.cursor()

                def execute(sql: str, params: tuple[Any, ...]) -> Rows:
                    cur.execute(sql, params)
                    return cur.fetchall() if cur.description else []

                if name in pg_plans.RELAXED:
                    with conn.transaction():
                        cur.execute(_RELAX)
                        return _drive(plan, execute)
                if name not in pg_plans.TRANSACTIONAL:
                    return _drive(plan, execute)
                with conn.transaction():
                    return _drive(plan, execute)
        except _ERRORS as exc:
            raise _unavailable(name, exc) from exc

    def _listen(self) -> None:
        """Drop the kill-switch cache whenever any replica changes the switch; between
        notifications, sweep expired rows now and then."""
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.dsn, **_conn_kwargs()) as conn:
                    conn.execute(f"LISTEN {pg_plans.KILL_SWITCH_CHANNEL}")
                    self._ks_cache.drop()  # changes made while we were not listening
                    self.listening.set()
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._ks_cache.drop()
                        if time.monotonic() >= next_sweep:
                            next_sweep = time.monotonic() + SWEEP_EVERY_S
                            self.sweep()
            except Exception as exc:  # the cache bound still holds; try again shortly
                self.listening.clear()
                if self._closed.is_set():
                    return
                log.debug("kill-switch listener: %s", _describe(exc))
                self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self._pool.close(timeout=2.0)
        if self._listener is not None:
            self._listener.join(timeout=2.0)

    def health(self) -> None:
        self._run("health", pg_plans.health())

    def sweep(self) -> int:
        """Delete a batch of expired rows per table (every replica does it now and then)."""
        return int(self._run("sweep", pg_plans.sweep()))

    # -- idempotency -------------------------------------------------------------------

    def idem_claim(self, key: str, record: Record, *, ttl_s: float) -> Record | None:
        return self._run("idem_claim", pg_plans.idem_claim(key, record, ttl_s=ttl_s))

    def idem_get(self, key: str) -> Record | None:
        return self._run("idem_get", pg_plans.idem_get(key))

    def idem_replace(self, key: str, claim_id: str, record: Record, *,
                     ttl_s: float, flush: bool = True) -> bool:
        return bool(self._run("idem_replace" if flush else "idem_replace_lazy",
                              pg_plans.idem_replace(key, claim_id, record, ttl_s=ttl_s)))

    def idem_delete(self, key: str, claim_id: str) -> bool:
        return bool(self._run("idem_delete", pg_plans.idem_delete(key, claim_id)))

    def idem_put(self, key: str, record: Record, *, ttl_s: float) -> None:
        self._run("idem_put", pg_plans.idem_put(key, record, ttl_s=ttl_s))

    # -- counters ------------------------------------------------------------------------

    def budget_reserve(self, counters: list[tuple[str, float]], *, min_usd: float,
                       max_usd: float, ttl_s: float) -> float | None:
        return self._run("budget_reserve", pg_plans.budget_reserve(
            counters, min_usd=min_usd, max_usd=max_usd, ttl_s=ttl_s))

    def budget_settle(self, counters: list[str], *, reserved: float, actual: float,
                      ttl_s: float) -> None:
        self._run("budget_settle", pg_plans.budget_settle(
            counters, reserved=reserved, actual=actual, ttl_s=ttl_s))

    def budget_used(self, counter: str) -> float:
        return float(self._run("budget_used", pg_plans.budget_used(counter)))

    # -- kill switch ---------------------------------------------------------------------

    def kill_switch_state(self, *, fresh: bool = False) -> dict[str, Record]:
        if not fresh and (cached := self._ks_cache.get()) is not None:
            return cached
        read_at = time.monotonic()
        state: dict[str, Record] = self._run("kill_switch_state", pg_plans.kill_switch_state())
        self._ks_cache.put(state, read_at)
        return {k: dict(v) for k, v in state.items()}

    def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                        actor: str | None) -> Record:
        entry: Record = self._run("set_kill_switch", pg_plans.set_kill_switch(
            scope, engaged, reason=reason, actor=actor))
        self._ks_cache.drop()
        return entry

    # -- approvals -----------------------------------------------------------------------

    def approval_create(self, approval: Record) -> None:
        self._run("approval_create", pg_plans.approval_create(approval))

    def approval_get(self, approval_id: str) -> Record | None:
        return self._run("approval_get", pg_plans.approval_get(approval_id))

    def approval_list(self, status: str | None = None, *, limit: int | None = None,
                      before: str | None = None) -> list[Record]:
        return self._run("approval_list", pg_plans.approval_list(status, limit=limit,
                                                                 before=before))

    def approval_transition(self, approval_id: str, from_status: str | Sequence[str],
                            to_status: str, *, guard: ExpiryGuard | None = None,
                            now: float | None = None, **fields: Any) -> Record | None:
        return self._run("approval_transition", pg_plans.approval_transition(
            approval_id, from_status, to_status, guard=guard, now=now, **fields))

    # -- journal -------------------------------------------------------------------------

    def journal_begin(self, action_key: str, entry: Record, *,
                      ttl_s: float) -> Record | None:
        return self._run("journal_begin", pg_plans.journal_begin(action_key, entry,
                                                                 ttl_s=ttl_s))

    def journal_get(self, action_key: str) -> Record | None:
        return self._run("journal_get", pg_plans.journal_get(action_key))

    def journal_update(self, action_key: str, from_status: str | Sequence[str],
                       fields: Record, *, ttl_s: float | None) -> Record | None:
        return self._run("journal_update", pg_plans.journal_update(
            action_key, from_status, fields, ttl_s=ttl_s))

    def journal_list(self, status: str | None = None, *, unaudited: bool = False,
                     limit: int | None = None) -> list[Record]:
        return self._run("journal_list", pg_plans.journal_list(status, unaudited=unaudited,
                                                               limit=limit))

    # -- dedupe --------------------------------------------------------------------------

    def dedupe_claim(self, key: str, owner: Record, *, ttl_s: float) -> Record | None:
        return self._run("dedupe_claim", pg_plans.dedupe_claim(key, owner, ttl_s=ttl_s))

    def dedupe_release(self, key: str, owner_action_key: str) -> bool:
        return bool(self._run("dedupe_release", pg_plans.dedupe_release(key,
                                                                        owner_action_key)))

    def dedupe_list(self, *, limit: int | None = None) -> list[tuple[str, Record]]:
        return self._run("dedupe_list", pg_plans.dedupe_list(limit=limit))

    # -- outbox --------------------------------------------------------------------------

    def outbox_put(self, kind: str, item_id: str, payload: Record) -> None:
        self._run("outbox_put", pg_plans.outbox_put(kind, item_id, payload))

    def outbox_list(self, kind: str, *, limit: int | None = None) -> list[tuple[str, Record]]:
        return self._run("outbox_list", pg_plans.outbox_list(kind, limit=limit))

    def outbox_delete(self, kind: str, item_id: str) -> bool:
        return bool(self._run("outbox_delete", pg_plans.outbox_delete(kind, item_id)))

    # -- leases --------------------------------------------------------------------------

    def lease_acquire(self, name: str, holder: str, *, ttl_s: float) -> bool:
        return bool(self._run("lease_acquire", pg_plans.lease_acquire(name, holder,
                                                                      ttl_s=ttl_s)))

    def lease_get(self, name: str) -> Record | None:
        return self._run("lease_get", pg_plans.lease_get(name))

    def lease_release(self, name: str, holder: str) -> None:
        self._run("lease_release", pg_plans.lease_release(name, holder))

    # -- audit head ----------------------------------------------------------------------

    def get_audit_head(self) -> tuple[int, str] | None:
        return self._run("get_audit_head", pg_plans.get_audit_head())

    def set_audit_head(self, seq: int, hash: str) -> None:
        self._run("set_audit_head", pg_plans.set_audit_head(seq, hash))


def dsn_for_policy(policy: Any, dsn_env: str | None = None) -> str:
    """The DSN from the variable the policy names (``state.dsn_env``)."""
    var = dsn_env or policy.state.dsn_env
    dsn = os.environ.get(var or "")
    if not var or not dsn:
        raise AuthorityUnavailable(
            f"state store unavailable: state.dsn_env names {var!r}, which is not set "
            f"(it must hold the PostgreSQL DSN, e.g. postgresql://user@host:5432/authority)")
    return dsn


def open_for_policy(policy: Any) -> PgStore:
    """Open the policy's PostgreSQL store; refuses an unreachable database or a schema of
    another version (``authority db migrate`` upgrades it)."""
    return PgStore(dsn_for_policy(policy))

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

On the async driver the writes of a keyed, budgeted request (``pg_plans.BATCHED``:
idempotency claims, replacements, deletions and puts, reservations and settlements) are
group-committed (:class:`_Batcher`): what arrives while a batch is out goes next as ONE
statement (``authority_state_batch``, schema version 4), one round trip and one commit for
all of them, each caller answered once its own write committed. A write (but a claim) with
nothing else in flight goes by itself, as before; the writes of one request that do not
depend on each other (``effects.StoreOps``) go together (``aio.together``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool

from ..errors import AuthorityUnavailable
from ..group_commit import Batches, settle_future, uninterrupted
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
# Each connection's application_name (unless the DSN sets one), by what holds it.
SYNC_APP, ASYNC_APP, LISTENER_APP = "authority-sync", "authority-async", "authority-listener"
# The bound on how stale a replica's view of the kill switch can be (without LISTEN).
KILL_SWITCH_CACHE_S = 0.5

# pg_plans.RELAXED: this transaction's commit does not wait for its WAL flush. A function
# call, not SET LOCAL: it also applies to an implicit transaction (two statements in one
# simple query), which SET LOCAL warns about. The setting is read at commit.
_RELAX = "SELECT set_config('synchronous_commit', 'off', true)"
# libpq >= 14 (psycopg-binary ships one): statements go out together, a round trip for all.
# Without it, the same transactions with BEGIN/COMMIT each a round trip of their own.
PIPELINE = psycopg.Pipeline.is_supported()

DB_ERRORS = (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, CorruptRecord,
           OSError)


def refused_by_server(conn: psycopg.AsyncConnection[Any], exc: psycopg.Error) -> bool:
    """The server refused the statement (rolled back whole, nothing written) on a
    connection still up — not a lost connection, whose statement may or may not have
    committed."""
    lost = isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None
    return not (conn.broken or lost)


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


def _conn_kwargs(role: str = "authority") -> dict[str, Any]:
    # autocommit: each plan opens its own transaction block explicitly. The fallback name
    # (a DSN's own application_name wins) tells in pg_stat_activity which pool holds what.
    return {"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT_S),
            "fallback_application_name": role}


def _drive(plan: Plan, execute: Callable[[str, tuple[Any, ...]], Rows]) -> Any:
    rows: Rows | None = None
    while True:
        try:
            sql, params = plan.send(rows)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        rows = execute(sql, params)


async def _adrive(plan: Plan, execute: Callable[[str, tuple[Any, ...]], Awaitable[Rows]]
                  ) -> Any:
    rows: Rows | None = None
    while True:
        try:
            sql, params = plan.send(rows)  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value
        rows = await execute(sql, params)


# How a plan runs, by its kind (pg_plans.TRANSACTIONAL, pg_plans.RELAXED), in round trips
# for a plan of n statements:
#   transactional   BEGIN [relax] stmt1 | stmt2 | … | stmtn | COMMIT   n + 1 (pipelined:
#                   BEGIN rides with the first statement, COMMIT alone; each | a Sync,
#                   which inside BEGIN … COMMIT ends nothing)
#   relaxed         relax; stmt | relax; stmt | …                         n (each statement
#                   sent with the relax as one simple query of two statements, which
#                   PostgreSQL runs as one implicit transaction: one send, no pipeline;
#                   parameters bound client-side by psycopg, quoted as literals)
#   other           stmt | stmt | …                                       n (autocommit)
# Without pipeline mode: BEGIN, SET LOCAL and COMMIT are a round trip each, as before.


_IN_TX = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


@contextlib.contextmanager
def pipelined_transaction(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Pipeline]:
    """BEGIN … COMMIT in pipeline mode, sent as statements: BEGIN goes out with the first
    statement, COMMIT with the last Sync. (psycopg's ``transaction()`` in a pipeline syncs
    on entering and before leaving: two round trips more.) Rolled back on any error."""
    try:
        with conn.pipeline() as pipe:
            conn.execute("BEGIN")
            yield pipe
            conn.execute("COMMIT")
    except BaseException:
        if conn.pgconn.transaction_status in _IN_TX:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
        raise


@contextlib.asynccontextmanager
async def apipelined_transaction(conn: psycopg.AsyncConnection[Any]
                                 ) -> AsyncIterator[psycopg.AsyncPipeline]:
    """:func:`pipelined_transaction` for an ``AsyncConnection``."""
    try:
        async with conn.pipeline() as pipe:
            await conn.execute("BEGIN")
            yield pipe
            await conn.execute("COMMIT")
    except BaseException:
        if conn.pgconn.transaction_status in _IN_TX:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
        raise


def _rows(cur: Any) -> Rows:
    return cur.fetchall() if cur.description else []


def _run_sync(conn: psycopg.Connection[Any], name: str, plan: Plan) -> Any:
    cur = conn.cursor()
    relaxed = name in pg_plans.RELAXED
    if not PIPELINE:
        def plain(sql: str, params: tuple[Any, ...]) -> Rows:
            cur.execute(sql, params)
            return _rows(cur)

        if not relaxed and name not in pg_plans.TRANSACTIONAL:
            return _drive(plan, plain)
        with conn.transaction():
            if relaxed:
                cur.execute(_RELAX)
            return _drive(plan, plain)
    if name in pg_plans.TRANSACTIONAL:
        with pipelined_transaction(conn) as pipe:
            if relaxed:
                conn.cursor().execute(_RELAX)

            def in_tx(sql: str, params: tuple[Any, ...]) -> Rows:
                cur.execute(sql, params)
                pipe.sync()
                return _rows(cur)

            return _drive(plan, in_tx)
    if relaxed:
        one = psycopg.ClientCursor(conn)

        def own_tx(sql: str, params: tuple[Any, ...]) -> Rows:
            one.execute(f"{_RELAX}; {sql}", params)
            one.nextset()
            return _rows(one)

        return _drive(plan, own_tx)

    def autocommit(sql: str, params: tuple[Any, ...]) -> Rows:
        cur.execute(sql, params)
        return _rows(cur)

    return _drive(plan, autocommit)


async def _run_async(conn: psycopg.AsyncConnection[Any], name: str, plan: Plan) -> Any:
    cur = conn.cursor()
    relaxed = name in pg_plans.RELAXED
    if not PIPELINE:
        async def plain(sql: str, params: tuple[Any, ...]) -> Rows:
            await cur.execute(sql, params)
            return await cur.fetchall() if cur.description else []

        if not relaxed and name not in pg_plans.TRANSACTIONAL:
            return await _adrive(plan, plain)
        async with conn.transaction():
            if relaxed:
                await cur.execute(_RELAX)
            return await _adrive(plan, plain)
    if name in pg_plans.TRANSACTIONAL:
        async with apipelined_transaction(conn) as pipe:
            if relaxed:
                await conn.cursor().execute(_RELAX)

            async def in_tx(sql: str, params: tuple[Any, ...]) -> Rows:
                await cur.execute(sql, params)
                await pipe.sync()
                return await cur.fetchall() if cur.description else []

            return await _adrive(plan, in_tx)
    if relaxed:
        one = psycopg.AsyncClientCursor(conn)

        async def own_tx(sql: str, params: tuple[Any, ...]) -> Rows:
            await one.execute(f"{_RELAX}; {sql}", params)
            one.nextset()
            return await one.fetchall() if one.description else []

        return await _adrive(plan, own_tx)

    async def autocommit(sql: str, params: tuple[Any, ...]) -> Rows:
        await cur.execute(sql, params)
        return await cur.fetchall() if cur.description else []

    return await _adrive(plan, autocommit)


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


class _LoopPool:
    """One event loop's ``AsyncConnectionPool``, the connections it opened (so they can be
    closed without that loop once it is gone), and its guard.

    The guard is a task that waits until it is cancelled — which ``asyncio.run`` does to
    every task when its coroutine returns — and then closes the pool, on its loop, before
    the loop ends. Without it a pool its app never closed could hang that teardown: a
    pool's worker cancelled while it connects takes the cancellation for a failed connect
    and schedules another, so the loop waits for it forever.
    """

    def __init__(self, dsn: str, loop: asyncio.AbstractEventLoop,
                 forget: Callable[[_LoopPool], None]) -> None:
        self.loop = loop
        self.conns: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()

        async def track(conn: psycopg.AsyncConnection[Any]) -> None:
            self.conns.add(conn)

        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=1, max_size=ASYNC_POOL_MAX, open=False, timeout=POOL_WAIT_S,
            kwargs=_conn_kwargs(ASYNC_APP), name=ASYNC_APP, configure=track)
        # Made before the first await, so requests arriving together share one pool.
        self.ready: asyncio.Task[None] = loop.create_task(self.pool.open(wait=False))
        self.guard: asyncio.Task[None] = loop.create_task(self._guard(forget))

    @property
    def failed(self) -> bool:
        ready = self.ready
        return ready.done() and (ready.cancelled() or ready.exception() is not None)

    async def _guard(self, forget: Callable[[_LoopPool], None]) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never set: only cancelled
        except asyncio.CancelledError:
            forget(self)  # the next call, should there be one, opens a new pool
            # Its workers are being cancelled too, which may cut the pool's close short
            # (it gathers them): whatever it leaves open is closed directly.
            with contextlib.suppress(BaseException):
                await self._close_pool()
            self._finish_connections()
            raise

    async def close(self) -> None:
        """Close the pool, on its loop (awaited)."""
        if self.guard is not asyncio.current_task():
            self.guard.cancel()
        await self._close_pool()

    def discard(self) -> None:
        """Close the pool from any thread, never waiting on its loop: on that loop when it
        still runs (its workers stop and its connections close there), else by closing its
        connections' sockets here — a closed loop's tasks are gone, its sockets are not."""
        loop = self.loop
        if loop.is_running() and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: fall through
                asyncio.run_coroutine_threadsafe(self.close(), loop)
                return
        self._finish_connections()

    def _finish_connections(self) -> None:
        for conn in list(self.conns):
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    async def _close_pool(self) -> None:
        with contextlib.suppress(Exception):
            await self.pool.close(timeout=2.0)


# A grouped write, and the plan that sends it by itself (when its batch is refused).
_Write = tuple[pg_plans.BatchItem, Callable[[], Plan]]


class _Batcher(Batches[_Write]):
    """Group commit of one event loop's state writes (``pg_plans.BATCHED``: idempotency
    claims, replacements, deletions and puts, budget reservations and settlements).

    A write is queued; one drainer sends everything queued so far as ONE statement
    (``authority_state_batch``, schema version 4) on one pooled connection: one round trip,
    one implicit transaction, one commit — flushed unless every item may skip the flush —
    for all of them, each item with its own result. A caller is answered only once the
    transaction holding its write has committed. While a batch is out, the next one
    gathers. With nothing else in flight a write goes by itself (its own statement costs
    this loop less than a batch of one), except a claim: as a batch of one it is the same
    single round trip, and the function's plan is cached where the claim's own statement
    is planned anew each time (half its server time).

    If the statement fails on a connection that is still up (a server error: nothing of
    the batch was written, the transaction rolled back whole), each write is sent again
    by itself, so a failing write fails only its own caller. If the connection or the
    pool fails, every caller of the batch gets ``AuthorityUnavailable`` (fail closed), as
    each would have alone.
    """

    max_items = 256  # per statement; more wait for the next one

    def __init__(self, view: _AsyncView, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.view = view
        self.items = 0
        self.alone = 0  # writes sent by themselves, in flight now
        self.refused = 0  # statements the server refused (their writes went one by one)

    @property
    def idle(self) -> bool:
        """No grouped write in flight nor queued: the next one may go by itself."""
        return self.task is None and not self.alone

    async def _flush(self, batch: list[tuple[_Write, asyncio.Future[Any]]]) -> None:
        items = [item for (item, _), _ in batch]
        order, (sql, params) = pg_plans.state_batch(items)
        refused: psycopg.Error | None = None
        try:
            async def statement(conn: psycopg.AsyncConnection[Any]) -> Any:
                nonlocal refused
                try:
                    cur = await conn.execute(sql, params)
                    row = await cur.fetchone()
                except psycopg.Error as exc:
                    if not refused_by_server(conn, exc):
                        raise
                    refused = exc  # a server error; rolled back whole: nothing written
                    return None
                return row[0] if row else None

            results = await self.view.on_connection(statement)
        except DB_ERRORS as exc:
            failure = _unavailable("state batch", exc)
            for _, future in batch:
                settle_future(future, exc=failure)
            return
        if refused is not None or not isinstance(results, list) or len(results) != len(batch):
            self.refused += 1
            log.debug("state batch refused (%s): its writes one by one",
                      _describe(refused) if refused is not None else "no result")
            await asyncio.gather(*(self._alone(item, plan, future)
                                   for (item, plan), future in batch))
            return
        self.batches += 1
        self.items += len(batch)
        for j, i in enumerate(order):
            (item, _), future = batch[i]
            try:
                value = item.result(results[j])
            except CorruptRecord as exc:
                settle_future(future, exc=_unavailable(item.method, exc))
                continue
            settle_future(future, result=value)

    async def _alone(self, item: pg_plans.BatchItem, plan: Callable[[], Plan],
                     future: asyncio.Future[Any]) -> None:
        try:
            value = await self.view.run(item.method, plan())
        except Exception as exc:
            settle_future(future, exc=exc)
        else:
            settle_future(future, result=value)


class _AsyncView:
    """``store.aio``: the same primitives as coroutines on an ``AsyncConnectionPool``.

    A pool belongs to the event loop that opened it; a view used from another loop (an
    app calling ``asyncio.run`` more than once) opens a pool of its own for that loop and
    discards the previous one: closed on its loop if that loop still runs, its
    connections closed directly if it is gone — never awaited from a foreign loop.
    """

    def __init__(self, store: PgStore) -> None:
        self._store = store
        self._current: _LoopPool | None = None
        self._lock = threading.Lock()
        self._batchers: dict[int, _Batcher] = {}

    async def _get_pool(self) -> psycopg_pool.AsyncConnectionPool:
        loop = asyncio.get_running_loop()
        with self._lock:
            cur = self._current
            stale = cur if cur is not None and (cur.loop is not loop or cur.failed) else None
            if cur is None or stale is not None:
                cur = self._current = _LoopPool(self._store.dsn, loop, self._forget)
        if stale is not None:
            stale.discard()
        await cur.ready
        return cur.pool

    def _forget(self, pool: _LoopPool) -> None:
        with self._lock:
            if self._current is pool:
                self._current = None

    async def run(self, name: str, plan: Plan) -> Any:
        try:
            return await self.on_connection(lambda conn: _run_async(conn, name, plan))
        except DB_ERRORS as exc:
            raise _unavailable(name, exc) from exc

    async def on_connection(self, work: Callable[[psycopg.AsyncConnection[Any]],
                                                 Awaitable[Any]]) -> Any:
        """``work(conn)`` on a connection of this loop's pool (psycopg's errors as raised)."""
        pool = await self._get_pool()
        try:
            async with pool.connection() as conn:
                return await work(conn)
        except psycopg_pool.PoolClosed:
            cur = self._current
            if cur is not None and cur.pool is pool:
                raise
            # aclose() closed it between taking it and asking it (nothing was sent): once
            # more, on the pool that replaces it.
            async with (await self._get_pool()).connection() as conn:
                return await work(conn)

    def _batcher(self) -> _Batcher:
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(id(loop))
        if batcher is None or batcher.loop is not loop:
            for key in [k for k, b in self._batchers.items() if b.loop.is_closed()]:
                del self._batchers[key]
            batcher = self._batchers[id(loop)] = _Batcher(self, loop)
        return batcher

    def group_batches(self) -> int:
        """How many statements carried grouped writes (tests and diagnostics)."""
        return sum(b.batches for b in self._batchers.values())

    async def _grouped(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                       together: bool = False) -> Any:
        item = pg_plans.batch_item(method, args, kwargs)
        if isinstance(item, pg_plans.Done):
            return item.value
        plain = {k: v for k, v in kwargs.items() if k != "flush"}

        def plan() -> Plan:
            return pg_plans.PLANS[method](*args, **plain)

        batcher = self._batcher()
        if batcher.idle and not together and item.kind != "claim" and not item.relaxed:
            # Nothing else in flight: a statement of its own costs this loop less than a
            # batch of one, and there is nobody to share a commit with — except a claim
            # (see the class doc) and a relaxed write, whose own statement binds its record
            # client-side, quoted as a literal, where the batch sends it as it is (a
            # finished answer: 0.81 → 0.62 ms).
            batcher.alone += 1
            try:
                return await self.run(item.method, plan())
            finally:
                batcher.alone -= 1
        return await uninterrupted(batcher.submit((item, plan)))

    async def idem_claim_reserve(self, key: str, record: Record, *, ttl_s: float,
                                 counters: list[tuple[str, float]], min_usd: float,
                                 max_usd: float, budget_ttl_s: float
                                 ) -> tuple[Record | None, tuple[bool, Any] | None]:
        """:meth:`PgStore.idem_claim_reserve`. Alone, the one statement; with writes in
        flight, the claim and then (only if taken) the reservation as two items of the
        group commit, so they share its commits — the reservation's failure is then
        answered as ``(None, (False, exc))``: the claim was taken."""
        if self._batcher().idle:
            existing, granted = await self.run(
                "idem_claim_reserve", pg_plans.idem_claim_reserve(
                    key, record, ttl_s=ttl_s, counters=counters, min_usd=min_usd,
                    max_usd=max_usd, budget_ttl_s=budget_ttl_s))
            return (existing, None) if existing is not None else (None, (True, granted))
        existing = await self._grouped("idem_claim", (key, record), {"ttl_s": ttl_s})
        if existing is not None:
            return existing, None
        try:
            return None, (True, await self._grouped(
                "budget_reserve", (counters,),
                {"min_usd": min_usd, "max_usd": max_usd, "ttl_s": budget_ttl_s}))
        except Exception as exc:
            return None, (False, exc)

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

    async def together(self, ops: Sequence[Any]) -> list[tuple[bool, Any]]:
        """Independent writes of one request (``effects.StoreOps``) in ONE statement: the
        grouped ones go into one batch together, even with nothing else in flight (the
        others run as usual). One outcome per write: ``(True, result)`` or ``(False,
        exception)``."""
        async def one(op: Any) -> Any:
            if op.method not in pg_plans.BATCHED:
                return await getattr(self, op.method)(*op.args, **op.kwargs)
            return await self._grouped(op.method, tuple(op.args), dict(op.kwargs),
                                       together=True)

        outcomes: list[tuple[bool, Any]] = []
        for result in await asyncio.gather(*(one(op) for op in ops), return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            outcomes.append((False, result) if isinstance(result, Exception) else (True, result))
        return outcomes

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        build = pg_plans.PLANS.get(name)
        if build is None:
            raise AttributeError(name)

        if name in pg_plans.BATCHED:
            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self._grouped(name, args, kwargs)
        else:
            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self.run(name, build(*args, **kwargs))

        call.__name__ = name
        return call

    async def aclose(self) -> None:
        """Close the pool: awaited when it is this loop's, else discarded (see the class
        doc). The view stays usable: the next call opens a pool for its loop."""
        with self._lock:
            cur, self._current = self._current, None
        if cur is None:
            return
        if cur.loop is asyncio.get_running_loop():
            await cur.close()
        else:
            cur.discard()

    def discard(self) -> None:
        """``aclose`` for sync code (``PgStore.close``): never waits on a loop."""
        with self._lock:
            cur, self._current = self._current, None
        if cur is not None:
            cur.discard()


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
            kwargs=_conn_kwargs(SYNC_APP), name=SYNC_APP)
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
        except DB_ERRORS as exc:
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
                return _run_sync(conn, name, plan)
        except DB_ERRORS as exc:
            raise _unavailable(name, exc) from exc

    def _listen(self) -> None:
        """Drop the kill-switch cache whenever any replica changes the switch; between
        notifications, sweep expired rows now and then."""
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.dsn, **_conn_kwargs(LISTENER_APP)) as conn:
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
        self.aio.discard()  # the async pool of a loop that never closed it (an SDK app)
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

    def idem_claim_reserve(self, key: str, record: Record, *, ttl_s: float,
                           counters: list[tuple[str, float]], min_usd: float, max_usd: float,
                           budget_ttl_s: float) -> tuple[Record | None, tuple[bool, Any] | None]:
        """``idem_claim`` and, only if the claim is taken, ``budget_reserve``, as one
        statement (``pg_plans.idem_claim_reserve``): ``(the record in the way, None)`` or
        ``(None, (True, the grant or None))``. A failure raises, nothing written."""
        existing, granted = self._run("idem_claim_reserve", pg_plans.idem_claim_reserve(
            key, record, ttl_s=ttl_s, counters=counters, min_usd=min_usd, max_usd=max_usd,
            budget_ttl_s=budget_ttl_s))
        return (existing, None) if existing is not None else (None, (True, granted))

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

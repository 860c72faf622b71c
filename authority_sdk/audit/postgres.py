"""The PostgreSQL audit sink: one hash chain for every replica, in one table.

An append is one transaction that takes a transaction-scoped advisory lock (so the
replicas' appends are serialised: one chain, no fork), reads the last entry, inserts the
new ones after it and commits; only then is the head recorded in the state store and,
every ``checkpoint_every`` entries, in the checkpoint file, exactly as the file sink does.
Entries are the same JSON the file holds (built by :mod:`.chain`), so ``verify`` and
``authority audit export --format jsonl`` see the same chain.

Losses are measured the same way too: whenever the table's last entry is not the one
this process last wrote or saw (rows deleted, a database restored from an old backup),
what is known to have been written — this process's last append, the state store's
head, and on first use the checkpoint — is compared with what the table holds, and a
``recovery`` entry records exactly the missing seqs. A transaction either commits whole
or not at all, so there is no torn entry to set aside. Any database failure is
:class:`~authority_sdk.errors.AuthorityUnavailable` (the gateway then denies).

Retention (:meth:`PgAuditSink.prune`) deletes the oldest rows in the same transaction that
appends the ``retention`` entry naming the last deleted seq and its hash: both or neither.
That entry, MAC'd like every other, is the table's prune record (the file sink keeps a
signed file beside its archive instead): verify starts the chain right after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from ..errors import AuthorityError, AuthorityUnavailable
from ..store.pg_arrays import Int8Array, TextArray
from ..store.postgres import DB_ERRORS, refused_by_server
from .chain import GENESIS_HASH, build, build_run, prepare
from .checkpoint import CheckpointFile
from .lines import parse_entry
from .losses import Known, losses
from .protocol import AuditHead, Record, SinkSettings
from .pruned import PruneRecord

if TYPE_CHECKING:
    from ..policy import Policy
    from .retention import PruneResult

__all__ = ["PgAuditSink", "open_for_policy"]

_LOCK = "SELECT pg_advisory_xact_lock(hashtext('authority-audit:' || current_schema()))"
_LAST = "SELECT seq, entry FROM authority_audit ORDER BY seq DESC LIMIT 1"
_INSERT = "INSERT INTO authority_audit (seq, entry) VALUES (%s, %s)"
# Entries are text (see pg_schema); the event is matched loosely here and checked parsed.
_RETENTION_LIKE = '%"event":"retention"%'
_LAST_RETENTION = ("SELECT entry FROM authority_audit WHERE entry LIKE %s "
                   "ORDER BY seq DESC LIMIT 1")
_PAGE = 500


_IN_TX = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


class _Batch:
    """Stands in for a cursor: collects the statements an append would run, to be sent
    together as one simple query."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, params: Any = ()) -> None:
        self.items.append((sql, tuple(params)))

    def executemany(self, sql: str, seq: Iterable[Any]) -> None:
        self.items += [(sql, tuple(params)) for params in seq]


def _record(seq: int, raw: str) -> Record:
    entry = parse_entry(raw.encode("utf-8", "surrogatepass"))
    if entry is None:
        return Record(seq, len(raw), None, "not an audit entry", raw[:4096])
    return Record(seq, len(raw), entry)


def _outcomes(built: list[Any], batch: list[Any], order: list[int],
              results: Any) -> list[tuple[bool, Any]] | None:
    """One outcome per write of ``built`` from a batch's results (``batch``: its items
    that were sent, ``order``: as the statement ran them); None for results that do not
    fit (nothing can be said of what happened)."""
    from ..store import pg_plans

    if not batch:
        results = []
    if not isinstance(results, list) or len(results) != len(batch):
        return None
    values: list[Any] = [None] * len(batch)
    for j, i in enumerate(order):
        values[i] = batch[i].result(results[j])
    sent = iter(values)
    return [(True, it.value if isinstance(it, pg_plans.Done) else next(sent)) for it in built]


class PgAuditSink(SinkSettings):
    def __init__(self, dsn: str, *, fsync: bool = True, head: AuditHead | None = None,
                 redact: Iterable[str] = (), key: bytes | None = None,
                 checkpoints: CheckpointFile | None = None,
                 checkpoint_every: int = 1000) -> None:
        self.dsn = dsn
        self.location = "the PostgreSQL table authority_audit"
        self._settings(fsync=fsync, head=head, redact=redact, key=key, checkpoints=checkpoints,
                       checkpoint_every=checkpoint_every)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        # A connection does not survive fork() usefully; a child starts afresh.
        self._pid = os.getpid()
        self._tlock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._seq = 0
        self._hash = GENESIS_HASH
        self._checkpointed = 0
        self._opened = False
        self._one_send = True  # authority_audit_append is there (until it is found not to be)

    # -- writing --------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.append_many([(event, fields)])[0]

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        prepared = [prepare(event, dict(fields), self._redact) for event, fields in items]
        if not prepared:
            return []

        def write(cur: Any) -> list[dict[str, Any]]:
            entries = build_run(prepared, self._seq, self._hash, self.key)
            self._insert(cur, entries)
            return entries

        return self._locked(write, append=True)

    def open(self) -> PgAuditSink:
        """Connect now and record what is missing (a broken sink fails the start)."""
        self._locked(lambda cur: [])
        return self

    def close(self) -> None:
        if self.checkpoints is not None and self._opened and self._pid == os.getpid():
            # At shutdown the checkpoint catches up (under the lock: never backwards).
            with contextlib.suppress(AuthorityError):  # the last periodic one is still true
                self._locked(lambda cur: [], catch_up=True)
        with self._tlock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> PgAuditSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def import_chain(self, entries: Iterable[dict[str, Any]]) -> int:
        """Carry a file chain over as the table's first entries, unchanged (same seqs,
        hashes and MACs), so the table's chain continues it and verify spans both. Only
        into an empty table; returns how many went in (0: the table had entries)."""
        rows = list(entries)

        def copy(cur: Any) -> list[dict[str, Any]]:
            if self._seq != 0 or not rows:
                return []
            self._insert(cur, rows)
            return rows

        return len(self._locked(copy))

    # -- reading (never writes) -------------------------------------------------------------

    def exists(self) -> bool:
        rows = self._read("SELECT EXISTS (SELECT 1 FROM authority_audit)", ())
        return bool(rows[0][0])

    def records(self) -> Iterator[Record]:
        return self.records_from(None)

    def records_from(self, position: int | None) -> Iterator[Record]:
        """Records from seq ``position`` on (a record's position is its seq), oldest first."""
        after = 0 if position is None else position - 1
        while True:
            rows = self._read("SELECT seq, entry FROM authority_audit WHERE seq > %s "
                              "ORDER BY seq LIMIT %s", (after, _PAGE))
            for seq, raw in rows:
                yield _record(int(seq), str(raw))
            if len(rows) < _PAGE:
                return
            after = int(rows[-1][0])

    def records_before(self, position: int | None = None) -> Iterator[Record]:
        before = position
        while True:
            rows = self._read("SELECT seq, entry FROM authority_audit WHERE "
                              "(%s::bigint IS NULL OR seq < %s) ORDER BY seq DESC LIMIT %s",
                              (before, before, _PAGE))
            for seq, raw in rows:
                yield _record(int(seq), str(raw))
            if len(rows) < _PAGE:
                return
            before = int(rows[-1][0])

    # -- retention --------------------------------------------------------------------------

    def prune_record(self) -> PruneRecord | None:
        """Where the kept chain starts: the newest ``retention`` entry (None: never pruned)."""
        rows = self._read(_LAST_RETENTION, (_RETENTION_LIKE,))
        return _prune_record(rows)

    def prune(self, *, older_than_s: float, keep_after: int | None = None,
              actor: str = "retention", now: float | None = None) -> PruneResult:
        """Delete the oldest rows whose entries are older than ``older_than_s`` (none past seq
        ``keep_after``, never the newest), in one transaction with the ``retention`` entry
        that records it."""
        from .file import _parse_ts
        from .retention import PruneResult

        cutoff = (time.time() if now is None else now) - older_than_s
        found: dict[str, Any] = {}

        def work(cur: Any) -> list[dict[str, Any]]:
            last: tuple[int, str] | None = None
            first: int | None = None
            with cur.connection.cursor(name=f"authority_audit_prune_{secrets.token_hex(4)}"
                                       ) as walk:
                walk.itersize = 200
                walk.execute("SELECT seq, entry FROM authority_audit ORDER BY seq")
                for seq, raw in walk:
                    entry = parse_entry(str(raw).encode("utf-8", "surrogatepass"))
                    if entry is None:
                        raise AuthorityUnavailable(
                            f"audit log unavailable: the entry at seq {seq} of {self.location} "
                            "is not an audit entry; run `authority audit verify` before pruning")
                    ts = _parse_ts(str(entry.get("ts")))
                    if int(seq) >= self._seq or ts is None or ts > cutoff:
                        break
                    if keep_after is not None and int(seq) > keep_after:
                        found["held_back"] = (f"entries past seq {keep_after} are older than the "
                                              "retention period but not yet checkpointed or "
                                              "streamed")
                        break
                    first = int(seq) if first is None else first
                    last = int(seq), str(entry["hash"])
            if last is None:
                return []
            entries = build_run([prepare("retention", {
                "actor": actor,
                "reason": f"retention: entries up to seq {last[0]} deleted",
                "details": {"pruned_through": last[0], "pruned_hash": last[1],
                            "files": [], "older_than_s": older_than_s}})],
                self._seq, self._hash, self.key)
            self._insert(cur, entries)
            cur.execute("DELETE FROM authority_audit WHERE seq <= %s", (last[0],))
            found["range"] = (first, last[0])
            return entries

        self._locked(work)
        if "range" not in found:
            return PruneResult((), None, found.get("held_back"))
        first, through = found["range"]
        return PruneResult((f"seqs {first}..{through}",), through, found.get("held_back"))

    # -- internals --------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
        return self._conn

    def _unavailable(self, exc: BaseException) -> AuthorityUnavailable:
        self._conn = None  # reconnect next time
        state = getattr(exc, "sqlstate", None)
        kind = type(exc).__name__ + (f" (SQLSTATE {state})" if state else "")
        return AuthorityUnavailable(f"audit log unavailable: {kind}")

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            with self._tlock:
                return self._connection().execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc

    def _locked(self, work: Any, *, catch_up: bool = False,
                append: bool = False) -> list[dict[str, Any]]:
        """Run ``work(cursor)`` in one transaction under the chain's lock, after recording
        any loss; then move the head and the checkpoint past what it wrote. ``append``:
        ``work`` only inserts entries (it may run pipelined, see :meth:`_append_fast`)."""
        with self._tlock:
            if self._pid != os.getpid():
                self._reset_process_state()
            before = (self._seq, self._hash)
            try:
                conn = self._connection()
                entries = None
                if append and self._opened:
                    entries = self._append_fast(conn, work)
                if entries is None:
                    with conn.transaction(), conn.cursor() as cur:
                        if not self.fsync:
                            cur.execute("SET LOCAL synchronous_commit TO off")
                        cur.execute(_LOCK)
                        self._catch_up_with_table(cur)
                        entries = work(cur)
                        self._head_in_tx(cur, before, entries)
            except psycopg.Error as exc:
                self._seq, self._hash = before  # rolled back: nothing of it was written
                raise self._unavailable(exc) from exc
            except BaseException:
                self._seq, self._hash = before
                raise
            self._opened = True
            written = (self._seq, self._hash) != before or entries
            if written and self._head is not None and not self._head_shares_db():
                try:
                    self._head.set_audit_head(self._seq, self._hash)
                except AuthorityError:
                    raise
                except Exception as exc:
                    raise AuthorityUnavailable(f"audit head not recorded: {exc}") from exc
            self._checkpoint(catch_up=catch_up)
            return list(entries)

    def _checkpoint(self, *, catch_up: bool = False) -> None:
        """Every ``checkpoint_every`` entries (or at shutdown), the checkpoint file."""
        if self.checkpoints is not None and (
                (catch_up and self._seq > self._checkpointed)
                or self._seq // self.checkpoint_every
                > self._checkpointed // self.checkpoint_every):
            self.checkpoints.write(self._seq, self._hash)
            self._checkpointed = self._seq

    def _append_fast(self, conn: psycopg.Connection[Any], work: Any
                     ) -> list[dict[str, Any]] | None:
        """The common append in ONE round trip (``authority_audit_append``, schema version
        4): the lock, the check that the table's last entry is the one this process last
        wrote, the inserts and the head, one statement, one implicit transaction. On a
        schema without the function, :meth:`_append_two_sends`. None: see there."""
        if self._one_send:
            before = (self._seq, self._hash)
            batch = _Batch()
            result: list[dict[str, Any]] = work(batch)
            rows = [params for sql, params in batch.items if sql == _INSERT]
            shares = self._head_shares_db()
            try:
                row = conn.execute(*self._one_send_query(before, rows, shares)).fetchone()
            except psycopg.errors.UndefinedFunction:
                # An audit table in a database of an older schema: the two sends.
                self._one_send = False
                self._seq, self._hash = before
                return self._append_two_sends(conn, work)
            if not row or not row[0]:
                self._seq, self._hash = before
                return None
            return result
        return self._append_two_sends(conn, work)

    def _one_send_query(self, before: tuple[int, str], rows: list[tuple[Any, ...]],
                        shares: bool) -> tuple[str, tuple[Any, ...]]:
        """``authority_audit_append`` of the rows ``_insert`` made, after ``before``."""
        return ("SELECT authority_audit_append(%b, %b::int8, %b, %b::int8[], %b::text[], "
                "%b::int8, %b)", (not self.fsync, before[0] or None,
                                  before[1] if before[0] else None,
                                  Int8Array([int(r[0]) for r in rows]),
                                  TextArray([str(r[1]) for r in rows]),
                                  self._seq if shares else None,
                                  self._hash if shares else None))

    def _on_loop_append(self, prepared: list[Any], before: tuple[int, str]
                        ) -> tuple[list[dict[str, Any]], tuple[str, tuple[Any, ...]]]:
        """The entries of ``prepared`` after ``before`` and the one statement that appends
        them with the head (in this database). This sink's idea of its head moves past them:
        the caller puts it back unless they were written."""
        entries = build_run(prepared, before[0], before[1], self.key)
        rows = _Batch()
        self._insert(rows, entries)
        return entries, self._one_send_query(
            before, [p for q, p in rows.items if q == _INSERT], True)

    async def aappend_many(self, items: list[tuple[str, dict[str, Any]]]
                           ) -> list[dict[str, Any]] | None:
        """The common append on the calling event loop, on the state store's pool of that
        loop (the head in this very database): the same one statement as
        :meth:`_append_fast`, without the hop to a writer thread and back. The loop never
        waits on the database; it awaits it.

        None when this way does not apply — before the first append, on a schema without
        the function, with the head elsewhere, while a thread of this process appends, or
        when the table's last entry is not this process's (another replica appended): the
        caller then appends with :meth:`append_many` on a thread, which takes the full way
        and records any loss. Nothing was written then."""
        head = self._head
        if not (self._opened and self._one_send and self._pid == os.getpid()
                and self._head_shares_db()):
            return None
        prepared = [prepare(event, dict(fields), self._redact) for event, fields in items]
        if not prepared:
            return []
        if not self._tlock.acquire(blocking=False):
            return None  # a sync append is under way on another thread: queue behind it there
        before = (self._seq, self._hash)
        done = False
        try:
            entries, (sql, params) = self._on_loop_append(prepared, before)

            async def statement(conn: psycopg.AsyncConnection[Any]) -> Any:
                cur = await conn.execute(sql, params)
                return await cur.fetchone()

            try:
                row = await head.aio.on_connection(statement)  # type: ignore[union-attr]
            except psycopg.errors.UndefinedFunction:
                self._one_send = False
                return None
            except DB_ERRORS as exc:
                raise self._unavailable(exc) from exc
            if not row or not row[0]:
                return None
            done = True
            self._checkpoint()
            return entries
        finally:
            if not done:  # rolled back, or never sent: nothing of it was written
                self._seq, self._hash = before
            self._tlock.release()

    async def aappend_after(self, first: Any, items: list[tuple[str, dict[str, Any]]],
                            then: Any = ()) -> tuple[list[tuple[bool, Any]],
                                                     list[dict[str, Any]] | None,
                                                     list[tuple[bool, Any]] | None] | None:
        """``effects.AuditOp`` with ``first`` or ``then``: the state store's writes
        ``first``, then, only if every one took effect, the entries, then, only if they
        were appended, the writes ``then`` — ONE statement on the loop's pool
        (``pg_plans.state_batch_then``): one round trip, one commit for all. Returns the
        outcomes of ``first``, the entries (None: not appended — a write did not take
        effect, or the chain moved, which the caller tells apart by the outcomes), and the
        outcomes of ``then`` (None: not made).

        None when this way does not apply (as :meth:`aappend_many`; also with the log's
        commits relaxed, ``fsync: false``, which must not relax the writes around it; for
        writes the statement cannot carry; or when the server refused the statement):
        nothing was written, and the caller sends the writes and the append its usual way."""
        from ..store import pg_plans

        head = self._head
        if not (self.fsync and self._opened and self._one_send and self._pid == os.getpid()
                and self._head_shares_db()):
            return None
        try:
            built = [pg_plans.batch_item(op.method, tuple(op.args), dict(op.kwargs))
                     for op in first]
            built_then = [pg_plans.batch_item(op.method, tuple(op.args), dict(op.kwargs))
                          for op in then]
        except (KeyError, TypeError, ValueError):
            return None  # the usual way raises it for the write alone
        batch = [it for it in built if isinstance(it, pg_plans.BatchItem)]
        after = [it for it in built_then if isinstance(it, pg_plans.BatchItem)]
        if not (batch or after) or any(it.kind not in pg_plans.THEN_KINDS
                                       for it in (*batch, *after)):
            return None
        prepared = [prepare(event, dict(fields), self._redact) for event, fields in items]
        if not prepared or not self._tlock.acquire(blocking=False):
            return None
        before = (self._seq, self._hash)
        done = False
        try:
            entries, append = self._on_loop_append(prepared, before)
            order, after_order, (sql, params) = pg_plans.state_batch_then(batch, append, after)
            refused = False

            async def statement(conn: psycopg.AsyncConnection[Any]) -> Any:
                nonlocal refused
                try:
                    cur = await conn.execute(sql, params)
                    return await cur.fetchone()
                except psycopg.Error as exc:
                    if not refused_by_server(conn, exc):
                        raise
                    refused = True  # a server error: rolled back whole, nothing written
                    return None

            try:
                row = await head.aio.on_connection(statement)  # type: ignore[union-attr]
            except DB_ERRORS as exc:
                raise self._unavailable(exc) from exc
            if refused or not row or len(row) != 3:
                return None
            outcomes = _outcomes(built, batch, order, row[0])
            if outcomes is None:
                return None
            if row[1] is not True:
                return outcomes, None, None
            done = True
            self._checkpoint()
            return outcomes, entries, _outcomes(built_then, after, after_order, row[2])
        finally:
            if not done:  # rolled back, never sent, or not appended: nothing of it written
                self._seq, self._hash = before
            self._tlock.release()

    def _append_two_sends(self, conn: psycopg.Connection[Any], work: Any
                          ) -> list[dict[str, Any]] | None:
        """The common append, in two round trips (one send each) where the full way takes
        five: BEGIN, the lock and the read of the last entry go out as one simple query,
        then the inserts, the head and COMMIT as another (parameters bound client-side).
        The last entry is read by a statement of its own, after the lock is held (a
        statement's snapshot predates the statement: read with the lock in one statement,
        it could miss an append committed while we waited).

        None when the table's last entry is not the one this process last wrote (another
        replica appended, rows went, a corrupt entry): rolled back, nothing written, and
        the caller takes the full way, which records losses."""
        cur = psycopg.ClientCursor(conn)
        try:
            relax = "" if self.fsync else "SET LOCAL synchronous_commit TO off; "
            cur.execute(f"BEGIN; {relax}{_LOCK}; {_LAST}")
            while cur.nextset():
                pass
            row = cur.fetchone()
            entry = parse_entry(str(row[1]).encode("utf-8", "surrogatepass")) if row else None
            seen = (entry["seq"], entry["hash"]) if entry is not None else (
                (0, GENESIS_HASH) if row is None else None)
            if seen != (self._seq, self._hash):
                conn.rollback()
                return None
            batch = _Batch()
            result: list[dict[str, Any]] = work(batch)
            self._head_in_tx(batch, seen, result)
            cur.execute("; ".join([*(sql for sql, _ in batch.items), "COMMIT"]),
                        [p for _, params in batch.items for p in params])
            return result
        except BaseException:
            if conn.pgconn.transaction_status in _IN_TX:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
            raise

    def _head_shares_db(self) -> bool:
        """The head is the state store in this very database (``audit.dsn_env`` unset)."""
        from ..store.postgres import PgStore

        return isinstance(self._head, PgStore) and self._head.dsn == self.dsn

    def _head_in_tx(self, cur: Any, before: tuple[int, str] | None,
                    entries: list[dict[str, Any]]) -> None:
        """Move the head in the appending transaction when it lives in this database: no
        round trip nor commit of its own, and never behind nor ahead of the entries it
        points at (committed with them, or rolled back with them)."""
        if ((self._seq, self._hash) == before and not entries) or not self._head_shares_db():
            return
        from ..store import pg_plans

        plan = pg_plans.set_audit_head(self._seq, self._hash)
        for sql, params in plan:
            cur.execute(sql, params)

    def _catch_up_with_table(self, cur: Any) -> None:
        cur.execute(_LAST)
        row = cur.fetchone()
        last = parse_entry(str(row[1]).encode("utf-8", "surrogatepass")) if row else None
        if row is not None and last is None:
            raise AuthorityUnavailable(
                f"audit log unavailable: the entry at seq {row[0]} of {self.location} is not "
                "an audit entry; run `authority audit verify`")
        seq, hsh = (last["seq"], last["hash"]) if last is not None else (0, GENESIS_HASH)
        if self._opened and (seq, hsh) == (self._seq, self._hash):
            return  # nobody else wrote, nothing went: the common case, no more reads
        known: list[Known] = [("this process's last append", self._seq, self._hash)]
        stored = self._head.get_audit_head() if self._head is not None else None
        if stored is not None:
            known.append(("the state store's head", *stored))
        if not self._opened and self.checkpoints is not None:
            checkpoint = self.checkpoints.read_signed()
            if checkpoint is not None:
                known.append((f"the checkpoint {self.checkpoints.path}", checkpoint.seq,
                              checkpoint.hash))
                self._checkpointed = max(self._checkpointed, checkpoint.seq)

        def newest_first() -> Iterator[dict[str, Any] | None]:
            return (r.entry for r in self._records_before_in(cur))

        def pruned_holds(want: int, want_hash: str) -> bool:
            cur.execute(_LAST_RETENTION, (_RETENTION_LIKE,))
            pruned = _prune_record(cur.fetchall())
            return pruned is not None and want <= pruned.seq and (
                want < pruned.seq or pruned.hash == want_hash)

        lost = losses(known, seq, hsh, newest_first, older=pruned_holds)
        self._seq, self._hash = seq, hsh
        for p, skip_to in lost:
            self._insert(cur, [build(p, self._seq, self._hash, self.key, seq=skip_to)])

    @staticmethod
    def _records_before_in(cur: Any) -> Iterator[Record]:
        # A server-side cursor in the locked transaction: a walk back over a long chain
        # fetches only as far as it goes.
        with cur.connection.cursor(name=f"authority_audit_walk_{secrets.token_hex(4)}") as walk:
            walk.itersize = 200
            walk.execute("SELECT seq, entry FROM authority_audit ORDER BY seq DESC")
            for seq, raw in walk:
                yield _record(int(seq), str(raw))

    def _insert(self, cur: Any, entries: list[dict[str, Any]]) -> None:
        cur.executemany(_INSERT,
                        [(e["seq"], json.dumps(e, separators=(",", ":"), ensure_ascii=False))
                         for e in entries])
        last = entries[-1]
        self._seq, self._hash = last["seq"], last["hash"]


def _prune_record(rows: list[tuple[Any, ...]]) -> PruneRecord | None:
    if not rows:
        return None
    entry = parse_entry(str(rows[0][0]).encode("utf-8", "surrogatepass"))
    details = entry.get("details") if entry is not None else None
    if entry is None or entry.get("event") != "retention" or not isinstance(details, dict):
        return None
    through, hash_ = details.get("pruned_through"), details.get("pruned_hash")
    if type(through) is not int or not isinstance(hash_, str):
        return None
    # Vouched for by the entry itself (its MAC is checked as verify walks the chain).
    return PruneRecord(through, hash_, str(entry.get("ts")), (), None, in_chain=True)


def open_for_policy(policy: Policy, head: AuditHead | None) -> PgAuditSink:
    """``audit.backend: postgres``: the table in the state's database, or in the one
    ``audit.dsn_env`` names."""
    from ..store.postgres import dsn_for_policy
    from .registry import sink_options

    return PgAuditSink(dsn_for_policy(policy, policy.audit.dsn_env), head=head,
                       **sink_options(policy))

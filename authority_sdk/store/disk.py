"""The embedded default backend: ``diskcache`` (SQLite in WAL mode) in a local folder.

Safe across threads and processes on one machine. Every read-then-write runs
inside one SQLite ``BEGIN IMMEDIATE`` transaction (``Cache.transact()``), so
concurrent processes serialise on it. One database per concern keeps listings
from scanning unrelated records and writers of unrelated records off each
other's lock.

The few sets that must be listed without a scan (pending approvals; started,
in-doubt and unaudited journal entries) are kept as small index records next
to their rows, updated in the same transaction.

Records are JSON text, not pickles, so a tampered state folder cannot run code
when it is read. Storage failures of any kind surface as
``AuthorityUnavailable`` (fail closed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import diskcache

from ..errors import AuthorityUnavailable
from .batched import GroupedAsync
from .protocol import ExpiryGuard, Record

__all__ = ["DEFAULT_TIMEOUT_S", "DiskStore"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_KILL_SWITCH = "kill_switch"
# The kill switch is read on every request and written almost never: every write replaces
# this file (a new inode), so a reader that finds it unchanged since its last read reuses
# that read — one stat instead of a database query, and a change in any process is seen by
# the next request. Stamps written within _STAMP_SETTLE_S of a read are not trusted (the
# file clock ticks coarsely: a second write in the same tick could look unchanged), and no
# read is reused for longer than _KILL_REUSE_S (bounds a writer that died between its
# commit and its stamp).
_KILL_STAMP = "kill_switch.stamp"
_STAMP_SETTLE_S = 0.1
_KILL_REUSE_S = 1.0
_AUDIT_HEAD = "audit_head"  # the head's record before it had its own table (still read)
_HEAD_TABLE = ("CREATE TABLE IF NOT EXISTS authority_audit_head (id INTEGER PRIMARY KEY "
               "CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL)")
# Index and lease records use tuple keys: they can never collide with the engine's str
# keys, and scans of records skip them.
_PROBE = -1
# Set while a group-committed batch runs on this thread: the batch's transaction decides
# whether the writes it carries are flushed (DiskStore._batch), not each write.
_BATCH = threading.local()

DEFAULT_TIMEOUT_S = 10.0

# Which sets each journal status belongs to (only the small, "open" ones are indexed).
_JOURNAL_INDEXED = ("started", "in_doubt")


class _CorruptRecord(Exception):
    """A stored value that is not what this module wrote."""


def _describe(exc: BaseException) -> str:
    # OSError's str() carries the file path; a 503 body should not show server paths.
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_STORAGE_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout, _CorruptRecord)


def _guarded(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except _STORAGE_ERRORS as exc:
            raise AuthorityUnavailable(
                f"state store unavailable: {fn.__name__}: {_describe(exc)}"
            ) from exc

    return wrapper


def _dump(record: Any) -> str:
    # surrogatepass round-trips a lone surrogate a hostile client or model slipped in.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)


def _load(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _CorruptRecord(f"unexpected stored type {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _CorruptRecord(f"undecodable record: {exc}") from None
    if not isinstance(value, dict):
        raise _CorruptRecord("stored record is not an object")
    return value


def _load_list(raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, str):
        raise _CorruptRecord("index is not text")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise _CorruptRecord(f"undecodable index: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _CorruptRecord("index is not a list of keys")
    return value


def _as_float(raw: Any) -> float:
    if raw is None:
        return 0.0
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _CorruptRecord(f"counter holds {type(raw).__name__}")
    return float(raw)


def _number(record: dict[str, Any], field: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _CorruptRecord(f"field {field!r} is not a number")
    return float(value)


def _iter_str_keys(cache: diskcache.Cache, newest_first: bool = True) -> Iterator[str]:
    """Record keys by insertion (rowid), skipping index, lease and probe keys."""
    for key in (reversed(cache) if newest_first else iter(cache)):
        if isinstance(key, str):
            yield key


def _check_ttl(name: str, value: float | None) -> None:
    if value is None:
        return
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")


def _statuses(from_status: str | Sequence[str]) -> tuple[str, ...]:
    return (from_status,) if isinstance(from_status, str) else tuple(from_status)


def _page(records: list[Record], id_field: str, before: str | None,
          limit: int | None) -> list[Record]:
    if before is not None:
        ids = [r.get(id_field) for r in records]
        records = records[ids.index(before) + 1:] if before in ids else []
    return records if limit is None else records[:max(limit, 0)]


class _Index:
    """A small set of keys kept as one record in the same cache, so it changes in the
    same transaction as the rows it indexes."""

    def __init__(self, cache: diskcache.Cache, name: str) -> None:
        self.cache = cache
        self.key = ("index", name)

    def members(self) -> list[str]:
        return _load_list(self.cache.get(self.key))

    def set(self, member: str, present: bool) -> None:
        """Call inside a transaction."""
        current = self.members()
        if present and member not in current:
            current.append(member)
        elif not present and member in current:
            current.remove(member)
        else:
            return
        self.cache.set(self.key, json.dumps(current))


class DiskStore:
    """``Store`` on diskcache: one SQLite database per concern under ``path``.

    Nothing is evicted (``eviction_policy="none"``): records leave only by their
    own TTL. With ``durable`` (the default) commits are fsynced
    (``synchronous=FULL``), so a power cut cannot forget a ``started`` journal
    entry and let an action run twice — except the few writes in ``_UNFLUSHED``, which
    nothing rests on alone (see there).
    """

    name = "diskcache"

    _KINDS = ("idempotency", "budget", "approvals", "journal", "dedupe", "control",
              "audit_head", "outbox")
    # The audit head need not survive a power cut: the log line it points at is
    # fsynced first, and a head one step behind the log is what a crash leaves and
    # what verify accepts. Skipping its fsync halves the audit cost of a request.
    _LAZY_SYNC = frozenset({"audit_head"})
    # Writes committed without their own fsync (synchronous=NORMAL for their transaction):
    # the writes PostgreSQL commits without waiting for its WAL flush (pg_plans.RELAXED),
    # on the same argument, made per database here. Each database has one WAL, synced in
    # order: an unflushed commit is on disk as soon as any later commit of the same
    # database is. A killed process loses no committed transaction (the kernel has it);
    # only a power cut can, and then:
    # - a claim (idempotency): before any answer with calls leaves, and before any effect,
    #   the answer is checkpointed in the claim with a flushed write (actions._AnswerHold),
    #   which puts the claim on disk too; an answer without calls, its claim lost, costs a
    #   retry a second upstream call, never a second answer whose calls the app could run;
    # - the finished answer (idem_replace with flush=False) and a released claim
    #   (idem_delete): the flushed checkpoint still holds the answer a retry re-gates, and a
    #   release lost holds the key until its lease ends;
    # - a settlement (budget): the reservation stays counted in full, so the budget
    #   over-counts until a later flushed reservation carries it, never under-counts.
    _UNFLUSHED = frozenset({"idem_claim", "idem_delete", "budget_settle"})

    def __init__(self, path: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 durable: bool = True) -> None:
        self._path = Path(path)
        self._durable = durable
        self._caches: list[diskcache.Cache] = []
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            for kind in self._KINDS:
                self._caches.append(diskcache.Cache(
                    str(self._path / kind),
                    timeout=timeout_s,
                    eviction_policy="none",
                    # Culling still drops *expired* rows (10 per write); with
                    # eviction off, size_limit never drops a live record.
                    cull_limit=10,
                    statistics=0,
                    sqlite_synchronous=2 if durable and kind not in self._LAZY_SYNC else 1,
                ))
        except _STORAGE_ERRORS as exc:
            self.close()
            raise AuthorityUnavailable(
                f"state store unavailable: open: {_describe(exc)}"
            ) from exc
        (self._idem, self._budget, self._approvals, self._journal, self._dedupe,
         self._control, self._head, self._outbox) = self._caches
        try:
            self._head_sql(_HEAD_TABLE)
        except _STORAGE_ERRORS as exc:
            self.close()
            raise AuthorityUnavailable(
                f"state store unavailable: open: {_describe(exc)}"
            ) from exc
        self._pending = _Index(self._approvals, "pending")
        self._jindex = {s: _Index(self._journal, s) for s in _JOURNAL_INDEXED}
        self._unaudited = _Index(self._journal, "unaudited")
        # Local SQLite reads take microseconds: inline on the event loop costs less than a
        # hop to a worker thread (measured in benchmarks/micro.py). The writes of a keyed,
        # budgeted request each wait for a sync: those are group-committed off the loop.
        idem, budget = self._batch(self._idem), self._batch(self._budget)
        self.aio = GroupedAsync(self, {
            "idem_claim": idem, "idem_replace": idem, "idem_delete": idem, "idem_put": idem,
            "budget_reserve": budget, "budget_settle": budget}, flushes=self._flushes)
        self._stamp = self._path / _KILL_STAMP
        # (stamp identity, reusable until (monotonic), the state's stored text)
        self._kill_seen: tuple[tuple[int, int, int], float, Any] | None = None
        if not self._stamp.exists():
            self._touch_stamp()

    @property
    def path(self) -> Path:
        return self._path

    def _batch(self, cache: diskcache.Cache
               ) -> Callable[[bool], contextlib.AbstractContextManager[None]]:
        """The transaction a batch of grouped writes runs in (``store.batched``): flushed
        when any of its writes must be (``durable``), else committed like each of them."""

        @contextlib.contextmanager
        def transaction(durable: bool) -> Iterator[None]:
            try:
                with contextlib.nullcontext() if durable else self._unflushed(cache):
                    _BATCH.active = True  # the batch decides for the writes it carries
                    try:
                        with cache.transact():
                            yield
                    finally:
                        _BATCH.active = False
            except _STORAGE_ERRORS as exc:
                raise AuthorityUnavailable(
                    f"state store unavailable: batch: {_describe(exc)}") from exc

        return transaction

    @classmethod
    def _flushes(cls, name: str, kwargs: dict[str, Any]) -> bool:
        """Must this write be on disk before its caller goes on (see ``_UNFLUSHED``)?"""
        if name == "idem_replace":
            return kwargs.get("flush", True) is not False
        return name not in cls._UNFLUSHED

    @contextlib.contextmanager
    def _unflushed(self, cache: diskcache.Cache) -> Iterator[None]:
        """The transaction inside commits without an fsync (``_UNFLUSHED``); the
        connection is back to FULL afterwards, for every write that must be flushed."""
        if not self._durable or getattr(_BATCH, "active", False):
            yield
            return
        con = cache._con  # this thread's connection: the pragma is per connection
        con.execute("PRAGMA synchronous = 1")
        try:
            yield
        finally:
            try:
                con.execute("PRAGMA synchronous = 2")
            except _STORAGE_ERRORS:
                # Never leave a connection that skips syncs for the writes that need them:
                # drop it, and the next write opens one with the cache's FULL setting.
                with contextlib.suppress(*_STORAGE_ERRORS):
                    cache.close()

    def close(self) -> None:
        for cache in self._caches:
            # Best effort: a failing close leaves nothing to protect.
            with contextlib.suppress(*_STORAGE_ERRORS):
                cache.close()

    @_guarded
    def health(self) -> None:
        now = time.time()
        for cache in self._caches:
            cache.set(_PROBE, now)
            if cache.get(_PROBE) != now:
                raise _CorruptRecord("health probe read back a different value")

    # -- idempotency ---------------------------------------------------------------

    @_guarded
    def idem_claim(self, key: str, record: Record, *, ttl_s: float) -> Record | None:
        _check_ttl("ttl_s", ttl_s)
        cache = self._idem
        with self._unflushed(cache), cache.transact():
            existing = _load(cache.get(key))
            if existing is not None:
                return existing
            cache.set(key, _dump(record), expire=ttl_s)
            return None

    @_guarded
    def idem_get(self, key: str) -> Record | None:
        return _load(self._idem.get(key))

    @_guarded
    def idem_replace(self, key: str, claim_id: str, record: Record, *,
                     ttl_s: float, flush: bool = True) -> bool:
        _check_ttl("ttl_s", ttl_s)
        cache = self._idem
        with (contextlib.nullcontext() if flush else self._unflushed(cache)), cache.transact():
            current = _load(cache.get(key))
            if current is None or current.get("claim_id") != claim_id:
                return False
            cache.set(key, _dump(record), expire=ttl_s)
            return True

    @_guarded
    def idem_delete(self, key: str, claim_id: str) -> bool:
        cache = self._idem
        with self._unflushed(cache), cache.transact():
            current = _load(cache.get(key))
            if current is None or current.get("claim_id") != claim_id:
                return False
            cache.delete(key)
            return True

    @_guarded
    def idem_put(self, key: str, record: Record, *, ttl_s: float) -> None:
        _check_ttl("ttl_s", ttl_s)
        self._idem.set(key, _dump(record), expire=ttl_s)

    # -- counters --------------------------------------------------------------------

    @_guarded
    def budget_reserve(self, counters: list[tuple[str, float]], *, min_usd: float,
                       max_usd: float, ttl_s: float) -> float | None:
        _check_ttl("ttl_s", ttl_s)
        if min_usd < 0 or max_usd < min_usd:
            raise ValueError(f"need 0 <= min_usd <= max_usd, got {min_usd!r}, {max_usd!r}")
        if not counters:
            return max_usd
        cache = self._budget
        with cache.transact():
            used = {name: _as_float(cache.get(name)) for name, _ in counters}
            room = min(limit - used[name] for name, limit in counters)
            if room < min_usd:
                return None
            grant = min(max_usd, room)
            for name, limit in counters:
                # Clamp so float rounding of used + (limit - used) cannot pass the limit.
                cache.set(name, min(used[name] + grant, max(limit, used[name])), expire=ttl_s)
            return grant

    @_guarded
    def budget_settle(self, counters: list[str], *, reserved: float, actual: float,
                      ttl_s: float) -> None:
        _check_ttl("ttl_s", ttl_s)
        delta = actual - reserved
        if delta == 0 or not counters:
            return
        cache = self._budget
        with self._unflushed(cache), cache.transact():
            for name in counters:
                # A counter that expired meanwhile (new period) must not go negative.
                cache.set(name, max(_as_float(cache.get(name)) + delta, 0.0), expire=ttl_s)

    @_guarded
    def budget_used(self, counter: str) -> float:
        return _as_float(self._budget.get(counter))

    # -- kill switch -----------------------------------------------------------------

    @_guarded
    def kill_switch_state(self, *, fresh: bool = False) -> dict[str, Record]:
        # The stamp is looked at before the state is read: a write landing between the two
        # changes the stamp after this read, so the next call reads again.
        stamp = self._stamp_id()
        seen = self._kill_seen
        if (not fresh and seen is not None and stamp is not None and seen[0] == stamp
                and time.monotonic() < seen[1]):
            raw = seen[2]
        else:
            raw = self._control.get(_KILL_SWITCH)
            if stamp is not None and time.time() - stamp[1] / 1e9 > _STAMP_SETTLE_S:
                self._kill_seen = (stamp, time.monotonic() + _KILL_REUSE_S, raw)
            else:
                self._kill_seen = None
        return _load(raw) or {}

    def _stamp_id(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._stamp)
        except OSError:
            return None  # no stamp yet (or unreadable): every read goes to the database
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _touch_stamp(self) -> None:
        tmp = self._stamp.with_name(f"{_KILL_STAMP}.{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_text(f"{time.time_ns()} {os.getpid()}\n")
            os.replace(tmp, self._stamp)
        except OSError:
            # Readers must not keep reusing a read: without a stamp they all query again.
            with contextlib.suppress(OSError):
                os.unlink(self._stamp)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @_guarded
    def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                        actor: str | None) -> Record:
        if not isinstance(scope, str) or not scope:
            raise ValueError("kill switch scope must be '*' or an environment name")
        entry = {"engaged": bool(engaged), "reason": reason, "actor": actor, "ts": time.time()}
        cache = self._control
        with cache.transact():
            state = _load(cache.get(_KILL_SWITCH)) or {}
            state[scope] = entry
            cache.set(_KILL_SWITCH, _dump(state))
        self._touch_stamp()
        return dict(entry)

    # -- approvals -------------------------------------------------------------------

    @_guarded
    def approval_create(self, approval: Record) -> None:
        for field in ("id", "status", "expires_at"):
            if field not in approval:
                raise ValueError(f"approval needs {field!r}")
        record = {"created_at": time.time(), **approval}
        cache = self._approvals
        with cache.transact():
            if not cache.add(record["id"], _dump(record)):
                raise ValueError(f"approval {record['id']!r} already exists")
            if record["status"] == "pending":
                self._pending.set(record["id"], True)

    @_guarded
    def approval_get(self, approval_id: str) -> Record | None:
        return _load(self._approvals.get(approval_id))

    @_guarded
    def approval_list(self, status: str | None = None, *, limit: int | None = None,
                      before: str | None = None) -> list[Record]:
        cache = self._approvals
        out: list[Record] = []
        if status == "pending":
            for key in self._pending.members():
                approval = _load(cache.get(key))
                if approval is not None and approval.get("status") == "pending":
                    out.append(approval)
        else:
            for key in _iter_str_keys(cache):
                approval = _load(cache.get(key))
                if approval is not None and (status is None or approval.get("status") == status):
                    out.append(approval)
        out.sort(key=lambda a: (-float(a.get("created_at") or 0), str(a.get("id"))))
        return _page(out, "id", before, limit)

    @_guarded
    def approval_transition(self, approval_id: str, from_status: str | Sequence[str],
                            to_status: str, *, guard: ExpiryGuard | None = None,
                            now: float | None = None, **fields: Any) -> Record | None:
        allowed = _statuses(from_status)
        cache = self._approvals
        with cache.transact():
            current = _load(cache.get(approval_id))
            if current is None or current.get("status") not in allowed:
                return None
            if guard is not None:
                overdue = _number(current, "expires_at") <= (now if now is not None
                                                              else time.time())
                if overdue != (guard == "expired"):
                    return None
            current.update(fields)
            current["status"] = to_status
            cache.set(approval_id, _dump(current))
            self._pending.set(approval_id, to_status == "pending")
            return current

    # -- execution journal -------------------------------------------------------------

    def _index_entry(self, action_key: str, entry: Record) -> None:
        status = entry.get("status")
        for name, index in self._jindex.items():
            index.set(action_key, status == name)
        self._unaudited.set(action_key, entry.get("audited") is False)

    @_guarded
    def journal_begin(self, action_key: str, entry: Record, *,
                      ttl_s: float) -> Record | None:
        _check_ttl("ttl_s", ttl_s)
        cache = self._journal
        with cache.transact():
            existing = _load(cache.get(action_key))
            if existing is not None:
                return existing
            record = {"started_at": time.time(), **entry, "action_key": action_key,
                      "status": "started"}
            cache.set(action_key, _dump(record), expire=ttl_s)
            self._index_entry(action_key, record)
            return None

    @_guarded
    def journal_get(self, action_key: str) -> Record | None:
        return _load(self._journal.get(action_key))

    @_guarded
    def journal_update(self, action_key: str, from_status: str | Sequence[str],
                       fields: Record, *, ttl_s: float | None) -> Record | None:
        _check_ttl("ttl_s", ttl_s)
        allowed = _statuses(from_status)
        cache = self._journal
        with cache.transact():
            entry = _load(cache.get(action_key))
            if entry is None or entry.get("status") not in allowed:
                return None
            entry.update(fields)
            cache.set(action_key, _dump(entry), expire=ttl_s)
            self._index_entry(action_key, entry)
            return entry

    @_guarded
    def journal_list(self, status: str | None = None, *, unaudited: bool = False,
                     limit: int | None = None) -> list[Record]:
        cache = self._journal
        out: list[Record] = []
        if unaudited or status in self._jindex:
            index = self._unaudited if unaudited else self._jindex[str(status)]
            keys: Iterator[str] = iter(index.members())
        else:
            keys = _iter_str_keys(cache)
        for key in keys:
            entry = _load(cache.get(key))  # None: expired or removed meanwhile
            if entry is None:
                continue
            if status is not None and entry.get("status") != status:
                continue
            if unaudited and entry.get("audited") is not False:
                continue
            out.append(entry)
        out.sort(key=lambda e: -float(e.get("started_at") or 0))
        return out if limit is None else out[:max(limit, 0)]

    # -- business-key dedupe -------------------------------------------------------------

    @_guarded
    def dedupe_claim(self, key: str, owner: Record, *, ttl_s: float) -> Record | None:
        _check_ttl("ttl_s", ttl_s)
        cache = self._dedupe
        with cache.transact():
            existing = _load(cache.get(key))
            if existing is not None:
                return existing
            cache.set(key, _dump(owner), expire=ttl_s)
            return None

    @_guarded
    def dedupe_release(self, key: str, owner_action_key: str) -> bool:
        cache = self._dedupe
        with cache.transact():
            existing = _load(cache.get(key))
            if existing is None or existing.get("action_key") != owner_action_key:
                return False
            cache.delete(key)
            return True

    @_guarded
    def dedupe_list(self, *, limit: int | None = None) -> list[tuple[str, Record]]:
        out: list[tuple[str, Record]] = []
        for key in _iter_str_keys(self._dedupe):
            owner = _load(self._dedupe.get(key))
            if owner is not None:
                out.append((key, owner))
                if limit is not None and len(out) >= limit:
                    break
        return out

    # -- outbox ----------------------------------------------------------------------

    @_guarded
    def outbox_put(self, kind: str, item_id: str, payload: Record) -> None:
        self._outbox.set(f"{kind}:{item_id}", _dump({"ts": time.time(), "payload": payload}))

    @_guarded
    def outbox_list(self, kind: str, *, limit: int | None = None) -> list[tuple[str, Record]]:
        prefix = f"{kind}:"
        out: list[tuple[str, Record]] = []
        for key in _iter_str_keys(self._outbox, newest_first=False):
            if not key.startswith(prefix):
                continue
            item = _load(self._outbox.get(key))
            if item is None:
                continue
            payload = item.get("payload")
            if not isinstance(payload, dict):
                raise _CorruptRecord("outbox item has no payload")
            out.append((key[len(prefix):], payload))
            if limit is not None and len(out) >= limit:
                break
        return out

    @_guarded
    def outbox_delete(self, kind: str, item_id: str) -> bool:
        return bool(self._outbox.delete(f"{kind}:{item_id}"))

    # -- leases ----------------------------------------------------------------------

    @_guarded
    def lease_acquire(self, name: str, holder: str, *, ttl_s: float) -> bool:
        _check_ttl("ttl_s", ttl_s)
        cache = self._control
        key = ("lease", name)
        with cache.transact():
            now = time.time()
            current = _load(cache.get(key))
            if (current is not None and current.get("holder") != holder
                    and _number(current, "until") > now):
                return False
            cache.set(key, _dump({"holder": holder, "until": now + ttl_s}))
            return True

    @_guarded
    def lease_get(self, name: str) -> Record | None:
        current = _load(self._control.get(("lease", name)))
        if current is None or _number(current, "until") <= time.time():
            return None
        return current

    @_guarded
    def lease_release(self, name: str, holder: str) -> None:
        cache = self._control
        key = ("lease", name)
        with cache.transact():
            current = _load(cache.get(key))
            if current is not None and current.get("holder") == holder:
                cache.delete(key)

    # -- audit chain head ----------------------------------------------------------------

    def _head_sql(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        # The head's own table in the audit_head database, through the cache's connection
        # (per thread and process, WAL, its busy timeout): written once per audit append,
        # one autocommit statement costs a fraction of a diskcache transaction around a
        # read and a write (BEGIN IMMEDIATE, SELECT, SELECT, UPDATE, cull, COMMIT).
        return self._head._sql(sql, args)

    @_guarded
    def get_audit_head(self) -> tuple[int, str] | None:
        rows = self._head_sql("SELECT seq, hash FROM authority_audit_head WHERE id = 1"
                              ).fetchall()
        heads = [(rows[0][0], rows[0][1])] if rows else []
        # Versions before the table kept the head as a cache record: still honoured, so a
        # store written by one is not read as having no head.
        legacy = _load(self._head.get(_AUDIT_HEAD))
        if legacy is not None:
            heads.append((legacy.get("seq"), legacy.get("hash")))
        for seq, digest in heads:
            if type(seq) is not int or not isinstance(digest, str):
                raise _CorruptRecord("audit head is malformed")
        return max(heads, key=lambda h: h[0]) if heads else None

    @_guarded
    def set_audit_head(self, seq: int, hash: str) -> None:
        # Forward only, in the one statement: a stale writer changes nothing.
        self._head_sql(
            "INSERT INTO authority_audit_head (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash "
            "WHERE excluded.seq > authority_audit_head.seq", (seq, hash))

    # -- moving to a shared backend (``authority db import-local``) -----------------------

    @_guarded
    def export_live(self, kind: str) -> list[tuple[str, Any, float | None]]:
        """``(key, value, seconds left or None)`` of every live record of ``kind``
        (``idempotency``, ``budget``, ``journal`` or ``dedupe``): what another backend
        needs to take over the open promises with their remaining lifetimes."""
        caches = {"idempotency": self._idem, "budget": self._budget,
                  "journal": self._journal, "dedupe": self._dedupe}
        cache = caches[kind]
        now = time.time()
        out: list[tuple[str, Any, float | None]] = []
        for key in _iter_str_keys(cache, newest_first=False):
            raw, expire_at = cache.get(key, expire_time=True)
            if raw is None:
                continue
            left = None if expire_at is None else expire_at - now
            if left is not None and left <= 0:
                continue
            value = _as_float(raw) if kind == "budget" else _load(raw)
            out.append((key, value, left))
        return out


def open_disk_store(path: Path, *, durable: bool) -> DiskStore:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise AuthorityUnavailable(f"state store unavailable: open: {_describe(exc)}") from exc
    return DiskStore(path, durable=durable)


def open_for_policy(policy: Any) -> DiskStore:
    """``state.path`` (relative to the policy file); durability follows ``audit.fsync``:
    one switch decides whether the gateway's records survive a power cut."""
    return open_disk_store(policy.state_path, durable=policy.audit.fsync)

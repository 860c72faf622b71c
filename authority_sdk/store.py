"""The state store (DESIGN.md §7): idempotency, kill switch, budgets, approvals,
the execution journal, business-key dedupe and the audit chain head.

``Store`` is the interface the engine codes against; ``DiskStore`` is the
embedded default on ``diskcache`` (SQLite in WAL mode, safe across threads and
processes). Every read-then-write runs inside one SQLite ``BEGIN IMMEDIATE``
transaction (``Cache.transact()``), so concurrent processes serialise on it.

Fail closed: any storage failure (sqlite errors, OS errors, lock timeouts,
unreadable records) surfaces as ``AuthorityUnavailable``, which the gateway
turns into a denial (503), never into "no state, so allow".

Records are plain JSON-able dicts kept as JSON text rather than pickles, so a
tampered state directory cannot execute code when it is read. Times are epoch
seconds (``time.time()``) because records are shared between processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

import diskcache

from .errors import AuthorityUnavailable

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["DiskStore", "IdemBegin", "IdemState", "Store", "open_store"]

IdemState = Literal["new", "replay", "conflict", "in_progress"]


@dataclass(frozen=True)
class IdemBegin:
    """Outcome of ``Store.idem_begin``.

    ``record`` is the stored record: the fresh in-flight claim for ``new``, the
    finished record (with ``response``) for ``replay``, the other request's
    record for ``conflict`` and the live claim for ``in_progress``.
    """

    state: IdemState
    record: dict[str, Any] | None


@runtime_checkable
class Store(Protocol):
    """Everything the engine keeps between requests and across processes.

    Implementations must make each method atomic across processes and raise
    ``AuthorityUnavailable`` when the storage cannot be read or written.
    """

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...

    def health(self) -> None:
        """Raise ``AuthorityUnavailable`` unless the store can be read and written."""
        ...

    # -- idempotency ---------------------------------------------------------------

    def idem_begin(self, key: str, fingerprint: str, *, ttl_s: float, lease_s: float,
                   owner: dict[str, Any] | None = None,
                   owner_dead: Callable[[dict[str, Any]], bool] | None = None) -> IdemBegin:
        """Claim ``key`` for a request with ``fingerprint``.

        No record, an expired one, or an in-flight claim whose lease ran out (a
        crashed holder) → store ``{"status": "in_flight", "fingerprint",
        "lease_until"}`` and return ``new``. Another fingerprint → ``conflict``;
        same fingerprint in flight with a live lease → ``in_progress``; same
        fingerprint finished → ``replay`` with the stored response. ``owner`` is
        recorded on the claim; ``owner_dead(owner)`` lets a claim whose holder is
        known to be gone (``kill -9``) be taken over before its lease runs out.
        """
        ...

    def idem_finish(self, key: str, fingerprint: str, response: dict[str, Any], *,
                    ttl_s: float) -> None:
        """Store ``{"status": "done", "fingerprint", "response"}``, expiring after ``ttl_s``."""
        ...

    def idem_abandon(self, key: str, fingerprint: str) -> None:
        """Drop our in-flight claim (the upstream failed), so a retry may run."""
        ...

    # -- kill switch -----------------------------------------------------------------

    def kill_switch_state(self) -> dict[str, dict[str, Any]]:
        """``scope -> {"engaged", "reason", "actor", "ts"}`` for every scope ever set.

        Scope ``"*"`` is global, any other is an environment name. Read on every
        request: one small read.
        """
        ...

    def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                        actor: str | None) -> dict[str, Any]:
        """Engage or release ``scope``; return its new entry."""
        ...

    # -- budgets ---------------------------------------------------------------------

    def budget_reserve(self, counters: list[tuple[str, float]], *, min_usd: float,
                       max_usd: float, ttl_s: float) -> float | None:
        """Reserve spend against every ``(counter, limit)`` at once.

        ``room = min(limit - used)``; below ``min_usd`` → ``None`` and nothing
        changes; else ``grant = min(max_usd, room)`` is added to every counter and
        returned. Counters expire ``ttl_s`` after their last write.
        """
        ...

    def budget_settle(self, counters: list[str], *, reserved: float, actual: float,
                      ttl_s: float) -> None:
        """Replace a reservation by the actual spend (``actual=0`` releases it)."""
        ...

    def budget_used(self, counter: str) -> float:
        """Spend recorded on ``counter`` (0.0 when unknown or expired)."""
        ...

    # -- approvals -------------------------------------------------------------------

    def approval_create(self, approval: dict[str, Any]) -> None:
        """Store a new approval (needs ``id``, ``status``, ``expires_at``)."""
        ...

    def approval_get(self, approval_id: str) -> dict[str, Any] | None:
        """The approval, with an overdue ``pending`` one turned (and persisted) ``expired``."""
        ...

    def approval_list(self, status: str | None = None) -> list[dict[str, Any]]:
        """Approvals newest first, expiry applied, optionally of one status."""
        ...

    def approval_transition(self, approval_id: str, from_status: str | tuple[str, ...],
                            to_status: str, **fields: Any) -> dict[str, Any] | None:
        """Compare-and-set: move to ``to_status`` (and set ``fields``) only from ``from_status``.

        An overdue pending approval counts as ``expired``. Returns the new
        record, or ``None`` when the current status did not match; of two
        racing callers exactly one wins.
        """
        ...

    # -- execution journal -------------------------------------------------------------

    def journal_begin(self, action_key: str, info: dict[str, Any], *,
                      ttl_s: float) -> dict[str, Any] | None:
        """``None``: we wrote ``started`` and own the execution; else the existing entry."""
        ...

    def journal_finish(self, action_key: str, status: str, result: Any, *,
                       ttl_s: float) -> dict[str, Any]:
        """Record the outcome of the execution; return the entry."""
        ...

    def journal_get(self, action_key: str) -> dict[str, Any] | None:
        """The entry for ``action_key``, if any."""
        ...

    def journal_mark(self, action_key: str, from_status: str, to_status: str,
                     **fields: Any) -> dict[str, Any] | None:
        """Compare-and-set on the entry's status (e.g. ``started`` → ``in_doubt``)."""
        ...

    def journal_list(self, status: str | None = None) -> list[dict[str, Any]]:
        """Entries newest first, optionally of one status (e.g. all ``in_doubt``)."""
        ...

    # -- business-key dedupe -------------------------------------------------------------

    def dedupe_claim(self, key: str, owner: dict[str, Any], *,
                     ttl_s: float) -> dict[str, Any] | None:
        """``None``: ``key`` is now ours; else the current owner."""
        ...

    def dedupe_release(self, key: str, owner_action_key: str) -> None:
        """Release ``key`` if its owner's ``action_key`` is ``owner_action_key``."""
        ...

    # -- audit chain head ----------------------------------------------------------------

    def get_audit_head(self) -> tuple[int, str] | None:
        """Last audited ``(seq, hash)``, so a log cut short is detected."""
        ...

    def set_audit_head(self, seq: int, hash: str) -> None:
        """Record the last audited ``(seq, hash)``."""
        ...


# ---------------------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")

_KILL_SWITCH = "kill_switch"
_AUDIT_HEAD = "audit_head"
# An int key can never collide with the engine's str keys, and listings skip it.
_PROBE = -1

DEFAULT_TIMEOUT_S = 10.0


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
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


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


def _as_float(raw: Any) -> float:
    if raw is None:
        return 0.0
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _CorruptRecord(f"budget counter holds {type(raw).__name__}")
    return float(raw)


def _iter_str_keys(cache: diskcache.Cache) -> Iterator[str]:
    """Keys newest first (rowid descending), skipping the health probe."""
    for key in reversed(cache):
        if isinstance(key, str):
            yield key


def _number(record: dict[str, Any], field: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _CorruptRecord(f"field {field!r} is not a number")
    return float(value)


def _remaining(expire_time: float | None, now: float) -> float | None:
    """The TTL left on a record, to keep it when a CAS rewrites the record."""
    if expire_time is None:
        return None
    return max(expire_time - now, 0.001)


def _check_ttl(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")


class DiskStore(Store):
    """``Store`` on diskcache: one SQLite database per kind of record under ``path``.

    Separate databases keep listings (approvals, journal) from scanning every
    idempotency record, and keep writers of unrelated records off each other's
    lock. Nothing is ever evicted (``eviction_policy="none"``): records leave
    only by their own TTL. With ``durable`` (the default) every commit is
    fsynced (``synchronous=FULL``), so a power cut cannot forget a ``started``
    journal entry and let an action run twice.
    """

    _KINDS = ("idempotency", "budget", "approvals", "journal", "dedupe", "control", "audit_head")
    # The audit head need not survive a power cut: the log line it points at is
    # fsynced first, and a head one step behind the log is what a crash leaves and
    # what verify accepts. Skipping its fsync halves the audit cost of a request.
    _LAZY_SYNC = frozenset({"audit_head"})

    def __init__(self, path: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 durable: bool = True) -> None:
        self._path = Path(path)
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
         self._control, self._head) = self._caches

    @property
    def path(self) -> Path:
        return self._path

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
    def idem_begin(self, key: str, fingerprint: str, *, ttl_s: float, lease_s: float,
                   owner: dict[str, Any] | None = None,
                   owner_dead: Callable[[dict[str, Any]], bool] | None = None) -> IdemBegin:
        _check_ttl("ttl_s", ttl_s)
        _check_ttl("lease_s", lease_s)
        cache = self._idem
        with cache.transact():
            now = time.time()
            record = _load(cache.get(key))
            if record is not None:
                holder = record.get("owner")
                crashed = record.get("status") == "in_flight" and (
                    _number(record, "lease_until") <= now
                    or (owner_dead is not None and isinstance(holder, dict)
                        and owner_dead(holder)))
                if not crashed:
                    if record.get("fingerprint") != fingerprint:
                        return IdemBegin("conflict", record)
                    if record.get("status") == "in_flight":
                        return IdemBegin("in_progress", record)
                    return IdemBegin("replay", record)
            claim = {"status": "in_flight", "fingerprint": fingerprint,
                     "lease_until": now + lease_s, "claimed_at": now, "owner": owner}
            cache.set(key, _dump(claim), expire=max(ttl_s, lease_s))
            return IdemBegin("new", claim)

    @_guarded
    def idem_finish(self, key: str, fingerprint: str, response: dict[str, Any], *,
                    ttl_s: float) -> None:
        _check_ttl("ttl_s", ttl_s)
        payload = _dump({"status": "done", "fingerprint": fingerprint, "response": response,
                         "finished_at": time.time()})
        cache = self._idem
        with cache.transact():
            current = _load(cache.get(key))
            # Our lease ran out and a request with another body claimed the key:
            # the key is theirs now, so our response must not replace their record.
            if current is not None and current.get("fingerprint") != fingerprint:
                return
            cache.set(key, payload, expire=ttl_s)

    @_guarded
    def idem_abandon(self, key: str, fingerprint: str) -> None:
        cache = self._idem
        with cache.transact():
            current = _load(cache.get(key))
            if (current is not None and current.get("status") == "in_flight"
                    and current.get("fingerprint") == fingerprint):
                cache.delete(key)

    # -- kill switch -----------------------------------------------------------------

    @_guarded
    def kill_switch_state(self) -> dict[str, dict[str, Any]]:
        return _load(self._control.get(_KILL_SWITCH)) or {}

    @_guarded
    def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                        actor: str | None) -> dict[str, Any]:
        if not isinstance(scope, str) or not scope:
            raise ValueError("kill switch scope must be '*' or an environment name")
        entry = {"engaged": bool(engaged), "reason": reason, "actor": actor, "ts": time.time()}
        cache = self._control
        with cache.transact():
            state = _load(cache.get(_KILL_SWITCH)) or {}
            state[scope] = entry
            cache.set(_KILL_SWITCH, _dump(state))
        return dict(entry)

    # -- budgets ---------------------------------------------------------------------

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
        with cache.transact():
            for name in counters:
                # A counter that expired meanwhile (new period) must not go negative.
                cache.set(name, max(_as_float(cache.get(name)) + delta, 0.0), expire=ttl_s)

    @_guarded
    def budget_used(self, counter: str) -> float:
        return _as_float(self._budget.get(counter))

    # -- approvals -------------------------------------------------------------------

    @staticmethod
    def _overdue(approval: dict[str, Any], now: float) -> bool:
        expires_at = approval.get("expires_at")
        return (approval.get("status") == "pending" and expires_at is not None
                and _number(approval, "expires_at") <= now)

    def _expire_in_txn(self, approval_id: str, now: float) -> dict[str, Any] | None:
        """Re-read under the lock and persist ``expired`` if still overdue."""
        cache = self._approvals
        current = _load(cache.get(approval_id))
        if current is not None and self._overdue(current, now):
            current["status"] = "expired"
            current["expired_at"] = now
            cache.set(approval_id, _dump(current))
        return current

    @_guarded
    def approval_create(self, approval: dict[str, Any]) -> None:
        for field in ("id", "status", "expires_at"):
            if field not in approval:
                raise ValueError(f"approval needs {field!r}")
        record = {"created_at": time.time(), **approval}
        # No expiry: decided approvals stay for the record; pending ones expire by status.
        if not self._approvals.add(record["id"], _dump(record)):
            raise ValueError(f"approval {record['id']!r} already exists")

    @_guarded
    def approval_get(self, approval_id: str) -> dict[str, Any] | None:
        cache = self._approvals
        approval = _load(cache.get(approval_id))
        now = time.time()
        if approval is None or not self._overdue(approval, now):
            return approval
        with cache.transact():
            return self._expire_in_txn(approval_id, now)

    @_guarded
    def approval_list(self, status: str | None = None) -> list[dict[str, Any]]:
        cache = self._approvals
        now = time.time()
        out: list[dict[str, Any]] = []
        overdue: list[int] = []
        for key in _iter_str_keys(cache):
            approval = _load(cache.get(key))
            if approval is None:
                continue
            if self._overdue(approval, now):
                overdue.append(len(out))
            out.append(approval)
        if overdue:
            with cache.transact():
                for i in overdue:
                    out[i] = self._expire_in_txn(out[i]["id"], now) or out[i]
        if status is not None:
            out = [a for a in out if a.get("status") == status]
        return out

    @_guarded
    def approval_transition(self, approval_id: str, from_status: str | tuple[str, ...],
                            to_status: str, **fields: Any) -> dict[str, Any] | None:
        allowed = (from_status,) if isinstance(from_status, str) else tuple(from_status)
        cache = self._approvals
        with cache.transact():
            current = self._expire_in_txn(approval_id, time.time())
            if current is None or current.get("status") not in allowed:
                return None
            current.update(fields)
            current["status"] = to_status
            cache.set(approval_id, _dump(current))
            return current

    # -- execution journal -------------------------------------------------------------

    @_guarded
    def journal_begin(self, action_key: str, info: dict[str, Any], *,
                      ttl_s: float) -> dict[str, Any] | None:
        _check_ttl("ttl_s", ttl_s)
        cache = self._journal
        with cache.transact():
            existing = _load(cache.get(action_key))
            if existing is not None:
                return existing
            entry = {"action_key": action_key, **info, "status": "started",
                     "started_at": time.time()}
            cache.set(action_key, _dump(entry), expire=ttl_s)
            return None

    @_guarded
    def journal_finish(self, action_key: str, status: str, result: Any, *,
                       ttl_s: float) -> dict[str, Any]:
        _check_ttl("ttl_s", ttl_s)
        cache = self._journal
        with cache.transact():
            entry = _load(cache.get(action_key)) or {"action_key": action_key}
            entry.update(status=status, result=result, finished_at=time.time())
            cache.set(action_key, _dump(entry), expire=ttl_s)
            return entry

    @_guarded
    def journal_get(self, action_key: str) -> dict[str, Any] | None:
        return _load(self._journal.get(action_key))

    @_guarded
    def journal_mark(self, action_key: str, from_status: str, to_status: str,
                     **fields: Any) -> dict[str, Any] | None:
        cache = self._journal
        with cache.transact():
            raw, expire_time = cache.get(action_key, expire_time=True)
            entry = _load(raw)
            if entry is None or entry.get("status") != from_status:
                return None
            entry.update(fields)
            entry["status"] = to_status
            entry["marked_at"] = now = time.time()
            # An entry that needed a person never expires: in_doubt must stay listed until
            # someone settles it, and what they decided stays on the record.
            keep = to_status == "in_doubt" or from_status == "in_doubt"
            cache.set(action_key, _dump(entry),
                      expire=None if keep else _remaining(expire_time, now))
            return entry

    @_guarded
    def journal_list(self, status: str | None = None) -> list[dict[str, Any]]:
        cache = self._journal
        out: list[dict[str, Any]] = []
        for key in _iter_str_keys(cache):
            entry = _load(cache.get(key))  # None: expired or removed meanwhile
            if entry is not None and (status is None or entry.get("status") == status):
                out.append(entry)
        return out

    # -- business-key dedupe -------------------------------------------------------------

    @_guarded
    def dedupe_claim(self, key: str, owner: dict[str, Any], *,
                     ttl_s: float) -> dict[str, Any] | None:
        _check_ttl("ttl_s", ttl_s)
        cache = self._dedupe
        with cache.transact():
            existing = _load(cache.get(key))
            if existing is not None:
                return existing
            cache.set(key, _dump(owner), expire=ttl_s)
            return None

    @_guarded
    def dedupe_release(self, key: str, owner_action_key: str) -> None:
        cache = self._dedupe
        with cache.transact():
            existing = _load(cache.get(key))
            if existing is not None and existing.get("action_key") == owner_action_key:
                cache.delete(key)

    # -- audit chain head ----------------------------------------------------------------

    @_guarded
    def get_audit_head(self) -> tuple[int, str] | None:
        head = _load(self._head.get(_AUDIT_HEAD))
        if head is None:
            return None
        seq, digest = head.get("seq"), head.get("hash")
        if not isinstance(seq, int) or not isinstance(digest, str):
            raise _CorruptRecord("audit head is malformed")
        return seq, digest

    @_guarded
    def set_audit_head(self, seq: int, hash: str) -> None:
        self._head.set(_AUDIT_HEAD, _dump({"seq": seq, "hash": hash}))



def open_store(policy: Policy) -> Store:
    """The store the policy names (``state.path``; its folder is created).

    Durability follows ``audit.fsync``: one switch decides whether the
    gateway's records survive a power cut.
    """
    path = policy.state_path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise AuthorityUnavailable(f"state store unavailable: open: {_describe(exc)}") from exc
    return DiskStore(path, durable=policy.audit.fsync)

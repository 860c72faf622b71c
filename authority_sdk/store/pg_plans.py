"""Each store primitive as one PostgreSQL transaction, written once for both drivers.

A *plan* is a generator: it yields ``(sql, params)`` and receives the rows of that
statement (a list of tuples, empty for a statement that returns none). The sync store
runs plans on a psycopg connection, the async view on an ``AsyncConnection`` (a plan of
several dependent statements inside one READ COMMITTED transaction, see
:data:`TRANSACTIONAL`), so the SQL and the checks between statements exist once.

Atomicity comes from the database, never from a read-then-write in Python without a
lock: claims are ``INSERT … ON CONFLICT`` (which locks the conflicting row, so the
follow-up read sees the live owner), compare-and-set reads the row ``FOR UPDATE``,
multi-row reservations lock their rows in key order (no deadlock between two
reservations over overlapping counters; the reservation and the settlement are server-side
functions, schema version 3, so each is one statement). Expiry uses the database's clock, the one
clock all replicas share.

The async driver's group commit sends many writes as one statement instead
(:func:`state_batch`, ``authority_state_batch`` of schema version 4): each write becomes a
:class:`BatchItem`, checked exactly as its plan checks it, and the function applies every
item with the same SQL steps, in an order that never deadlocks (counters first, in name
order, then the idempotency rows in key order).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from .pg_arrays import FloatArray, Int4Array, TextArray
from .protocol import ExpiryGuard, Record

__all__ = ["BATCHED", "KILL_SWITCH_CHANNEL", "PLANS", "RELAXED", "TRANSACTIONAL", "BatchItem",
           "CorruptRecord", "Done", "Plan", "batch_item", "state_batch"]

Query = tuple[str, tuple[Any, ...]]
Rows = list[tuple[Any, ...]]
Plan = Generator[Query, Rows, Any]

NOW = "extract(epoch from clock_timestamp())::float8"
_CLAIM_TRIES = 5
KILL_SWITCH_CHANNEL = "authority_kill_switch"


class CorruptRecord(Exception):
    """A stored value that is not what this module wrote."""


def _dump(record: Any) -> str:
    # ASCII escapes: a lone surrogate or NUL becomes "\\ud800"/"\\u0000", which text holds.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)


def _load(raw: Any) -> Record:
    if not isinstance(raw, str):
        raise CorruptRecord(f"unexpected stored type {type(raw).__name__}")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CorruptRecord(f"undecodable record: {exc}") from None
    if not isinstance(value, dict):
        raise CorruptRecord("stored record is not an object")
    return value


def _first(rows: Rows) -> Record | None:
    return _load(rows[0][0]) if rows else None


def _number(record: Record, field: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptRecord(f"field {field!r} is not a number")
    return float(value)


def _check_ttl(name: str, value: float | None) -> None:
    if value is None:
        return
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")


def _statuses(from_status: str | Sequence[str]) -> list[str]:
    return [from_status] if isinstance(from_status, str) else list(from_status)


def _limit(limit: int | None) -> int | None:
    return None if limit is None else max(int(limit), 0)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- idempotency ---------------------------------------------------------------------------


def _claim(insert: str, params: tuple[Any, ...], current: str, key: str) -> Plan:
    # current: "<column> FROM <table> WHERE <key column> = %s" (the record in the way)
    """Insert a claim, or return the live record in its way, in one statement (one round
    trip, no transaction): the unique key lets exactly one concurrent caller win. The
    statement's snapshot may predate a claim that beat it (then neither part returns a
    row): look again."""
    for _ in range(_CLAIM_TRIES):
        rows = yield (f"WITH ins AS ({insert} RETURNING 1) SELECT NULL::text FROM ins "
                      f"UNION ALL SELECT {current} AND NOT EXISTS (SELECT 1 FROM ins)",
                      (*params, key))
        if rows and rows[0][0] is not None:
            return _load(rows[0][0])
        if rows:
            return None
    raise CorruptRecord("a claim stayed contended")


def idem_claim(key: str, record: Record, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    return (yield from _claim(
        f"INSERT INTO authority_idem AS t (key, claim_id, record, expires_at) "
        f"VALUES (%s, %s, %s, {NOW} + %s) "
        f"ON CONFLICT (key) DO UPDATE SET claim_id = EXCLUDED.claim_id, "
        f"record = EXCLUDED.record, expires_at = EXCLUDED.expires_at "
        f"WHERE t.expires_at <= {NOW}",
        (key, _opt_str(record.get("claim_id")), _dump(record), ttl_s),
        "record FROM authority_idem WHERE key = %s", key))


def idem_get(key: str) -> Plan:
    return _first((yield (f"SELECT record FROM authority_idem WHERE key = %s "
                          f"AND expires_at > {NOW}", (key,))))


def idem_replace(key: str, claim_id: str, record: Record, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    rows = yield (f"UPDATE authority_idem SET claim_id = %s, record = %s, "
                  f"expires_at = {NOW} + %s WHERE key = %s AND claim_id = %s "
                  f"AND expires_at > {NOW} RETURNING 1",
                  (_opt_str(record.get("claim_id")), _dump(record), ttl_s, key, claim_id))
    return bool(rows)


def idem_delete(key: str, claim_id: str) -> Plan:
    rows = yield (f"DELETE FROM authority_idem WHERE key = %s AND claim_id = %s "
                  f"AND expires_at > {NOW} RETURNING 1", (key, claim_id))
    return bool(rows)


def idem_put(key: str, record: Record, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    yield (f"INSERT INTO authority_idem (key, claim_id, record, expires_at) "
           f"VALUES (%s, %s, %s, {NOW} + %s) ON CONFLICT (key) DO UPDATE SET "
           f"claim_id = EXCLUDED.claim_id, record = EXCLUDED.record, "
           f"expires_at = EXCLUDED.expires_at",
           (key, _opt_str(record.get("claim_id")), _dump(record), ttl_s))
    return None


# -- counters ------------------------------------------------------------------------------


def budget_reserve(counters: list[tuple[str, float]], *, min_usd: float, max_usd: float,
                   ttl_s: float) -> Plan:
    """One statement: the server-side function (schema version 3) locks the counters in
    name order (creating those of a new period), checks the room on each and writes the
    grant — one round trip where a transaction of up to four took five."""
    _check_ttl("ttl_s", ttl_s)
    _check_grant(min_usd, max_usd)
    if not counters:
        return max_usd
    rows = yield ("SELECT authority_budget_reserve(%b::text[], %b::float8[], %s::float8, "
                  "%s::float8, %s::float8)",
                  (TextArray([name for name, _ in counters]),
                   FloatArray([float(limit) for _, limit in counters]),
                   float(min_usd), float(max_usd), float(ttl_s)))
    granted = rows[0][0] if rows else None
    return None if granted is None else float(granted)


def _check_grant(min_usd: float, max_usd: float) -> None:
    if min_usd < 0 or max_usd < min_usd:
        raise ValueError(f"need 0 <= min_usd <= max_usd, got {min_usd!r}, {max_usd!r}")


def idem_claim_reserve(key: str, record: Record, *, ttl_s: float,
                       counters: list[tuple[str, float]], min_usd: float, max_usd: float,
                       budget_ttl_s: float) -> Plan:
    """:func:`idem_claim` and, only if the claim is taken, :func:`budget_reserve`, in one
    statement (schema version 5, ``authority_claim_reserve``). Returns ``(the record in the
    way or None, the grant or None)``: a held key reserves nothing."""
    _check_ttl("ttl_s", ttl_s)
    _check_ttl("budget_ttl_s", budget_ttl_s)
    _check_grant(min_usd, max_usd)
    if not counters:
        raise ValueError("a reservation names at least one counter")
    rows = yield ("SELECT authority_claim_reserve(%b, %b, %b, %b::float8, %b::text[], "
                  "%b::float8[], %b::float8, %b::float8, %b::float8)",
                  (key, _opt_str(record.get("claim_id")), _dump(record), float(ttl_s),
                   TextArray([name for name, _ in counters]),
                   FloatArray([float(limit) for _, limit in counters]), float(min_usd),
                   float(max_usd), float(budget_ttl_s)))
    pair = rows[0][0] if rows else None
    if not isinstance(pair, list) or len(pair) != 2:
        raise CorruptRecord(f"authority_claim_reserve answered {pair!r}")
    found, granted = pair
    if found is not None:
        return _load(found), None
    return None, None if granted is None else float(granted)


def budget_settle(counters: list[str], *, reserved: float, actual: float,
                  ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    delta = actual - reserved
    if delta == 0 or not counters:
        return None
    yield ("SELECT authority_budget_settle(%s::text[], %s::float8, %s::float8)",
           (list(counters), float(delta), float(ttl_s)))
    return None


def budget_used(counter: str) -> Plan:
    rows = yield (f"SELECT used FROM authority_counters WHERE name = %s "
                  f"AND expires_at > {NOW}", (counter,))
    return float(rows[0][0]) if rows else 0.0


# -- kill switch ---------------------------------------------------------------------------


def kill_switch_state() -> Plan:
    rows = yield ("SELECT scope, entry FROM authority_kill_switch", ())
    return {str(scope): _load(entry) for scope, entry in rows}


def set_kill_switch(scope: str, engaged: bool, *, reason: str | None,
                    actor: str | None) -> Plan:
    if not isinstance(scope, str) or not scope:
        raise ValueError("kill switch scope must be '*' or an environment name")
    entry = {"engaged": bool(engaged), "reason": reason, "actor": actor, "ts": time.time()}
    yield ("INSERT INTO authority_kill_switch (scope, entry) VALUES (%s, %s) "
           "ON CONFLICT (scope) DO UPDATE SET entry = EXCLUDED.entry", (scope, _dump(entry)))
    # Delivered at commit to every listening replica, which drops its cached state.
    yield ("SELECT pg_notify(%s, current_schema())", (KILL_SWITCH_CHANNEL,))
    return dict(entry)


# -- approvals -----------------------------------------------------------------------------


def approval_create(approval: Record) -> Plan:
    for field in ("id", "status", "expires_at"):
        if field not in approval:
            raise ValueError(f"approval needs {field!r}")
    record = {"created_at": time.time(), **approval}
    rows = yield ("INSERT INTO authority_approvals (id, status, created_at, record) "
                  "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING 1",
                  (str(record["id"]), str(record["status"]),
                   float(record.get("created_at") or 0), _dump(record)))
    if not rows:
        raise ValueError(f"approval {record['id']!r} already exists")
    return None


def approval_get(approval_id: str) -> Plan:
    return _first((yield ("SELECT record FROM authority_approvals WHERE id = %s",
                          (approval_id,))))


def approval_list(status: str | None = None, *, limit: int | None = None,
                  before: str | None = None) -> Plan:
    where = ["(%s::text IS NULL OR a.status = %s)"]
    params: list[Any] = [status, status]
    if before is not None:
        # Only rows after the cursor's row in (created_at DESC, id) order; an unknown
        # cursor (or one of another status) lists nothing, like the reference backend.
        where.append("EXISTS (SELECT 1 FROM authority_approvals c WHERE c.id = %s "
                     "AND (%s::text IS NULL OR c.status = %s) "
                     "AND (a.created_at < c.created_at OR "
                     "(a.created_at = c.created_at AND a.id > c.id)))")
        params += [before, status, status]
    params.append(_limit(limit))
    rows = yield (f"SELECT a.record FROM authority_approvals a WHERE {' AND '.join(where)} "
                  f"ORDER BY a.created_at DESC, a.id LIMIT %s", tuple(params))
    return [_load(raw) for (raw,) in rows]


def approval_transition(approval_id: str, from_status: str | Sequence[str], to_status: str,
                        *, guard: ExpiryGuard | None = None, now: float | None = None,
                        **fields: Any) -> Plan:
    allowed = _statuses(from_status)
    current = _first((yield ("SELECT record FROM authority_approvals WHERE id = %s "
                             "AND status = ANY(%s) FOR UPDATE", (approval_id, allowed))))
    if current is None or current.get("status") not in allowed:
        return None
    if guard is not None:
        overdue = _number(current, "expires_at") <= (now if now is not None else time.time())
        if overdue != (guard == "expired"):
            return None
    current.update(fields)
    current["status"] = to_status
    yield ("UPDATE authority_approvals SET status = %s, record = %s WHERE id = %s",
           (to_status, _dump(current), approval_id))
    return current


# -- execution journal ---------------------------------------------------------------------


def _journal_cols(entry: Record) -> tuple[str, float, bool | None]:
    audited = entry.get("audited")
    return (str(entry.get("status")), float(entry.get("started_at") or 0),
            audited if isinstance(audited, bool) else None)


def journal_begin(action_key: str, entry: Record, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    record = {"started_at": time.time(), **entry, "action_key": action_key,
              "status": "started"}
    status, started_at, audited = _journal_cols(record)
    return (yield from _claim(
        f"INSERT INTO authority_journal AS t "
        f"(action_key, status, started_at, audited, record, expires_at) "
        f"VALUES (%s, %s, %s, %s, %s, {NOW} + %s) ON CONFLICT (action_key) DO UPDATE SET "
        f"status = EXCLUDED.status, started_at = EXCLUDED.started_at, "
        f"audited = EXCLUDED.audited, record = EXCLUDED.record, "
        f"expires_at = EXCLUDED.expires_at "
        f"WHERE t.expires_at IS NOT NULL AND t.expires_at <= {NOW}",
        (action_key, status, started_at, audited, _dump(record), ttl_s),
        "record FROM authority_journal WHERE action_key = %s", action_key))


_LIVE_JOURNAL = f"(expires_at IS NULL OR expires_at > {NOW})"


def journal_get(action_key: str) -> Plan:
    return _first((yield (f"SELECT record FROM authority_journal WHERE action_key = %s "
                          f"AND {_LIVE_JOURNAL}", (action_key,))))


def journal_update(action_key: str, from_status: str | Sequence[str], fields: Record, *,
                   ttl_s: float | None) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    allowed = _statuses(from_status)
    entry = _first((yield (f"SELECT record FROM authority_journal WHERE action_key = %s "
                           f"AND status = ANY(%s) AND {_LIVE_JOURNAL} FOR UPDATE",
                           (action_key, allowed))))
    if entry is None or entry.get("status") not in allowed:
        return None
    entry.update(fields)
    status, started_at, audited = _journal_cols(entry)
    yield (f"UPDATE authority_journal SET status = %s, started_at = %s, audited = %s, "
           f"record = %s, expires_at = CASE WHEN %s::float8 IS NULL THEN NULL "
           f"ELSE {NOW} + %s::float8 END WHERE action_key = %s",
           (status, started_at, audited, _dump(entry), ttl_s, ttl_s, action_key))
    return entry


def journal_list(status: str | None = None, *, unaudited: bool = False,
                 limit: int | None = None) -> Plan:
    where = [_LIVE_JOURNAL]
    params: list[Any] = []
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if unaudited:
        where.append("audited = false")
    params.append(_limit(limit))
    rows = yield (f"SELECT record FROM authority_journal WHERE {' AND '.join(where)} "
                  f"ORDER BY started_at DESC LIMIT %s", tuple(params))
    return [_load(raw) for (raw,) in rows]


# -- business-key dedupe ---------------------------------------------------------------------------


def dedupe_claim(key: str, owner: Record, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    return (yield from _claim(
        f"INSERT INTO authority_dedupe AS t (key, action_key, owner, claimed_at, expires_at) "
        f"VALUES (%s, %s, %s, {NOW}, {NOW} + %s) ON CONFLICT (key) DO UPDATE SET "
        f"action_key = EXCLUDED.action_key, owner = EXCLUDED.owner, "
        f"claimed_at = EXCLUDED.claimed_at, expires_at = EXCLUDED.expires_at "
        f"WHERE t.expires_at <= {NOW}",
        (key, _opt_str(owner.get("action_key")), _dump(owner), ttl_s),
        "owner FROM authority_dedupe WHERE key = %s", key))


def dedupe_release(key: str, owner_action_key: str) -> Plan:
    rows = yield (f"DELETE FROM authority_dedupe WHERE key = %s AND action_key = %s "
                  f"AND expires_at > {NOW} RETURNING 1", (key, owner_action_key))
    return bool(rows)


def dedupe_list(*, limit: int | None = None) -> Plan:
    rows = yield (f"SELECT key, owner FROM authority_dedupe WHERE expires_at > {NOW} "
                  f"ORDER BY claimed_at DESC, key LIMIT %s", (_limit(limit),))
    return [(str(key), _load(owner)) for key, owner in rows]


# -- outbox --------------------------------------------------------------------------------


def outbox_put(kind: str, item_id: str, payload: Record) -> Plan:
    yield ("INSERT INTO authority_outbox (kind, item_id, payload) VALUES (%s, %s, %s) "
           "ON CONFLICT (kind, item_id) DO UPDATE SET payload = EXCLUDED.payload",
           (kind, item_id, _dump({"ts": time.time(), "payload": payload})))
    return None


def outbox_list(kind: str, *, limit: int | None = None) -> Plan:
    rows = yield ("SELECT item_id, payload FROM authority_outbox WHERE kind = %s "
                  "ORDER BY seq LIMIT %s", (kind, _limit(limit)))
    out: list[tuple[str, Record]] = []
    for item_id, raw in rows:
        payload = _load(raw).get("payload")
        if not isinstance(payload, dict):
            raise CorruptRecord("outbox item has no payload")
        out.append((str(item_id), payload))
    return out


def outbox_delete(kind: str, item_id: str) -> Plan:
    rows = yield ("DELETE FROM authority_outbox WHERE kind = %s AND item_id = %s RETURNING 1",
                  (kind, item_id))
    return bool(rows)


# -- leases --------------------------------------------------------------------------------


def lease_acquire(name: str, holder: str, *, ttl_s: float) -> Plan:
    _check_ttl("ttl_s", ttl_s)
    rows = yield (f"INSERT INTO authority_leases AS l (name, holder, until) "
                  f"VALUES (%s, %s, {NOW} + %s) ON CONFLICT (name) DO UPDATE SET "
                  f"holder = EXCLUDED.holder, until = EXCLUDED.until "
                  f"WHERE l.holder = EXCLUDED.holder OR l.until <= {NOW} RETURNING 1",
                  (name, holder, ttl_s))
    return bool(rows)


def lease_get(name: str) -> Plan:
    rows = yield (f"SELECT holder, until FROM authority_leases WHERE name = %s "
                  f"AND until > {NOW}", (name,))
    return {"holder": rows[0][0], "until": float(rows[0][1])} if rows else None


def lease_release(name: str, holder: str) -> Plan:
    yield ("DELETE FROM authority_leases WHERE name = %s AND holder = %s", (name, holder))
    return None


# -- audit chain head ----------------------------------------------------------------------


def get_audit_head() -> Plan:
    rows = yield ("SELECT seq, hash FROM authority_audit_head WHERE id = 1", ())
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def set_audit_head(seq: int, hash: str) -> Plan:
    # Committed without waiting for the WAL flush (RELAXED): the log line it points at is
    # already durable, and a head one step behind the log is what a crash leaves and what
    # verify accepts (as on diskcache). Saves a disk flush per audited request.
    # Only forward: a stale writer (a replica behind another) cannot move the head back.
    yield ("INSERT INTO authority_audit_head (id, seq, hash) VALUES (1, %s, %s) "
           "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash "
           "WHERE authority_audit_head.seq < EXCLUDED.seq", (int(seq), hash))
    return None


# -- health --------------------------------------------------------------------------------


def health() -> Plan:
    """Read and write: a read-only standby or a full disk must fail this."""
    rows = yield (f"UPDATE authority_meta SET probed_at = {NOW} WHERE id = 1 RETURNING version",
                  ())
    if not rows:
        raise CorruptRecord("the schema has no version row: run `authority db migrate`")
    return None


# -- housekeeping ------------------------------------------------------------------------

_EXPIRING = (("authority_idem", "expires_at"), ("authority_counters", "expires_at"),
             ("authority_journal", "expires_at"), ("authority_dedupe", "expires_at"),
             ("authority_leases", "until"))


def sweep(batch: int = 1000) -> Plan:
    """Delete rows that expired (reads already treat them as absent), a batch per table,
    so tables do not grow with every key ever used. Returns how many went."""
    gone = 0
    for table, column in _EXPIRING:
        rows = yield (f"DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} "
                      f"WHERE {column} <= {NOW} LIMIT %s) RETURNING 1", (batch,))
        gone += len(rows)
    return gone


# -- group commit (schema version 4) ---------------------------------------------------------


@dataclass(slots=True)
class BatchItem:
    """One store write as an item of ``authority_state_batch`` (see pg_schema, version 4):
    the arguments of the one-item plan, checked the same way, and how to read its result."""

    method: str  # the store method, whose own plan runs it alone (the fallback)
    kind: str  # claim | replace | delete | put | reserve | settle
    relaxed: bool  # may commit without waiting for the WAL flush (RELAXED)
    key: str | None = None
    expect: str | None = None
    claim_id: str | None = None
    record: str | None = None
    ttl: float | None = None
    lo: float | None = None
    hi: float | None = None
    counters: tuple[tuple[str, float], ...] = ()

    def result(self, raw: str | None) -> Any:
        kind = self.kind
        if kind == "claim":
            return None if raw is None else _load(raw)
        if kind in ("replace", "delete"):
            return raw == "1"
        if kind == "reserve":
            return None if raw is None else float(raw)
        return None


class Done:
    """A write with nothing to send (no counters, nothing to settle): its result now."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def batch_item(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BatchItem | Done:
    """The batch item for ``store.method(*args, **kwargs)`` (one of :data:`BATCHED`); raises
    what the method's own plan raises for a bad argument, before anything is sent."""
    return _ITEMS[method](*args, **kwargs)


def _idem_claim_item(key: str, record: Record, *, ttl_s: float) -> BatchItem:
    _check_ttl("ttl_s", ttl_s)
    return BatchItem("idem_claim", "claim", True, key=key,
                     claim_id=_opt_str(record.get("claim_id")), record=_dump(record),
                     ttl=float(ttl_s))


def _idem_replace_item(key: str, claim_id: str, record: Record, *, ttl_s: float,
                       flush: bool = True) -> BatchItem:
    _check_ttl("ttl_s", ttl_s)
    return BatchItem("idem_replace" if flush else "idem_replace_lazy", "replace", not flush,
                     key=key, expect=claim_id, claim_id=_opt_str(record.get("claim_id")),
                     record=_dump(record), ttl=float(ttl_s))


def _idem_delete_item(key: str, claim_id: str) -> BatchItem:
    return BatchItem("idem_delete", "delete", True, key=key, expect=claim_id)


def _idem_put_item(key: str, record: Record, *, ttl_s: float) -> BatchItem:
    _check_ttl("ttl_s", ttl_s)
    return BatchItem("idem_put", "put", False, key=key,
                     claim_id=_opt_str(record.get("claim_id")), record=_dump(record),
                     ttl=float(ttl_s))


def _budget_reserve_item(counters: list[tuple[str, float]], *, min_usd: float,
                         max_usd: float, ttl_s: float) -> BatchItem | Done:
    _check_ttl("ttl_s", ttl_s)
    _check_grant(min_usd, max_usd)
    if not counters:
        return Done(max_usd)
    return BatchItem("budget_reserve", "reserve", False, lo=float(min_usd), hi=float(max_usd),
                     ttl=float(ttl_s),
                     counters=tuple((str(n), float(limit)) for n, limit in counters))


def _budget_settle_item(counters: list[str], *, reserved: float, actual: float,
                        ttl_s: float) -> BatchItem | Done:
    _check_ttl("ttl_s", ttl_s)
    delta = actual - reserved
    if delta == 0 or not counters:
        return Done(None)
    return BatchItem("budget_settle", "settle", True, lo=float(delta), ttl=float(ttl_s),
                     counters=tuple((str(n), 0.0) for n in counters))


_ITEMS: dict[str, Any] = {
    "idem_claim": _idem_claim_item, "idem_replace": _idem_replace_item,
    "idem_delete": _idem_delete_item, "idem_put": _idem_put_item,
    "budget_reserve": _budget_reserve_item, "budget_settle": _budget_settle_item}

# The writes a request makes on the async driver that are group-committed (postgres.py).
BATCHED = frozenset(_ITEMS)

# Binary parameters: a text array would be quoted and escaped element by element in
# Python (the records are JSON: kilobytes full of quotes), which cost more than the rest
# of the batch together; binary elements go out as they are, length-prefixed.
STATE_BATCH_SQL = ("SELECT authority_state_batch(%b, %b::text[], %b::text[], %b::text[], "
                   "%b::text[], %b::text[], %b::float8[], %b::float8[], %b::float8[], "
                   "%b::int4[], %b::int4[], %b::text[], %b::float8[])")


def state_batch(items: Sequence[BatchItem]) -> tuple[list[int], Query]:
    """The one statement that runs ``items``, and the order it runs them in: counters'
    items first (their rows are all locked first, in name order, by the function), then
    the idempotency items in key order, so two batches never wait on each other in a
    circle. ``order[j]`` is the index in ``items`` of the statement's j-th item."""
    order = sorted(range(len(items)), key=lambda i: (
        (0, "") if items[i].key is None else (1, items[i].key)))
    kinds: list[str] = []
    keys: list[str | None] = []
    expect: list[str | None] = []
    claim_ids: list[str | None] = []
    records: list[str | None] = []
    ttls: list[float | None] = []
    lo: list[float | None] = []
    hi: list[float | None] = []
    c_lo: list[int] = []
    c_hi: list[int] = []
    c_name: list[str] = []
    c_limit: list[float] = []
    for i in order:
        it = items[i]
        kinds.append(it.kind)
        keys.append(it.key)
        expect.append(it.expect)
        claim_ids.append(it.claim_id)
        records.append(it.record)
        ttls.append(it.ttl)
        lo.append(it.lo)
        hi.append(it.hi)
        c_lo.append(len(c_name) + 1)
        for name, limit in it.counters:
            c_name.append(name)
            c_limit.append(limit)
        c_hi.append(len(c_name))
    relax = all(it.relaxed for it in items)
    return order, (STATE_BATCH_SQL, (
        relax, TextArray(kinds), TextArray(keys), TextArray(expect), TextArray(claim_ids),
        TextArray(records), FloatArray(ttls), FloatArray(lo), FloatArray(hi), Int4Array(c_lo),
        Int4Array(c_hi), TextArray(c_name), FloatArray(c_limit)))


# The kinds of batch item whose result says whether the write took effect ('1' or '0'), or
# that always do: what may go before another statement in ``state_batch_then``.
THEN_KINDS = frozenset({"replace", "delete", "put", "settle"})


def state_batch_then(items: Sequence[BatchItem], then: Query,
                     after: Sequence[BatchItem] = ()) -> tuple[list[int], list[int], Query]:
    """``items`` as :func:`state_batch` runs them, then — only if every one took effect (no
    replace or delete found its claim gone) — ``then``, a SELECT of one value, then — only
    if ``then`` answered true — ``after`` as another batch: ONE statement, one transaction,
    one commit, never relaxed (what goes before is flushed with what follows). ``items``
    may be empty (``then`` runs first); every item is of :data:`THEN_KINDS`.

    Returns the order of ``items`` and of ``after`` in the statement (see
    :func:`state_batch`) and the statement. Its row: the batch's results (NULL without
    ``items``), ``then``'s value or NULL when it did not run, ``after``'s results or NULL."""
    if any(it.kind not in THEN_KINDS for it in (*items, *after)):
        raise ValueError("state_batch_then takes replace, delete, put and settle items")
    then_sql, then_params = then
    if not then_sql.startswith("SELECT "):
        raise ValueError("state_batch_then runs a SELECT of one value after the batch")
    # MATERIALIZED: each part runs once, in the order of their dependence, before anything
    # reads it; a CASE evaluates a volatile function only in the branch taken.
    params: list[Any] = []
    order: list[int] = []
    if items:
        order, (sql, first) = state_batch(items)
        took = " AND ".join(f"b.r[{j + 1}] = '1'" for j, i in enumerate(order)
                            if items[i].kind in ("replace", "delete")) or "true"
        parts = (f"WITH b(r) AS MATERIALIZED ({sql}), a(ok) AS MATERIALIZED (SELECT CASE "
                 f"WHEN {took} THEN {then_sql.removeprefix('SELECT ')} END FROM b) "
                 "SELECT b.r, a.ok")
        source = "b, a"
        params += [False, *first[1:]]
    else:
        parts = f"WITH a(ok) AS MATERIALIZED ({then_sql}) SELECT NULL::text[], a.ok"
        source = "a"
    params += then_params
    after_order: list[int] = []
    if after:
        after_order, (sql, last) = state_batch(after)
        parts += f", CASE WHEN a.ok IS TRUE THEN {sql.removeprefix('SELECT ')} END"
        params += [False, *last[1:]]
    else:
        parts += ", NULL::text[]"
    return order, after_order, (f"{parts} FROM {source}", tuple(params))


# Plans of several statements that must see one another's locks: run in one transaction.
# Every other plan's statements are atomic each by itself (one statement, or a claim that
# retries, see _claim; the reservation and the settlement are server-side functions), run
# without BEGIN/COMMIT: a round trip each saved.
TRANSACTIONAL = frozenset({"approval_transition", "journal_update", "set_kill_switch"})

# Writes committed without waiting for their WAL flush (``synchronous_commit = off``, for
# that transaction only). Committed is committed for every replica at once, and a replica
# killed mid-request loses nothing: only a crash of the database server itself can lose
# them, for at most ~3x wal_writer_delay (600 ms by default) — and not even then once any
# later synchronous commit (a reservation, an audit entry, a journal record, an approval)
# is on disk, since WAL is flushed in order. Every effect is preceded by such a commit, so
# no effect ever rests on one of these alone; losing one costs at most a repeated upstream
# call or a claim held until its lease ends (DESIGN.md §7, README "Running several
# replicas").
# ("idem_replace_lazy": ``idem_replace(flush=False)``, the finished answer; the answer kept
# before any effect is flushed, so a retry after a database crash re-gates that same answer.)
# ("set_audit_head": see the plan.) A relaxed plan that is not TRANSACTIONAL runs each
# statement in an implicit transaction of its own, relaxed in the same round trip.
RELAXED = frozenset({"idem_claim", "idem_replace_lazy", "idem_delete", "budget_settle",
                     "set_audit_head"})

PLANS: dict[str, Any] = {fn.__name__: fn for fn in (
    idem_claim, idem_get, idem_replace, idem_delete, idem_put, idem_claim_reserve,
    budget_reserve, budget_settle, budget_used,
    kill_switch_state, set_kill_switch,
    approval_create, approval_get, approval_list, approval_transition,
    journal_begin, journal_get, journal_update, journal_list,
    dedupe_claim, dedupe_release, dedupe_list,
    outbox_put, outbox_list, outbox_delete,
    lease_acquire, lease_get, lease_release,
    get_audit_head, set_audit_head, health, sweep,
)}

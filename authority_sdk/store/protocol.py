"""What a state backend must offer: atomic primitives, grouped by concern (DESIGN.md §7).

A backend stores plain JSON-able dicts and offers only *atomic primitives* —
conditional add, compare-and-set, conditional delete, reserve-against-limits,
append. The rules built on them (when an idempotency claim is stale, when an
approval is overdue, whether a claim's owner is alive, how long a key lives)
live above the backends, in :mod:`authority_sdk.idempotency`,
:mod:`authority_sdk.approvals` and :mod:`authority_sdk.liveness`, so every
backend behaves the same by construction. One contract suite
(``tests/store/test_contract.py``) runs against every registered backend.

Every method is atomic across threads, processes and machines sharing the
backend, and raises :class:`~authority_sdk.errors.AuthorityUnavailable` when
the storage cannot be read or written (the gateway then denies: fail closed).
Times are epoch seconds (``time.time()``): records are shared between
processes and machines. ``ttl_s`` means "the record is gone (reads as absent)
``ttl_s`` seconds after this write"; ``None`` means it never expires.

Record shapes the engine uses (backends treat them as opaque dicts except for
the fields named in a method's contract):

- idempotency: ``{"claim_id", "status": "in_flight"|"done", "fingerprint",
  "lease_until", "owner", "answer"?, "response"?}``
- approval: ``{"id", "status", "expires_at", "created_at", …}``
- journal entry: ``{"action_key", "status", "audited"?, …}``
- dedupe claim owner: ``{"action_key", "request_id", "approval_id"?, "owner"?, …}``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ApprovalStore",
    "ChainHeadStore",
    "ControlStore",
    "CounterStore",
    "DedupeStore",
    "ExpiryGuard",
    "IdempotencyStore",
    "JournalStore",
    "LeaseStore",
    "OutboxStore",
    "Store",
]

ExpiryGuard = Literal["unexpired", "expired"]
Record = dict[str, Any]


@runtime_checkable
class IdempotencyStore(Protocol):
    """Idempotency records, keyed by the engine's idempotency key."""

    def idem_claim(self, key: str, record: Record, *, ttl_s: float) -> Record | None:
        """Store ``record`` under ``key`` if no record lives there; return ``None``.

        Otherwise change nothing and return the record that is there. Of many
        concurrent callers on one key exactly one gets ``None``.
        """
        ...

    def idem_get(self, key: str) -> Record | None:
        """The record under ``key``, if any (expired records read as absent)."""
        ...

    def idem_replace(self, key: str, claim_id: str, record: Record, *,
                     ttl_s: float, flush: bool = True) -> bool:
        """Compare-and-set: replace the record iff its ``claim_id`` is ``claim_id``.

        ``flush=False``: nothing will rest on this record alone, so a backend that can may
        return before it is on disk (PostgreSQL: before its WAL flush; a later flushed
        commit carries it). A crash of the gateway still loses nothing."""
        ...

    def idem_delete(self, key: str, claim_id: str) -> bool:
        """Delete the record iff its ``claim_id`` is ``claim_id`` (and say whether it did)."""
        ...

    def idem_put(self, key: str, record: Record, *, ttl_s: float) -> None:
        """Store ``record`` unconditionally (retry detection for keyless requests)."""
        ...


@runtime_checkable
class CounterStore(Protocol):
    """Spend and limit counters (budgets, limits over time)."""

    def budget_reserve(self, counters: list[tuple[str, float]], *, min_usd: float,
                       max_usd: float, ttl_s: float) -> float | None:
        """Reserve against every ``(counter, limit)`` at once.

        ``room = min(limit - used)``; below ``min_usd`` → ``None`` and nothing
        changes; else ``grant = min(max_usd, room)`` is added to every counter
        and returned. No counter ever passes its limit, whatever the
        concurrency. Counters expire ``ttl_s`` after their last write. With no
        counters, returns ``max_usd``. (The unit is whatever the caller counts:
        dollars for budgets, calls or an argument's sum for limits.)
        """
        ...

    def budget_settle(self, counters: list[str], *, reserved: float, actual: float,
                      ttl_s: float) -> None:
        """Add ``actual - reserved`` to every counter, never going below zero."""
        ...

    def budget_used(self, counter: str) -> float:
        """The counter's value (0.0 when unknown or expired)."""
        ...


@runtime_checkable
class ControlStore(Protocol):
    """The kill switch: read on every request and before every effect."""

    def kill_switch_state(self, *, fresh: bool = False) -> dict[str, Record]:
        """``scope -> {"engaged", "reason", "actor", "ts"}`` for every scope ever set
        (``"*"`` is global, any other scope an environment).

        A shared backend may answer from a short cache (at most 1 s old, refreshed
        by change notifications) to admit requests without a round trip; with
        ``fresh=True`` — read right before every effect — it must read the truth.
        """
        ...

    def set_kill_switch(self, scope: str, engaged: bool, *, reason: str | None,
                        actor: str | None) -> Record:
        """Engage or release ``scope``; return its new entry."""
        ...


@runtime_checkable
class ApprovalStore(Protocol):
    def approval_create(self, approval: Record) -> None:
        """Add a new approval (needs ``id``, ``status``, ``expires_at``); ``ValueError``
        if the id exists. Approvals never expire from the store."""
        ...

    def approval_get(self, approval_id: str) -> Record | None:
        """The approval as stored (no expiry applied: that is a rule above)."""
        ...

    def approval_list(self, status: str | None = None, *, limit: int | None = None,
                      before: str | None = None) -> list[Record]:
        """Approvals newest first (by ``created_at``, then id), optionally of one
        status, at most ``limit``, and only those after the one with id ``before``
        in that order (a cursor). Listing ``pending`` must not scan decided ones."""
        ...

    def approval_transition(self, approval_id: str, from_status: str | Sequence[str],
                            to_status: str, *, guard: ExpiryGuard | None = None,
                            now: float | None = None, **fields: Any) -> Record | None:
        """Compare-and-set on the status; set ``fields`` too. Returns the new record, or
        ``None`` when the status did not match (or the guard failed).

        ``guard="unexpired"``: also require ``expires_at > now``; ``"expired"``:
        require ``expires_at <= now``. Of two racing callers exactly one wins.
        """
        ...


@runtime_checkable
class JournalStore(Protocol):
    """The execution journal: one entry per action key (DESIGN.md §5)."""

    def journal_begin(self, action_key: str, entry: Record, *,
                      ttl_s: float) -> Record | None:
        """Add ``entry`` (its ``status`` is ``started``) if there is none; return ``None``.
        Otherwise change nothing and return the existing entry."""
        ...

    def journal_get(self, action_key: str) -> Record | None:
        ...

    def journal_update(self, action_key: str, from_status: str | Sequence[str],
                       fields: Record, *, ttl_s: float | None) -> Record | None:
        """Compare-and-set on ``status``: merge ``fields`` (which may set a new
        ``status``) and reset the expiry to ``ttl_s`` (``None``: never expires).
        Returns the new entry, or ``None`` if the status did not match."""
        ...

    def journal_list(self, status: str | None = None, *, unaudited: bool = False,
                     limit: int | None = None) -> list[Record]:
        """Entries newest first (by ``started_at``), optionally of one status, or only
        those whose ``audited`` is ``False``. ``started``, ``in_doubt`` and unaudited
        entries are few and must be listed without scanning the others."""
        ...


@runtime_checkable
class DedupeStore(Protocol):
    """Business-key claims (``dedupe_on``)."""

    def dedupe_claim(self, key: str, owner: Record, *, ttl_s: float) -> Record | None:
        """``None``: ``key`` is now ``owner``'s; else the current owner (unchanged)."""
        ...

    def dedupe_release(self, key: str, owner_action_key: str) -> bool:
        """Delete iff the owner's ``action_key`` is ``owner_action_key``."""
        ...

    def dedupe_list(self, *, limit: int | None = None) -> list[tuple[str, Record]]:
        """Live claims, for recovery (releasing claims whose action never started)."""
        ...


@runtime_checkable
class OutboxStore(Protocol):
    """Durable work waiting for a worker: audit entries that could not be written yet,
    notifications. ``kind`` names the queue."""

    def outbox_put(self, kind: str, item_id: str, payload: Record) -> None:
        ...

    def outbox_list(self, kind: str, *, limit: int | None = None) -> list[tuple[str, Record]]:
        """Oldest first."""
        ...

    def outbox_delete(self, kind: str, item_id: str) -> bool:
        ...


@runtime_checkable
class LeaseStore(Protocol):
    """Named leases: one background worker among many processes, replica heartbeats."""

    def lease_acquire(self, name: str, holder: str, *, ttl_s: float) -> bool:
        """Take or renew ``name`` for ``holder`` until ``ttl_s`` from now; ``False`` if
        another holder's lease is still running."""
        ...

    def lease_get(self, name: str) -> Record | None:
        """``{"holder", "until"}`` of a lease still running, else ``None``."""
        ...

    def lease_release(self, name: str, holder: str) -> None:
        ...


@runtime_checkable
class ChainHeadStore(Protocol):
    """The audit chain's head outside the log, so a log cut short is detected."""

    def get_audit_head(self) -> tuple[int, str] | None:
        ...

    def set_audit_head(self, seq: int, hash: str) -> None:
        """Record ``(seq, hash)`` — only ever forward: a lower or equal ``seq`` than the
        one stored is ignored, so a stale writer cannot move the head back."""
        ...


@runtime_checkable
class Store(IdempotencyStore, CounterStore, ControlStore, ApprovalStore, JournalStore,
            DedupeStore, OutboxStore, LeaseStore, ChainHeadStore, Protocol):
    """Everything the engine keeps between requests and across processes."""

    name: str  # the backend's registry name, e.g. "diskcache"

    @property
    def aio(self) -> Any:
        """The same primitives as coroutines, for the async driver.

        A backend on the network awaits them on its own async pool, so the proxy's
        event loop never waits on a socket; a local backend whose calls measure
        faster inline than behind a thread hop may run them inline.
        """
        ...

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...

    def health(self) -> None:
        """Raise ``AuthorityUnavailable`` unless the store can be read and written."""
        ...

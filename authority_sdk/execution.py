"""Run an action at most once, or visibly not at all (DESIGN.md §5).

Before an executor runs, ``started`` is recorded under the action key; after,
the result (with ``audited: false`` until its audit entry is written). A second
attempt finds the record and returns it. A ``started`` record whose owner is
gone (crash, ``kill -9``, a replica whose heartbeat stopped) is retried only
when the executor is idempotent downstream; otherwise it becomes ``in_doubt``
and waits for a person. Nothing runs twice silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .effects import Decision, ExecuteOp, S
from .liveness import owner_alive_d, process_owner
from .records import JournalStatus

__all__ = ["RunOutcome", "mark_d", "run_once_d"]

# A started entry older than this is treated as abandoned even if its owner looks alive
# (a hung process): longer than any executor timeout the policy allows.
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class RunOutcome:
    status: str  # executed | failed | in_doubt
    result: Any
    error: str | None = None
    replayed: bool = False


def _from_entry(entry: dict[str, Any]) -> RunOutcome:
    body = entry.get("result") or {}
    if not isinstance(body, dict):
        body = {}
    return RunOutcome(str(entry.get("status")), body.get("result"), body.get("error"),
                     replayed=True)


def mark_d(key: str, from_status: str, to_status: str, *, ttl_s: float | None,
           **fields: Any) -> Decision[dict[str, Any] | None]:
    """Compare-and-set an entry's status; ``in_doubt`` never expires (a person must see it)."""
    keep = None if JournalStatus.IN_DOUBT in (from_status, to_status) else ttl_s
    entry = yield S.journal_update(key, from_status, {**fields, "status": to_status,
                                                      "marked_at": time.time()}, ttl_s=keep)
    return entry


def run_once_d(*, action_key: str, executor_name: str, idempotent: bool, action_type: str,
               arguments: dict[str, Any], ttl_s: float,
               info: dict[str, Any] | None = None) -> Decision[RunOutcome]:
    record = {"action_key": action_key, "executor": executor_name, "action_type": action_type,
              "arguments": arguments, "started_at": time.time(), **(info or {}),
              **process_owner()}
    existing = yield S.journal_begin(action_key, record, ttl_s=ttl_s)
    if existing is not None:
        if existing.get("status") != JournalStatus.STARTED:
            return _from_entry(existing)
        alive = yield from owner_alive_d(existing)
        started = existing.get("started_at")
        old = not isinstance(started, int | float) or time.time() - started > STALE_AFTER_S
        if alive and not old:
            return RunOutcome("in_doubt", None, "this action is being executed by another process")
        if not idempotent:
            yield from mark_d(action_key, "started", "in_doubt", ttl_s=None,
                              reason="interrupted before its result was recorded")
            return RunOutcome("in_doubt", None,
                             "an earlier execution was interrupted; the executor cannot "
                             "deduplicate, so a person must check whether it took effect")
        taken = yield from mark_d(action_key, "started", "started", ttl_s=ttl_s,
                                  **process_owner(), started_at=time.time(),
                                  attempt=int(existing.get("attempt", 1)) + 1)
        if taken is None:
            return RunOutcome("in_doubt", None, "this action is being executed by another process")
    try:
        outcome = yield ExecuteOp(executor_name, action_type, arguments, action_key)
    except Exception as exc:
        # An executor must report failures, not raise them; one that did may have acted.
        reason = f"the executor raised {type(exc).__name__}: {str(exc)[:300]}"
        yield S.journal_update(action_key, "started", {
            "status": "in_doubt", "reason": reason, "audited": False,
            "result": {"result": None, "error": reason}, "finished_at": time.time()},
            ttl_s=None)
        return RunOutcome("in_doubt", None, reason)
    status = JournalStatus.EXECUTED if outcome.ok else JournalStatus.FAILED
    # From in_doubt too: what the executor answered is the truth, whatever was assumed.
    yield S.journal_update(action_key, ("started", "in_doubt"), {
        "status": status.value, "result": {"result": outcome.result, "error": outcome.error},
        "finished_at": time.time(), "audited": False}, ttl_s=ttl_s)
    return RunOutcome(status.value, outcome.result, outcome.error)

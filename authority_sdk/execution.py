"""Run an action at most once, or visibly not at all (DESIGN.md §5).

Before an executor runs, ``started`` is recorded under the action key; after,
the result. A second attempt finds the record and returns it. A ``started``
record whose owner process is gone (crash, ``kill -9``) is retried only when
the executor is idempotent downstream; otherwise it becomes ``in_doubt`` and
waits for a person. Nothing runs twice silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .liveness import owner_alive, process_owner

if TYPE_CHECKING:
    from .executors import ExecutorRegistry
    from .store import Store

__all__ = ["Execution", "recover_interrupted", "run_once"]

@dataclass(frozen=True)
class Execution:
    status: str  # executed | failed | in_doubt
    result: Any
    error: str | None = None
    replayed: bool = False


def _finish(store: Store, key: str, status: str, result: Any, error: str | None,
            ttl_s: float) -> Execution:
    # From in_doubt too: what the executor answered is the truth, whatever was assumed.
    store.journal_update(key, ("started", "in_doubt"), {
        "status": status, "result": {"result": result, "error": error},
        "finished_at": time.time()}, ttl_s=ttl_s)
    return Execution(status, result, error)


def mark(store: Store, key: str, from_status: str, to_status: str, *, ttl_s: float | None,
         **fields: Any) -> dict[str, Any] | None:
    """Compare-and-set an entry's status; ``in_doubt`` never expires (a person must see it)."""
    keep = None if "in_doubt" in (from_status, to_status) else ttl_s
    return store.journal_update(key, from_status, {**fields, "status": to_status,
                                                   "marked_at": time.time()}, ttl_s=keep)


def _from_entry(entry: dict[str, Any]) -> Execution:
    body = entry.get("result") or {}
    return Execution(entry["status"], body.get("result"), body.get("error"), replayed=True)


def run_once(
    store: Store,
    executors: ExecutorRegistry,
    *,
    action_key: str,
    executor_name: str,
    action_type: str,
    arguments: dict[str, Any],
    ttl_s: float,
    info: dict[str, Any] | None = None,
    stale_after_s: float = 300.0,
) -> Execution:
    executor = executors.get(executor_name)
    record = {
        "action_key": action_key, "executor": executor_name, "action_type": action_type,
        "arguments": arguments, "started_at": time.time(), **(info or {}), **process_owner(),
    }
    existing = store.journal_begin(action_key, record, ttl_s=ttl_s)
    if existing is not None:
        if existing["status"] != "started":
            return _from_entry(existing)
        stale = (not owner_alive(store, existing)
                 or time.time() - float(existing.get("started_at", 0)) > stale_after_s)
        if not stale:
            return Execution("in_doubt", None, "this action is being executed by another process")
        if not executor.idempotent_downstream:
            mark(store, action_key, "started", "in_doubt", ttl_s=None,
                 reason="interrupted before its result was recorded")
            return Execution("in_doubt", None,
                             "an earlier execution was interrupted; the executor cannot "
                             "deduplicate, so a person must check whether it took effect")
        taken = mark(store, action_key, "started", "started", ttl_s=ttl_s, **process_owner(),
                     started_at=time.time(), attempt=int(existing.get("attempt", 1)) + 1)
        if taken is None:
            return Execution("in_doubt", None, "this action is being executed by another process")
    outcome = executor.execute(action_type, arguments, action_key)
    status = "executed" if outcome.ok else "failed"
    return _finish(store, action_key, status, outcome.result, outcome.error, ttl_s)


def recover_interrupted(store: Store, executors: ExecutorRegistry, *,
                        ttl_s: float) -> list[tuple[dict[str, Any], Execution]]:
    """Settle ``started`` records whose owner died: retry (idempotent) or mark ``in_doubt``."""
    settled: list[tuple[dict[str, Any], Execution]] = []
    for entry in store.journal_list("started"):
        if owner_alive(store, entry):
            continue
        try:
            executors.get(entry["executor"])
        except Exception:  # the executor left the policy: a person must look
            mark(store, entry["action_key"], "started", "in_doubt", ttl_s=None,
                 reason="executor no longer configured")
            settled.append((entry, Execution("in_doubt", None, "executor no longer configured")))
            continue
        ex = run_once(store, executors, action_key=entry["action_key"],
                      executor_name=entry["executor"], action_type=entry["action_type"],
                      arguments=entry.get("arguments") or {}, ttl_s=ttl_s)
        settled.append((entry, ex))
    return settled

"""Run an action at most once, or visibly not at all (DESIGN.md §5).

Before an executor runs, ``started`` is recorded under the action key; after,
the result. A second attempt finds the record and returns it. A ``started``
record whose owner process is gone (crash, ``kill -9``) is retried only when
the executor is idempotent downstream; otherwise it becomes ``in_doubt`` and
waits for a person. Nothing runs twice silently.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executors import ExecutorRegistry
    from .store import Store

__all__ = ["Execution", "owner_alive", "process_owner", "recover_interrupted", "run_once"]

_HOST = socket.gethostname()


def _proc_start(pid: int) -> str | None:
    # The start time tells a live process from a later one that reused its pid.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data.rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


_SELF = {"host": _HOST, "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def process_owner() -> dict[str, Any]:
    """This process, as recorded on claims: host, pid and the pid's start time."""
    pid = os.getpid()
    if _SELF["pid"] != pid:  # forked since import
        _SELF.update(pid=pid, pid_start=_proc_start(pid))
    return dict(_SELF)


def owner_alive(entry: dict[str, Any]) -> bool:
    """Is the process that recorded ``started`` still running?"""
    if entry.get("host") != _HOST:
        return True  # cannot tell for another machine: assume alive, the lease decides
    pid = entry.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = entry.get("pid_start")
    return start is None or _proc_start(pid) == start


@dataclass(frozen=True)
class Execution:
    status: str  # executed | failed | in_doubt
    result: Any
    error: str | None = None
    replayed: bool = False


def _finish(store: Store, key: str, status: str, result: Any, error: str | None,
            ttl_s: float) -> Execution:
    store.journal_finish(key, status, {"result": result, "error": error}, ttl_s=ttl_s)
    return Execution(status, result, error)


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
        stale = (not owner_alive(existing)
                 or time.time() - float(existing.get("started_at", 0)) > stale_after_s)
        if not stale:
            return Execution("in_doubt", None, "this action is being executed by another process")
        if not executor.idempotent_downstream:
            store.journal_mark(action_key, "started", "in_doubt",
                               reason="interrupted before its result was recorded")
            return Execution("in_doubt", None,
                             "an earlier execution was interrupted; the executor cannot "
                             "deduplicate, so a person must check whether it took effect")
        taken = store.journal_mark(action_key, "started", "started", **process_owner(),
                                   started_at=time.time(),
                                   attempt=int(existing.get("attempt", 1)) + 1)
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
        if owner_alive(entry):
            continue
        try:
            executors.get(entry["executor"])
        except Exception:  # the executor left the policy: a person must look
            store.journal_mark(entry["action_key"], "started", "in_doubt",
                               reason="executor no longer configured")
            settled.append((entry, Execution("in_doubt", None, "executor no longer configured")))
            continue
        ex = run_once(store, executors, action_key=entry["action_key"],
                      executor_name=entry["executor"], action_type=entry["action_type"],
                      arguments=entry.get("arguments") or {}, ttl_s=ttl_s)
        settled.append((entry, ex))
    return settled

"""Put right what a crash or an unwritable log left behind (DESIGN.md §5, §6, §10).

Decisions, run by the background worker (:mod:`.worker`) and at start-up:

- :func:`drain_audit_d` — audit entries parked in the outbox when the log could not
  be written after an effect, and executions whose outcome entry never made it
  (``audited: false`` in the journal), are written now; never dropped;
- :func:`recover_d` — ``started`` executions whose owner died are retried (an
  idempotent executor) or marked ``in_doubt``; while the kill switch of their
  environment is engaged they are left for later (and retried once it is
  released); business-key claims whose action never started and whose owner is
  gone are released, so an order is not blocked for the whole TTL.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .actions import kill_engaged
from .effects import AuditOp, Decision, S
from .execution import RunOutcome, mark_d, run_once_d
from .liveness import owner_alive_d

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["drain_audit_d", "recover_d"]

# A business-key claim younger than this may belong to a request between its claim and
# its journal entry; older and ownerless, it is an orphan.
_ORPHAN_AFTER_S = 60.0


def drain_audit_d(limit: int = 500) -> Decision[int]:
    """Write parked audit entries; raises ``AuthorityUnavailable`` while the log refuses."""
    written = 0
    for item_id, payload in (yield S.outbox_list("audit", limit=limit)):
        event, fields = payload.get("event"), payload.get("fields")
        if isinstance(event, str) and isinstance(fields, dict):
            details = dict(fields.get("details") or {})
            details["parked"] = True
            yield AuditOp(((event, {**fields, "details": details}),))
            written += 1
        yield S.outbox_delete("audit", item_id)
    for entry in (yield S.journal_list(unaudited=True, limit=limit)):
        yield AuditOp((("action", _outcome_entry(entry)),))
        status = str(entry.get("status"))
        yield S.journal_update(entry["action_key"], status, {"audited": True},
                               ttl_s=None if status == "in_doubt" else 86400.0)
        written += 1
    return written


def _outcome_entry(entry: dict[str, Any], actor: str = "recovery") -> dict[str, Any]:
    result = entry.get("result")
    body: dict[str, Any] = result if isinstance(result, dict) else {}
    status = entry.get("status")
    return dict(
        request_id=entry.get("request_id"), environment=entry.get("environment"),
        action_type=entry.get("action_type"),
        decision="error" if status == "in_doubt" else "allow",
        reason=body.get("error") or entry.get("reason") or "outcome recorded after the fact",
        execution_result={"status": status, "result": body.get("result")}, actor=actor,
        details={"action_key": entry.get("action_key"), "approval_id": entry.get("approval_id"),
                 "status": status, "recovered": True})


def recover_d(engine: Engine) -> Decision[list[dict[str, Any]]]:
    """Settle interrupted executions and orphan claims; returns what it did."""
    done: list[dict[str, Any]] = []
    kill_state = yield S.kill_switch_state(fresh=True)
    for entry in (yield S.journal_list("started")):
        if (yield from owner_alive_d(entry)):
            continue
        if kill_engaged(kill_state, str(entry.get("environment"))) is not None:
            continue  # left for later: nothing runs while the switch is on
        key = entry["action_key"]
        if entry.get("executor") not in engine.policy.executors:
            yield from mark_d(key, "started", "in_doubt", ttl_s=None,
                              reason="executor no longer configured")
            ex = RunOutcome("in_doubt", None, "executor no longer configured")
        else:
            ex = yield from run_once_d(
                action_key=key, executor_name=entry["executor"],
                idempotent=engine.executors.get(entry["executor"]).idempotent_downstream,
                action_type=entry["action_type"], arguments=entry.get("arguments") or {},
                ttl_s=engine.idempotency_ttl)
        approval_id = entry.get("approval_id")
        if approval_id:
            yield S.approval_transition(approval_id, "approved", ex.status, result=ex.result,
                                        error=ex.error)
        yield AuditOp((("action", dict(
            request_id=entry.get("request_id"), environment=entry.get("environment"),
            action_type=entry["action_type"],
            decision="error" if ex.status == "in_doubt" else "allow",
            reason=ex.error or "recovered after an interrupted execution",
            execution_result={"status": ex.status, "result": ex.result}, actor="recovery",
            policy_hash=engine.policy.hash,
            details={"action_key": key, "approval_id": approval_id, "status": ex.status})),))
        current = yield S.journal_get(key)
        if isinstance(current, dict) and current.get("audited") is False:
            yield S.journal_update(key, current.get("status"), {"audited": True},
                                   ttl_s=None if ex.status == "in_doubt"
                                   else engine.idempotency_ttl)
        done.append({"action_key": key, "status": ex.status, "approval_id": approval_id})
    now = time.time()
    for dkey, owner in (yield S.dedupe_list()):
        if owner.get("approval_id") or owner.get("dispatch") == "client" \
                or now - float(owner.get("ts") or now) < _ORPHAN_AFTER_S:
            continue  # held by an approval, run by the app, or maybe still starting
        if (yield S.journal_get(str(owner.get("action_key")))) is not None:
            continue
        if (yield from owner_alive_d(owner.get("owner"))):
            continue
        if (yield S.dedupe_release(dkey, str(owner.get("action_key")))):
            done.append({"dedupe_released": dkey, "action_key": owner.get("action_key")})
    return done

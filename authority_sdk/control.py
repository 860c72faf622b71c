"""The control plane: approvals, executions in doubt and the kill switch (DESIGN.md §4, §5).

The CLI and the proxy's management API both call these functions, so a
decision taken at the command line and one taken over HTTP are the same
decision, audited the same way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NoReturn

from .audit import redact
from .errors import (
    ApprovalError,
    ExecutionError,
    Forbidden,
    InvalidRequest,
    KillSwitchEngaged,
    NotFound,
)
from .execution import recover_interrupted, run_once
from .gating import action_hash
from .modes import resolve_action

if TYPE_CHECKING:
    from .engine import Gateway

__all__ = [
    "approval_preview",
    "approve",
    "get_approval",
    "kill_switch_status",
    "list_approvals",
    "list_executions",
    "recover",
    "reject",
    "resolve_execution",
    "set_kill_switch",
]

APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "executed", "failed",
                     "in_doubt")
EXECUTION_STATUSES = ("started", "executed", "failed", "in_doubt")
RESOLUTIONS = ("executed", "failed")


def public_approval(gw: Gateway, a: dict[str, Any], *,
                    preview: bool | None = None) -> dict[str, Any]:
    """What an approver sees: everything but the fields the policy says to redact, and
    ``would_execute``, what approving runs (``approval_preview``) — by default for a
    pending approval, the one a person is about to decide."""
    out = {k: v for k, v in a.items() if k not in ("tool_schema",)}
    out["arguments"] = shown = redact(a.get("arguments"), gw.policy.redact)
    out.pop("arguments_json", None)
    if "tool_call" in out:
        out["tool_call"] = {**out["tool_call"], "arguments": shown}
    if preview or (preview is None and a.get("status") == "pending"):
        described = approval_preview(gw, a)
        if described is not None:
            out["would_execute"] = described
    return out


def approval_preview(gw: Gateway, a: dict[str, Any]) -> dict[str, Any] | None:
    """What approving ``a`` would run, as its executor describes it: for an email, the
    parsed recipients by field and the envelope; for a webhook, the request. Secrets are
    masked by the executor and the policy's redacted fields are masked here too.

    Built from the stored arguments with the executor configured now — the one
    ``approve`` would call — so what the approver reads is what runs. None for an
    action the app runs itself (client dispatch). Never raises on stored data.
    """
    name = a.get("executor")
    args = a.get("arguments")
    if a.get("dispatch") != "gateway" or not isinstance(name, str) or not isinstance(args, dict):
        return None
    if name not in gw.executors:
        return {"error": f"executor {name!r} is no longer configured: approving runs nothing"}
    try:
        described = gw.executors.get(name).describe(str(a.get("action_type")), args,
                                                     str(a.get("action_key") or ""))
    except Exception as exc:  # a describe bug must not hide the approval from its approver
        return {"error": f"cannot describe the action: {type(exc).__name__}"}
    shown: dict[str, Any] = redact(described, gw.policy.redact)
    return shown


def list_approvals(gw: Gateway, status: str | None = None) -> list[dict[str, Any]]:
    if status is not None and status not in APPROVAL_STATUSES:
        raise InvalidRequest(f"unknown status {status!r} (one of {', '.join(APPROVAL_STATUSES)})")
    return [public_approval(gw, a) for a in gw.store.approval_list(status)]


def _load(gw: Gateway, approval_id: str) -> dict[str, Any]:
    a = gw.store.approval_get(approval_id)
    if a is None:
        raise NotFound(f"no approval {approval_id!r}")
    return a


def get_approval(gw: Gateway, approval_id: str) -> dict[str, Any]:
    return public_approval(gw, _load(gw, approval_id), preview=True)


def _audit_transition(gw: Gateway, a: dict[str, Any], actor: str, status: str,
                      reason: str | None, decision: str = "allow",
                      result: Any = None) -> None:
    gw.audit_event("approval", request_id=a.get("request_id"),
                   environment=a.get("environment"), model=a.get("model"),
                   action_type=a.get("action_type"), decision=decision, reason=reason,
                   approval_status=status, actor=actor,
                   execution_result=redact(result, gw.policy.redact),
                   details={"approval_id": a["id"], "action_key": a.get("action_key")})


def _refuse(gw: Gateway, a: dict[str, Any], actor: str, exc: Exception) -> NoReturn:
    _audit_transition(gw, a, actor, a["status"], str(exc), decision="deny")
    raise exc


def _not_pending(gw: Gateway, a: dict[str, Any], actor: str) -> NoReturn:
    _refuse(gw, a, actor, ApprovalError(
        f"approval {a['id']} is {a['status']}, not pending: nothing was executed",
        code=f"approval_{a['status']}"))


def _decide(gw: Gateway, a: dict[str, Any], actor: str, to_status: str,
            **fields: Any) -> dict[str, Any]:
    """pending → to_status by compare-and-set; the loser of a race is refused, audited."""
    won = gw.store.approval_transition(a["id"], "pending", to_status, decided_by=actor,
                                       decided_at=time.time(), **fields)
    if won is None:
        _not_pending(gw, gw.store.approval_get(a["id"]) or a, actor)
    return won


def approve(gw: Gateway, approval_id: str, *, actor: str, reason: str | None = None,
            actor_requests: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Approve a pending action; a gateway-dispatched one executes once, right now.

    ``actor_requests``: names whose requests the approver may not approve (its own key).
    """
    a = _load(gw, approval_id)
    if a["status"] != "pending":
        _not_pending(gw, a, actor)
    if a.get("requested_by") in ({actor} | set(actor_requests)):
        _refuse(gw, a, actor, Forbidden(
            f"{actor} cannot approve an action its own request created",
            code="self_approval_forbidden"))
    kill = gw.kill_state(a["environment"])
    if kill is not None:
        _refuse(gw, a, actor, KillSwitchEngaged(
            f"the {kill['scope']} kill switch is engaged: nothing executes; "
            "the approval stays pending"))
    if action_hash(a["action_type"], a["arguments"], a["environment"]) != a["action_hash"]:
        _refuse(gw, a, actor, ApprovalError(
            "the stored action does not match what was shown for approval",
            code="approval_tampered"))
    now = resolve_action(gw.policy, a["environment"], a["action_type"], a["arguments_json"],
                         tool_schema=a.get("tool_schema"))
    if now.decision == "deny":
        _refuse(gw, a, actor, ApprovalError(
            f"the policy in force now denies this action ({now.code}: {now.reason}); "
            "the approval stays pending", code="approval_denied_by_policy"))
    if now.mode == "simulation_only":
        # simulation_only never runs the action, however it was approved.
        _refuse(gw, a, actor, ApprovalError(
            f"the policy in force now only simulates this action ({now.reason}); nothing "
            "was executed; the approval stays pending", code="approval_denied_by_policy"))
    if a.get("dispatch") == "gateway" and a.get("executor") not in gw.policy.executors:
        _refuse(gw, a, actor, ApprovalError(
            f"executor {a.get('executor')!r} is no longer configured; the approval stays "
            "pending", code="approval_denied_by_policy"))
    won = _decide(gw, a, actor, "approved", decision_reason=reason,
                  approved_policy_hash=gw.policy.hash)
    _audit_transition(gw, won, actor, "approved", reason)
    if won.get("dispatch") != "gateway" or not won.get("executor"):
        return public_approval(gw, won)  # the app fetches it and runs it itself
    ex = run_once(gw.store, gw.executors, action_key=won["action_key"],
                  executor_name=won["executor"], action_type=won["action_type"],
                  arguments=won["arguments"], ttl_s=gw.idempotency_ttl,
                  info={"approval_id": approval_id, "request_id": won.get("request_id"),
                        "environment": won.get("environment"),
                        "requested_by": won.get("requested_by")})
    final = gw.store.approval_transition(approval_id, "approved", ex.status,
                                         result=ex.result, error=ex.error,
                                         executed_at=time.time()) or won
    _audit_transition(gw, final, actor, ex.status, ex.error, result={
        "status": ex.status, "result": ex.result, "error": ex.error})
    return public_approval(gw, final)


def reject(gw: Gateway, approval_id: str, *, actor: str,
           reason: str | None = None) -> dict[str, Any]:
    won = _decide(gw, _load(gw, approval_id), actor, "rejected", decision_reason=reason)
    _release_dedupe_for(gw, won)
    _audit_transition(gw, won, actor, "rejected", reason, decision="deny")
    return public_approval(gw, won)


def _release_dedupe_for(gw: Gateway, a: dict[str, Any]) -> None:
    from .gating import _dedupe_key

    action = gw.policy.actions.get(a["action_type"])
    if action and action.dedupe_on:
        key = _dedupe_key(a["environment"], a["action_type"], action.dedupe_on, a["arguments"])
        if key:
            gw.store.dedupe_release(key, a["action_key"])


def set_kill_switch(gw: Gateway, engaged: bool, *, actor: str, reason: str | None = None,
                    environment: str | None = None) -> dict[str, Any]:
    if environment is not None and environment not in gw.policy.environments:
        raise InvalidRequest(f"unknown environment {environment!r}")
    scope = environment or "*"
    state = gw.store.set_kill_switch(scope, engaged, reason=reason, actor=actor)
    gw.audit_event("kill_switch", environment=environment, decision="deny" if engaged else "allow",
                   reason=reason, actor=actor,
                   details={"engaged": engaged, "scope": "global" if scope == "*" else scope})
    return {"scope": "global" if scope == "*" else scope, **state}


def kill_switch_status(gw: Gateway) -> dict[str, Any]:
    state = gw.store.kill_switch_state()
    return {
        "global": state.get("*", {"engaged": False}),
        "environments": {env: state.get(env, {"engaged": False})
                         for env in gw.policy.environments},
    }


def recover(gw: Gateway) -> list[dict[str, Any]]:
    """Settle executions a crash interrupted, and reflect them on their approvals."""
    out = []
    for entry, ex in recover_interrupted(gw.store, gw.executors, ttl_s=gw.idempotency_ttl):
        approval_id = entry.get("approval_id")
        if approval_id:
            gw.store.approval_transition(approval_id, "approved", ex.status, result=ex.result,
                                         error=ex.error)
        gw.audit_event("action", request_id=entry.get("request_id"),
                       environment=entry.get("environment"), action_type=entry["action_type"],
                       decision="error" if ex.status == "in_doubt" else "allow",
                       reason=ex.error or "recovered after an interrupted execution",
                       execution_result={"status": ex.status, "result": ex.result},
                       actor="recovery",
                       details={"action_key": entry["action_key"], "approval_id": approval_id,
                                "status": ex.status})
        out.append({"action_key": entry["action_key"], "status": ex.status,
                    "approval_id": approval_id})
    return out


# -- executions in doubt (DESIGN.md §5) ----------------------------------------------------


def public_execution(gw: Gateway, entry: dict[str, Any]) -> dict[str, Any]:
    """A journal entry as a person sees it: arguments and result redacted by the policy."""
    out = dict(entry)
    out["arguments"] = redact(entry.get("arguments"), gw.policy.redact)
    if "result" in out:
        out["result"] = redact(entry.get("result"), gw.policy.redact)
    return out


def list_executions(gw: Gateway, status: str | None = None) -> list[dict[str, Any]]:
    """Journal entries, newest first; ``status="in_doubt"`` is what waits for a person."""
    if status is not None and status not in EXECUTION_STATUSES:
        raise InvalidRequest(
            f"unknown status {status!r} (one of {', '.join(EXECUTION_STATUSES)})")
    entries = sorted(gw.store.journal_list(status),
                     key=lambda e: float(e.get("started_at") or 0), reverse=True)
    return [public_execution(gw, e) for e in entries]


def _audit_resolution(gw: Gateway, entry: dict[str, Any], actor: str, decision: str,
                      reason: str | None, status: str,
                      execution_result: dict[str, Any] | None = None) -> None:
    gw.audit_event("action", request_id=entry.get("request_id"),
                   environment=entry.get("environment"), action_type=entry.get("action_type"),
                   decision=decision, reason=reason, actor=actor,
                   execution_result=execution_result,
                   details={"action_key": entry.get("action_key"),
                            "approval_id": entry.get("approval_id"), "status": status,
                            "resolution": "manual"})


def resolve_execution(gw: Gateway, action_key: str, *, outcome: str, actor: str,
                      reason: str | None = None) -> dict[str, Any]:
    """Settle an ``in_doubt`` execution as a person found it on the real system.

    Nothing runs: the executor is never called. The entry moves ``in_doubt →
    outcome`` by compare-and-set (of two people resolving at once, one wins),
    so a retry of the same action then replays that outcome; an approval the
    execution came from follows.
    """
    if outcome not in RESOLUTIONS:
        raise InvalidRequest(f"outcome must be one of {', '.join(RESOLUTIONS)}, "
                             f"not {outcome!r}")
    entry = gw.store.journal_get(action_key)
    if entry is None:
        raise NotFound(f"no execution {action_key!r} in the journal")
    if entry.get("requested_by") == actor:
        own = Forbidden(f"{actor} cannot settle an action its own request created",
                        code="self_approval_forbidden")
        _audit_resolution(gw, entry, actor, "deny", own.message, str(entry.get("status")))
        raise own
    now = time.time()
    error = None if outcome == "executed" else (
        f"resolved as failed by {actor}" + (f": {reason}" if reason else ""))
    won = None
    if entry.get("status") == "in_doubt":
        won = gw.store.journal_mark(action_key, "in_doubt", outcome, resolved_by=actor,
                                    resolved_at=now, resolution_reason=reason,
                                    result={"result": None, "error": error})
    if won is None:
        current = gw.store.journal_get(action_key) or entry
        exc = ExecutionError(
            f"execution {action_key} is {current.get('status')}, not in_doubt: "
            "nothing was changed", status=current.get("status"))
        _audit_resolution(gw, current, actor, "deny", exc.message,
                          str(current.get("status")))
        raise exc
    _audit_resolution(gw, won, actor, "allow",
                      reason or f"a person resolved the execution as {outcome}", outcome,
                      {"status": outcome, "resolved_by": actor})
    out = public_execution(gw, won)
    approval_id = won.get("approval_id")
    if approval_id:
        moved = gw.store.approval_transition(approval_id, "in_doubt", outcome, error=error,
                                             resolved_by=actor, resolved_at=now,
                                             resolution_reason=reason)
        if moved is not None:
            _audit_transition(gw, moved, actor, outcome, reason, result={
                "status": outcome, "resolved_by": actor})
        current_apr = moved or gw.store.approval_get(approval_id)
        out["approval_status"] = current_apr.get("status") if current_apr else None
    return out

"""The control plane: approvals, executions in doubt and the kill switch (DESIGN.md §4, §5).

The CLI and the proxy's management API both call these functions, so a
decision taken at the command line and one taken over HTTP are the same
decision, audited the same way.

Every function takes the actor's :class:`Scope`. A key bound to an environment
reads and acts only there: what lies outside its scope is "not found" (its
existence is not revealed) and the attempt to act on it is audited. Only an
unscoped actor (an approver or admin key with no ``environment``, or the local
CLI, which has the state files anyway) sees every environment and touches the
global kill switch. Lists come in pages (``limit``, ``cursor``; see paging.py)
and everything shown is made printable (render.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from . import approvals as approval_rules
from . import dedupe
from .actions import kill_engaged
from .audit import redact
from .effects import AuditOp, Decision, S, run
from .errors import (
    ApprovalError,
    AuthorityError,
    ExecutionError,
    Forbidden,
    InvalidRequest,
    KillSwitchEngaged,
    NotFound,
)
from .execution import mark_d, run_once_d
from .limits import release_d
from .notifications import enqueue_d
from .paging import Page, check_limit, paginate
from .render import printable

if TYPE_CHECKING:
    from .engine import Gateway

__all__ = [
    "UNSCOPED",
    "Page",
    "Scope",
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


@dataclass(frozen=True)
class Scope:
    """Where an actor may read and act: one environment, or every one (``None``).

    Not the environment a key's chat requests run in: a key with no
    ``environment`` chats in the policy's default environment but manages
    every environment. The proxy keeps the two apart (``Identity.caller`` and
    ``Identity.scope``).
    """

    environment: str | None = None

    @property
    def unscoped(self) -> bool:
        return self.environment is None

    def covers(self, environment: Any) -> bool:
        return self.environment is None or environment == self.environment

    def describe(self) -> str:
        return "every environment" if self.environment is None else \
            f"environment {self.environment!r}"


UNSCOPED = Scope()


def _refused_out_of_scope(what: str) -> NotFound:
    exc = NotFound(f"no {what}")
    exc.audited = True
    return exc


def _statuses(status: str | None, known: tuple[str, ...]) -> frozenset[str] | None:
    """``status`` as a set: one status or a comma-separated list of them; None for all."""
    if status is None:
        return None
    wanted = frozenset(s.strip() for s in status.split(","))
    unknown = sorted(s for s in wanted if s not in known)
    if unknown or not wanted:
        shown = ", ".join(repr(s[:40]) for s in unknown[:3]) or repr(status[:40])
        raise InvalidRequest(f"unknown status {shown} (one of {', '.join(known)}, or several "
                             "separated by commas)")
    return wanted


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


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
    return dict(printable(out))


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


def list_approvals(gw: Gateway, status: str | None = None, *, limit: int | None = None,
                   cursor: str | None = None, scope: Scope = UNSCOPED) -> Page:
    """Approvals within ``scope``, newest first, one page of at most ``limit``.

    ``status``: one status or several separated by commas (``approved,rejected``).
    """
    wanted = _statuses(status, APPROVAL_STATUSES)
    n = check_limit(limit)
    one = next(iter(wanted)) if wanted is not None and len(wanted) == 1 else None
    now = time.time()
    # An overdue pending approval is expired (a rule above the store): settled as listed.
    items = (a for a in (approval_rules.settle_expiry(gw.store, a, now, gw.policy)
                         for a in gw.store.approval_list(one))
             if scope.covers(a.get("environment"))
             and (wanted is None or a.get("status") in wanted))
    page, nxt = paginate(items, lambda a: (_time(a.get("created_at")), str(a.get("id"))),
                         kind="approvals", limit=n, cursor=cursor)
    return Page((public_approval(gw, a) for a in page), nxt)


def _load(gw: Gateway, approval_id: str, scope: Scope = UNSCOPED) -> dict[str, Any]:
    a = approval_rules.get(gw.store, approval_id, gw.policy)
    if a is None or not scope.covers(a.get("environment")):
        raise NotFound(f"no approval {approval_id!r}")
    return a


def _load_to_act(gw: Gateway, approval_id: str, actor: str, scope: Scope) -> dict[str, Any]:
    """The approval, or NotFound; an attempt on one outside the scope is audited."""
    a = _load(gw, approval_id)
    if not scope.covers(a.get("environment")):
        _audit_transition(gw, a, actor, a["status"],
                          f"refused: {actor} may act only in {scope.describe()}",
                          decision="deny")
        raise _refused_out_of_scope(f"approval {approval_id!r}")
    return a


def get_approval(gw: Gateway, approval_id: str, *, scope: Scope = UNSCOPED) -> dict[str, Any]:
    return public_approval(gw, _load(gw, approval_id, scope), preview=True)


def _audit_transition(gw: Gateway, a: dict[str, Any], actor: str, status: str,
                      reason: str | None, decision: str = "allow",
                      result: Any = None) -> None:
    gw.audit_event("approval", request_id=a.get("request_id"),
                   environment=a.get("environment"), model=a.get("model"),
                   action_type=a.get("action_type"), decision=decision, reason=reason,
                   approval_status=status, actor=actor,
                   execution_result=redact(result, gw.policy.redact),
                   details={"approval_id": a["id"], "action_key": a.get("action_key")})


def _refuse(gw: Gateway, a: dict[str, Any], actor: str, exc: AuthorityError) -> NoReturn:
    _audit_transition(gw, a, actor, a["status"], str(exc), decision="deny")
    exc.audited = True
    raise exc


def _not_pending(gw: Gateway, a: dict[str, Any], actor: str) -> NoReturn:
    _refuse(gw, a, actor, ApprovalError(
        f"approval {a['id']} is {a['status']}, not pending: nothing was executed",
        code=f"approval_{a['status']}"))


def _decide(gw: Gateway, a: dict[str, Any], actor: str, to_status: str,
            **fields: Any) -> dict[str, Any]:
    """pending → to_status by compare-and-set; the loser of a race is refused, audited."""
    won = gw.store.approval_transition(a["id"], "pending", to_status, guard="unexpired",
                                       now=time.time(), decided_by=actor,
                                       decided_at=time.time(), **fields)
    if won is None:
        _not_pending(gw, approval_rules.get(gw.store, a["id"], gw.policy) or a, actor)
    return won


def approve(gw: Gateway, approval_id: str, *, actor: str, reason: str | None = None,
            actor_requests: frozenset[str] = frozenset(),
            scope: Scope = UNSCOPED) -> dict[str, Any]:
    """Approve a pending action; a gateway-dispatched one executes once, right now.

    ``actor_requests``: names whose requests the approver may not approve (its own key).
    """
    a = _load_to_act(gw, approval_id, actor, scope)
    if a["status"] != "pending":
        _not_pending(gw, a, actor)
    refusal = approval_rules.recheck(gw.policy, a, actor=actor, actor_requests=actor_requests,
                                     kill=gw.kill_state(a["environment"]))
    if refusal is not None:
        _refuse(gw, a, actor, refusal)
    won = _decide(gw, a, actor, "approved", decision_reason=reason,
                  approved_policy_hash=gw.policy.hash)
    _audit_transition(gw, won, actor, "approved", reason)
    run(enqueue_d(gw.policy, won, "approved"), gw.runtime)
    if won.get("dispatch") != "gateway" or not won.get("executor"):
        return public_approval(gw, won)  # the app fetches it and runs it itself
    span = gw.telemetry.approved_action(won, actor) if gw.telemetry is not None else None
    if span is None:
        final = run(_execute_approved_d(gw, won, actor), gw.runtime)
        return public_approval(gw, final)
    try:
        final = run(_execute_approved_d(gw, won, actor), gw.runtime)
    except AuthorityError as exc:
        span.end_approved(None, exc)
        raise
    except BaseException:
        span.end_approved(None)
        raise
    span.end_approved(final)
    return public_approval(gw, final)


def _execute_approved_d(gw: Gateway, won: dict[str, Any], actor: str) -> Decision[dict[str, Any]]:
    """The record, a fresh kill-switch read, the effect, the outcome (as gating does)."""
    approval_id = won["id"]
    yield AuditOp((("action", dict(
        request_id=won.get("request_id"), environment=won.get("environment"),
        model=won.get("model"), action_type=won.get("action_type"), decision="allow",
        reason="approved: executing", approval_status="approved", actor=actor,
        policy_hash=gw.policy.hash,
        details={"status": "executing", "approval_id": approval_id,
                 "action_key": won.get("action_key"), "executor": won.get("executor"),
                 "arguments": redact(won.get("arguments"), gw.policy.redact)})),))
    kill = kill_engaged((yield S.kill_switch_state(fresh=True)), str(won.get("environment")))
    if kill is not None:
        # Engaged between the approval and the effect: nothing runs; a person may approve
        # again once it is released.
        back = yield S.approval_transition(approval_id, "approved", "pending",
                                           kill_switch_interrupted=True)
        yield AuditOp((("approval", dict(
            request_id=won.get("request_id"), environment=won.get("environment"),
            action_type=won.get("action_type"), decision="deny",
            reason=f"the {kill['scope']} kill switch was engaged before the action ran; "
                   "the approval is pending again", approval_status="pending", actor=actor,
            policy_hash=gw.policy.hash, details={"approval_id": approval_id})),))
        raise KillSwitchEngaged(f"the {kill['scope']} kill switch was engaged before the "
                                "action ran: nothing executed", approval=back)
    # A person let it run: what a limit would have refused now counts.
    for c in won.get("limit_overrides") or []:
        yield S.budget_settle([c["counter"]], reserved=0.0, actual=float(c["delta"]),
                              ttl_s=float(c["ttl_s"]))
    executor = won["executor"]
    ex = yield from run_once_d(
        action_key=won["action_key"], executor_name=executor,
        idempotent=gw.executors.get(executor).idempotent_downstream,
        action_type=won["action_type"], arguments=won["arguments"], ttl_s=gw.idempotency_ttl,
        info={"approval_id": approval_id, "request_id": won.get("request_id"),
              "environment": won.get("environment"), "requested_by": won.get("requested_by")})
    final = (yield S.approval_transition(approval_id, "approved", ex.status, result=ex.result,
                                         error=ex.error, executed_at=time.time())) or won
    if ex.status == "failed":
        yield from release_d(won.get("limit_charges") or [])
    yield AuditOp((("approval", dict(
        request_id=final.get("request_id"), environment=final.get("environment"),
        model=final.get("model"), action_type=final.get("action_type"), decision="allow",
        reason=ex.error, approval_status=ex.status, actor=actor, policy_hash=gw.policy.hash,
        execution_result=redact({"status": ex.status, "result": ex.result, "error": ex.error},
                                gw.policy.redact),
        details={"approval_id": approval_id, "action_key": final.get("action_key")})),))
    yield from enqueue_d(gw.policy, final, ex.status)
    yield S.journal_update(won["action_key"], ex.status, {"audited": True},
                           ttl_s=None if ex.status == "in_doubt" else gw.idempotency_ttl)
    return final


def reject(gw: Gateway, approval_id: str, *, actor: str, reason: str | None = None,
           scope: Scope = UNSCOPED) -> dict[str, Any]:
    won = _decide(gw, _load_to_act(gw, approval_id, actor, scope), actor, "rejected",
                  decision_reason=reason)
    _release_claims(gw, won)
    _audit_transition(gw, won, actor, "rejected", reason, decision="deny")
    run(enqueue_d(gw.policy, won, "rejected"), gw.runtime)
    return public_approval(gw, won)


def _release_claims(gw: Gateway, a: dict[str, Any]) -> None:
    """A rejected action took no effect: its business key and limit reservations are free."""
    action = gw.policy.actions.get(a["action_type"])
    if action and action.dedupe_on:
        key = dedupe.key_for(a["environment"], a["action_type"], action.dedupe_on,
                             a["arguments"])
        if key:
            gw.store.dedupe_release(key, a["action_key"])
    run(release_d(a.get("limit_charges") or []), gw.runtime)


def set_kill_switch(gw: Gateway, engaged: bool, *, actor: str, reason: str | None = None,
                    environment: str | None = None,
                    scope: Scope = UNSCOPED) -> dict[str, Any]:
    if not scope.unscoped and environment != scope.environment:
        target = "the global kill switch" if environment is None else \
            "another environment's kill switch"
        exc = Forbidden(f"{actor} may switch only the kill switch of {scope.describe()}, not "
                        f"{target} (send \"environment\": \"{scope.environment}\")",
                        code="environment_forbidden")
        gw.audit_event("kill_switch", environment=scope.environment, decision="deny",
                       reason=exc.message, actor=actor,
                       details={"engaged": engaged, "refused": True,
                                "scope": "global" if environment is None else environment})
        exc.audited = True
        raise exc
    if environment is not None and environment not in gw.policy.environments:
        raise InvalidRequest(f"unknown environment {environment[:64]!r}")
    switch = environment or "*"
    state = gw.store.set_kill_switch(switch, engaged, reason=reason, actor=actor)
    gw.audit_event("kill_switch", environment=environment, decision="deny" if engaged else "allow",
                   reason=reason, actor=actor,
                   details={"engaged": engaged, "scope": "global" if switch == "*" else switch})
    return dict(printable({"scope": "global" if switch == "*" else switch, **state}))


def kill_switch_status(gw: Gateway, *, scope: Scope = UNSCOPED) -> dict[str, Any]:
    """The global switch (it stops every environment, so every scope sees it) and the
    switch of each environment in ``scope``."""
    state = gw.store.kill_switch_state()
    return dict(printable({
        "global": state.get("*", {"engaged": False}),
        "environments": {env: state.get(env, {"engaged": False})
                         for env in gw.policy.environments if scope.covers(env)},
    }))


def recover(gw: Gateway) -> list[dict[str, Any]]:
    """Settle executions a crash interrupted (left alone while the kill switch is on),
    write audit entries that were parked, release orphan business-key claims."""
    from .recovery import drain_audit_d, recover_d

    run(drain_audit_d(), gw.runtime)
    return run(recover_d(gw), gw.runtime)


# -- executions in doubt (DESIGN.md §5) ----------------------------------------------------


def public_execution(gw: Gateway, entry: dict[str, Any]) -> dict[str, Any]:
    """A journal entry as a person sees it: arguments and result redacted by the policy."""
    out = dict(entry)
    out["arguments"] = redact(entry.get("arguments"), gw.policy.redact)
    if "result" in out:
        out["result"] = redact(entry.get("result"), gw.policy.redact)
    return dict(printable(out))


def list_executions(gw: Gateway, status: str | None = None, *, limit: int | None = None,
                    cursor: str | None = None, scope: Scope = UNSCOPED) -> Page:
    """Journal entries within ``scope``, newest first, one page of at most ``limit``;
    ``status="in_doubt"`` is what waits for a person."""
    wanted = _statuses(status, EXECUTION_STATUSES)
    n = check_limit(limit)
    one = next(iter(wanted)) if wanted is not None and len(wanted) == 1 else None
    items = (e for e in gw.store.journal_list(one)
             if scope.covers(e.get("environment"))
             and (wanted is None or e.get("status") in wanted))
    page, nxt = paginate(items, lambda e: (_time(e.get("started_at")),
                                           str(e.get("action_key"))),
                         kind="actions", limit=n, cursor=cursor)
    return Page((public_execution(gw, e) for e in page), nxt)


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
                      reason: str | None = None, scope: Scope = UNSCOPED) -> dict[str, Any]:
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
    if not scope.covers(entry.get("environment")):
        _audit_resolution(gw, entry, actor, "deny",
                          f"refused: {actor} may act only in {scope.describe()}",
                          str(entry.get("status")))
        raise _refused_out_of_scope(f"execution {action_key!r} in the journal")
    if entry.get("requested_by") == actor:
        own = Forbidden(f"{actor} cannot settle an action its own request created",
                        code="self_approval_forbidden")
        _audit_resolution(gw, entry, actor, "deny", own.message, str(entry.get("status")))
        own.audited = True
        raise own
    now = time.time()
    error = None if outcome == "executed" else (
        f"resolved as failed by {actor}" + (f": {reason}" if reason else ""))
    won = None
    if entry.get("status") == "in_doubt":
        won = run(mark_d(action_key, "in_doubt", outcome, ttl_s=None, resolved_by=actor,
                         resolved_at=now, resolution_reason=reason,
                         result={"result": None, "error": error}), gw.runtime)
    if won is None:
        current = gw.store.journal_get(action_key) or entry
        exc = ExecutionError(
            f"execution {action_key} is {current.get('status')}, not in_doubt: "
            "nothing was changed", status=current.get("status"))
        _audit_resolution(gw, current, actor, "deny", exc.message,
                          str(current.get("status")))
        exc.audited = True
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
        current_apr = moved or approval_rules.get(gw.store, approval_id, gw.policy)
        out["approval_status"] = current_apr.get("status") if current_apr else None
    return out


def evaluate_action(gw: Gateway, action_type: str, arguments: dict[str, Any], *,
                    environment: str | None = None, scope: Scope = UNSCOPED) -> dict[str, Any]:
    """A dry run of one action under the policy in force (the kill switch included): the
    mode, the rule that decided and why — what ``authority policy explain`` prints.
    Nothing is recorded or run."""
    import json as _json

    from .modes import resolve_action

    env = environment or scope.environment or gw.policy.default_environment
    if not scope.covers(env):
        raise _refused_out_of_scope(f"environment {env!r}")
    if env not in gw.policy.environments:
        raise InvalidRequest(f"unknown environment {env!r} (defined: "
                             f"{', '.join(sorted(gw.policy.environments))})")
    r = resolve_action(gw.policy, env, action_type, _json.dumps(arguments),
                       kill_switch_engaged=gw.kill_engaged(env))
    return {"action": action_type, "environment": env, "mode": r.mode,
            "decision": r.decision, "decided_by": r.decided_by, "reason": r.reason,
            "code": r.code, "dispatch": r.dispatch, "executor": r.executor,
            "policy_hash": gw.policy.hash}

"""Approval expiry (DESIGN.md §4): a rule above every backend.

A pending approval past its ``expires_at`` *is* expired, whether or not
anyone has looked at it yet: every read turns it ``expired`` (compare-and-set,
guarded by the time), and every decision on it is guarded by ``unexpired``.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import ApprovalError, AuthorityError, Forbidden, KillSwitchEngaged
from .policy import Policy
from .store.protocol import ApprovalStore

__all__ = ["get", "is_overdue", "listing", "recheck", "settle_expiry"]


def is_overdue(approval: dict[str, Any], now: float) -> bool:
    exp = approval.get("expires_at")
    return (approval.get("status") == "pending" and isinstance(exp, int | float)
            and not isinstance(exp, bool) and exp <= now)


def settle_expiry(store: ApprovalStore, approval: dict[str, Any],
                  now: float | None = None, policy: Policy | None = None) -> dict[str, Any]:
    """The approval as it stands now: an overdue pending one becomes (and is stored) expired."""
    t = time.time() if now is None else now
    if not is_overdue(approval, t):
        return approval
    moved = store.approval_transition(approval["id"], "pending", "expired", guard="expired",
                                      now=t, expired_at=t)
    if moved is not None:
        from .effects import run_on_store
        from .limits import release_d

        # What a pending approval held against limits over time is free again.
        run_on_store(release_d(moved.get("limit_charges") or []), store)
        if policy is not None:  # whoever expires it tells the channels (the worker too)
            from .notifications import enqueue_d

            run_on_store(enqueue_d(policy, moved, "expired"), store)
        return moved
    return store.approval_get(approval["id"]) or approval


def get(store: ApprovalStore, approval_id: str,
        policy: Policy | None = None) -> dict[str, Any] | None:
    a = store.approval_get(approval_id)
    return None if a is None else settle_expiry(store, a, policy=policy)


def listing(store: ApprovalStore, status: str | None = None, *, limit: int | None = None,
            before: str | None = None) -> list[dict[str, Any]]:
    now = time.time()
    out = [settle_expiry(store, a, now) for a in store.approval_list(status, limit=limit,
                                                                     before=before)]
    return out if status is None else [a for a in out if a.get("status") == status]


def recheck(policy: Policy, approval: dict[str, Any], *, actor: str,
            actor_requests: frozenset[str], kill: dict[str, Any] | None) -> AuthorityError | None:
    """Why approving ``approval`` now must be refused (DESIGN.md §4), or None.

    Approving re-checks the action against the policy in force at that moment, never
    runs anything while the kill switch is engaged, binds the approval to exactly what
    was shown (its hash), and keeps separation of duties (no self-approval).
    """
    from .actions import action_hash
    from .modes import resolve_action

    a = approval
    if a.get("requested_by") in ({actor} | set(actor_requests)):
        return Forbidden(f"{actor} cannot approve an action its own request created",
                         code="self_approval_forbidden", decided_by="separation_of_duties")
    if kill is not None:
        return KillSwitchEngaged(f"the {kill['scope']} kill switch is engaged: nothing "
                                 "executes; the approval stays pending",
                                 decided_by=f"kill_switch:{kill['scope']}")
    if action_hash(a["action_type"], a["arguments"], a["environment"]) != a.get("action_hash"):
        return ApprovalError("the stored action does not match what was shown for approval",
                             code="approval_tampered", decided_by="action_hash")
    now = resolve_action(policy, a["environment"], a["action_type"], a["arguments_json"],
                         tool_schema=a.get("tool_schema"))
    if now.decision == "deny":
        return ApprovalError(f"the policy in force now denies this action ({now.code}: "
                             f"{now.reason}); the approval stays pending",
                             code="approval_denied_by_policy", decided_by=now.decided_by)
    if now.mode == "simulation_only":
        # simulation_only never runs the action, however it was approved.
        return ApprovalError(f"the policy in force now only simulates this action "
                             f"({now.reason}); nothing was executed; the approval stays "
                             "pending", code="approval_denied_by_policy",
                             decided_by=now.decided_by)
    if a.get("dispatch") == "gateway" and a.get("executor") not in policy.executors:
        return ApprovalError(f"executor {a.get('executor')!r} is no longer configured; the "
                             "approval stays pending", code="approval_denied_by_policy",
                             decided_by="executors")
    return None

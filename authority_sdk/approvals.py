"""Approval expiry (DESIGN.md §4): a rule above every backend.

A pending approval past its ``expires_at`` *is* expired, whether or not
anyone has looked at it yet: every read turns it ``expired`` (compare-and-set,
guarded by the time), and every decision on it is guarded by ``unexpired``.
"""

from __future__ import annotations

import time
from typing import Any

from .store.protocol import ApprovalStore

__all__ = ["get", "is_overdue", "listing", "settle_expiry"]


def is_overdue(approval: dict[str, Any], now: float) -> bool:
    exp = approval.get("expires_at")
    return (approval.get("status") == "pending" and isinstance(exp, int | float)
            and not isinstance(exp, bool) and exp <= now)


def settle_expiry(store: ApprovalStore, approval: dict[str, Any],
                  now: float | None = None) -> dict[str, Any]:
    """The approval as it stands now: an overdue pending one becomes (and is stored) expired."""
    t = time.time() if now is None else now
    if not is_overdue(approval, t):
        return approval
    moved = store.approval_transition(approval["id"], "pending", "expired", guard="expired",
                                      now=t, expired_at=t)
    if moved is not None:
        return moved
    return store.approval_get(approval["id"]) or approval


def get(store: ApprovalStore, approval_id: str) -> dict[str, Any] | None:
    a = store.approval_get(approval_id)
    return None if a is None else settle_expiry(store, a)


def listing(store: ApprovalStore, status: str | None = None, *, limit: int | None = None,
            before: str | None = None) -> list[dict[str, Any]]:
    now = time.time()
    out = [settle_expiry(store, a, now) for a in store.approval_list(status, limit=limit,
                                                                     before=before)]
    return out if status is None else [a for a in out if a.get("status") == status]

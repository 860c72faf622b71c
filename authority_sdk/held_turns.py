"""What became of a held action, told on the conversation's next turn (DESIGN.md §4).

When the gateway holds an action for approval, the app's conversation carries the
gateway's own answer for that call: ``{"status": "pending_approval", "approval_id": …}``
(a ``tool`` message, or a ``function_call_output`` item). The approval may since have
been decided, executed or expired. On the next turn the gateway replaces that stale
answer with the approval's state now, so the model (and an app that never polls) learns
it, and lists the change in ``authority.approval_updates``.

The answer comes from the client, so it is read as hostile: only a small JSON object of
the gateway's own shape is looked at, and only an approval the same key created in the
same environment is reported (anything else is left as sent: no state crosses keys or
environments, and an unknown id says nothing about whether it exists).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from . import approvals
from .effects import Decision, S

__all__ = ["MARKER", "refreshed_d"]

MARKER = '"pending_approval"'  # a cheap test before any parsing: most turns have none
_MAX_CHARS = 16_384  # the gateway's own pending answer is far smaller
_APPROVAL_ID = re.compile(r"apr_[A-Za-z0-9_-]{1,64}")
_FINAL_NOTES = {
    "expired": "nobody decided before the approval expired: nothing was executed",
    "rejected": "a person rejected it: nothing was executed",
    "in_doubt": "it was started but its outcome is unknown; a person settles it",
    "approved": "approved: the app may run it now",
}


def _pending_id(content: Any) -> str | None:
    if not isinstance(content, str) or len(content) > _MAX_CHARS or MARKER not in content:
        return None
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("status") != "pending_approval":
        return None
    approval_id = value.get("approval_id")
    if not isinstance(approval_id, str) or not _APPROVAL_ID.fullmatch(approval_id):
        return None
    return approval_id


def _payload(approval: dict[str, Any], status: str) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "approval_id": approval["id"]}
    if status == "executed":
        out["result"] = approval.get("result")
    elif status == "failed":
        out["reason"] = str(approval.get("error") or "the action failed")
    else:
        reason = approval.get("decision_reason") if status == "rejected" else None
        out["reason"] = f"{_FINAL_NOTES.get(status, status)}: {reason}" if reason \
            else _FINAL_NOTES.get(status, status)
    return out


def refreshed_d(content: Any, *, caller: str,
                environment: str) -> Decision[tuple[str, dict[str, Any]] | None]:
    """The new answer for a call held for approval, as (content, update), or None where
    ``content`` is not such an answer, is not this key's and environment's, or is still
    pending."""
    approval_id = _pending_id(content)
    if approval_id is None:
        return None
    approval = yield S.approval_get(approval_id)
    if (approval is None or approval.get("environment") != environment
            or approval.get("requested_by") != caller):
        return None
    status = str(approval.get("status"))
    if approvals.is_overdue(approval, time.time()):
        status = "expired"  # the sweeper stores it; the answer need not wait for it
    if status == "pending":
        return None
    payload = _payload(approval, status)
    update = {"approval_id": approval_id, "action_type": approval.get("action_type"),
              "status": status}
    return json.dumps(payload, default=str), update

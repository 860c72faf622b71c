"""Who is told about an approval, written to the durable outbox (issue 16).

A notification is decided, then done: the step that changes an approval (created,
approved, rejected, expired, executed) also yields one ``S.outbox_put("notify", …)`` per
channel of the policy that wants that event for that environment and action. The
background worker delivers them later (:mod:`authority_sdk.delivery`), with retries, so
a receiver that is down never blocks or loses the approval.

The outbox item holds only references (approval id, channel, event): the message is
built at delivery from the approval as it stands then, with the arguments as the policy
redacts them; a one-time link's token is minted at delivery too, so no token sits in the
store in the clear.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from .effects import Decision, S
from .telemetry import trace_headers

if TYPE_CHECKING:
    from .policy import KeyConfig, Policy

__all__ = ["CALLBACK_PREFIX", "OUTBOX_KIND", "callback_key", "channels_for", "enqueue_d"]

OUTBOX_KIND = "notify"
# A channel name of the outbox that stands for a key's own callback (keys[].callback).
CALLBACK_PREFIX = "key:"

# The approval's status (or the transition) to the event a channel subscribes to.
_EVENT_OF_STATUS = {"pending": "held", "approved": "approved", "rejected": "rejected",
                    "expired": "expired", "executed": "executed", "failed": "failed"}


def channels_for(policy: Policy, approval: dict[str, Any], event: str) -> list[str]:
    """The channels of ``policy`` that want ``event`` about ``approval``."""
    env, action = approval.get("environment"), approval.get("action_type")
    names = [name for name, ch in policy.notifications.channels.items()
             if event in ch.events
             and (ch.environments is None or env in ch.environments)
             and (ch.actions is None or action in ch.actions)]
    key = callback_key(policy, approval)
    if key is not None and key.callback is not None and event in key.callback.events:
        names.append(CALLBACK_PREFIX + key.name)
    return names


def callback_key(policy: Policy, approval: dict[str, Any]) -> KeyConfig | None:
    """The key whose request created ``approval``, if it asks for callbacks."""
    who = approval.get("requested_by")
    return next((k for k in policy.keys if k.name == who and k.callback is not None), None)


def enqueue_d(policy: Policy, approval: dict[str, Any], event: str | None = None) -> Decision[int]:
    """Queue ``event`` (default: the one the approval's status stands for) for every
    channel that wants it; returns how many were queued."""
    ev = event or _EVENT_OF_STATUS.get(str(approval.get("status")))
    if ev is None:
        return 0
    now = time.time()
    names = channels_for(policy, approval, ev)
    # The action's span, when telemetry is on: the receiver's work joins the caller's trace.
    trace = trace_headers()
    for name in names:
        item: dict[str, Any] = {"channel": name, "event": ev, "approval_id": approval["id"],
                                "created_at": now, "attempts": 0, "next_at": now}
        if trace:
            item["trace"] = trace
        yield S.outbox_put(OUTBOX_KIND, f"ntf_{secrets.token_hex(12)}", item)
    return len(names)

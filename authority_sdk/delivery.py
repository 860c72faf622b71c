"""Delivering the notification outbox: one round of the background worker (issue 16).

Each due item is built from the approval as it stands now (arguments as the policy
redacts them), sent once, and then deleted; a failure is audited and the item waits
``backoff_s * 2**(attempts-1)`` (at most 300 s) before the next try, until
``max_attempts``, when it is dropped with an audit entry. Nothing here touches the
approval's status: a receiver that is down never blocks or loses an approval.

Delivery is at least once: a crash between the send and the delete sends the item
again, so webhook receivers get the notification id (``Idempotency-Key`` and the body's
``id``) to dedupe on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from . import links
from .audit import redact
from .errors import AuthorityError
from .notifications import CALLBACK_PREFIX, OUTBOX_KIND
from .notify_messages import (
    SIGNATURE_HEADER,
    email_text,
    sign,
    slack_message,
    summary,
    webhook_body,
)
from .policy import EmailChannel, SlackChannel, WebhookChannel
from .telemetry import stored_trace, with_trace

if TYPE_CHECKING:
    from .engine import Engine
    from .policy import ChannelConfig

__all__ = ["MAX_BACKOFF_S", "deliver_round", "send"]

MAX_BACKOFF_S = 300.0
LEASE_MARGIN_S = 10.0
# A held notice is queued just before its approval is created; one whose approval is
# still missing after this long is from a request that crashed in between.
ORPHAN_S = 60.0


class _NotSent(Exception):
    pass


def _post(url: str, *, content: bytes, headers: dict[str, str], timeout_s: float) -> None:
    try:
        resp = httpx.post(url, content=content, headers=headers, timeout=timeout_s,
                          follow_redirects=False)
    except httpx.HTTPError as exc:
        # The type only: an exception's text may quote the URL, which can be a secret.
        raise _NotSent(f"request failed ({type(exc).__name__})") from None
    if not 200 <= resp.status_code < 300:
        raise _NotSent(f"receiver answered HTTP {resp.status_code}")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise _NotSent(f"${name} is not set")
    return value


def send(eng: Engine, ch: ChannelConfig, notification_id: str, event: str,
         shown: dict[str, Any], link: str | None,
         trace: dict[str, str] | None = None) -> None:
    """Send one notification on ``ch``; raises ``_NotSent`` with a reason safe to audit.
    ``trace``: the W3C context of the action that queued it, for a webhook's receiver."""
    if isinstance(ch, WebhookChannel):
        body = webhook_body(notification_id, event, shown, link)
        _post(ch.url, content=body, timeout_s=ch.timeout_s, headers=with_trace({
            "Content-Type": "application/json", "Idempotency-Key": notification_id,
            SIGNATURE_HEADER: sign(_env(ch.secret_env), body)}, trace or {}))
    elif isinstance(ch, SlackChannel):
        import json

        _post(_env(ch.url_env), timeout_s=ch.timeout_s,
              content=json.dumps(slack_message(event, shown, link)).encode(),
              headers={"Content-Type": "application/json"})
    else:
        assert isinstance(ch, EmailChannel)
        subject, text = email_text(event, shown, link)
        result = eng.executors.get(ch.executor).execute(
            "notification", {"to": list(ch.to), "subject": subject, "body": text},
            notification_id)
        if not result.ok:
            raise _NotSent(result.error or "email not sent")


def _audit(eng: Engine, approval: dict[str, Any] | None, item_id: str, p: dict[str, Any],
           decision: str, reason: str, **details: Any) -> None:
    a = approval or {}
    eng.audit_event("notification", request_id=a.get("request_id"),
                    environment=a.get("environment"), action_type=a.get("action_type"),
                    decision=decision, reason=reason, approval_status=a.get("status"),
                    actor="worker", details={
                        "notification_id": item_id, "channel": p.get("channel"),
                        "event": p.get("event"), "approval_id": p.get("approval_id"),
                        "attempts": p.get("attempts"), **details})


def _link(eng: Engine, ch: ChannelConfig, p: dict[str, Any],
          approval: dict[str, Any]) -> str | None:
    cfg = eng.policy.notifications
    if (p.get("event") != "held" or ch.approver is None or cfg.public_base_url is None
            or approval.get("status") != "pending"):
        return None
    token = links.mint(eng.store, approval=approval, approver=ch.approver,
                       channel=str(p.get("channel")), ttl_s=cfg.link_ttl_s)
    return f"{cfg.public_base_url}/authority/decide/{token}"


def _send_time_s(ch: ChannelConfig | None) -> float:
    if isinstance(ch, EmailChannel):
        return 60.0  # the smtp executor's timeout applies per step of the conversation
    return ch.timeout_s if ch is not None else 0.0


def _channel(eng: Engine, name: str) -> ChannelConfig | None:
    if name.startswith(CALLBACK_PREFIX):
        key = next((k for k in eng.policy.keys if k.name == name[len(CALLBACK_PREFIX):]), None)
        cb = key.callback if key is not None else None
        # A key's callback is a webhook with no approver: it never carries a decision link.
        return None if cb is None else WebhookChannel(
            type="webhook", url=cb.url, secret_env=cb.secret_env, timeout_s=cb.timeout_s,
            events=cb.events)
    return eng.policy.notifications.channels.get(name)


def _attempts(p: dict[str, Any]) -> int:
    n = p.get("attempts")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def deliver_round(eng: Engine, *, now: float | None = None, limit: int = 100,
                  keep_lease: Callable[[float], bool] | None = None) -> list[str]:
    """Send every due item (at most ``limit``); returns the ids delivered.

    ``keep_lease(ttl_s)`` renews the worker's lease before each send for as long as that
    send may take; when it says the lease is gone the round stops, so a slow receiver
    never lets a second worker send the same items meanwhile.
    """
    t = time.time() if now is None else now
    sent: list[str] = []
    for item_id, p in eng.store.outbox_list(OUTBOX_KIND, limit=limit):
        next_at = p.get("next_at")
        if isinstance(next_at, int | float) and next_at > t:
            continue
        ch = _channel(eng, str(p.get("channel")))
        if keep_lease is not None and not keep_lease(_send_time_s(ch) + LEASE_MARGIN_S):
            break
        approval = eng.store.approval_get(str(p.get("approval_id")))
        created = p.get("created_at")
        if approval is None and isinstance(created, int | float) and t - created < ORPHAN_S:
            continue  # queued just before its approval is written: the next round sends it
        if ch is None or approval is None:
            eng.store.outbox_delete(OUTBOX_KIND, item_id)
            _audit(eng, approval, item_id, p, "deny", "notification dropped: its channel is "
                   "no longer configured" if ch is None else "notification dropped: no such "
                   "approval")
            continue
        shown = summary(approval, redact(approval.get("arguments"), eng.policy.redact))
        try:
            link = _link(eng, ch, p, approval)
            send(eng, ch, item_id, str(p.get("event")), shown, link, stored_trace(p))
        except (_NotSent, AuthorityError) as exc:
            _failed(eng, approval, item_id, p, str(exc), t)
            continue
        except Exception as exc:  # a bug here must not stop the worker's other duties
            _failed(eng, approval, item_id, p, f"cannot build or send: {type(exc).__name__}", t)
            continue
        eng.store.outbox_delete(OUTBOX_KIND, item_id)
        _audit(eng, approval, item_id, {**p, "attempts": _attempts(p) + 1},
               "allow", f"notified {p.get('channel')} ({ch.type}) of {p.get('event')}",
               link=link is not None)
        sent.append(item_id)
    return sent


def _failed(eng: Engine, approval: dict[str, Any], item_id: str, p: dict[str, Any],
            why: str, now: float) -> None:
    cfg = eng.policy.notifications
    attempts = _attempts(p) + 1
    after = {**p, "attempts": attempts}
    if attempts >= cfg.max_attempts:
        eng.store.outbox_delete(OUTBOX_KIND, item_id)
        _audit(eng, approval, item_id, after, "error",
               f"notification not delivered after {attempts} attempts, given up: {why}")
        return
    delay = min(MAX_BACKOFF_S, cfg.backoff_s * 2 ** (attempts - 1))
    after["next_at"] = now + delay
    eng.store.outbox_put(OUTBOX_KIND, item_id, after)
    _audit(eng, approval, item_id, after, "error",
           f"notification attempt {attempts} failed: {why}; next try in {delay:g} s")

"""What a notification says, per channel type: a signed webhook body, a Slack Block Kit
message, an email's text. Pure functions over the approval as the policy redacts it.

Webhook signature (documented in the README so a receiver can verify)::

    X-Authority-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

A receiver recomputes the HMAC over the exact bytes it received, compares in constant
time, and refuses a ``t`` more than 300 s away from its clock (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

__all__ = ["SIGNATURE_HEADER", "SKEW_S", "email_text", "sign", "slack_message",
           "slack_text", "summary", "verify", "webhook_body"]

SIGNATURE_HEADER = "X-Authority-Signature"
SKEW_S = 300
_MAX_ARGS_CHARS = 2800  # a Slack text object holds 3000

_TITLES = {"held": "Approval needed", "approved": "Approved", "rejected": "Rejected",
           "expired": "Expired", "executed": "Executed", "failed": "Execution failed"}


def summary(approval: dict[str, Any], redacted_args: Any) -> dict[str, Any]:
    """The approval as a notification shows it: never more than the policy lets through."""
    return {"id": approval.get("id"), "status": approval.get("status"),
            "environment": approval.get("environment"),
            "action_type": approval.get("action_type"), "arguments": redacted_args,
            "reason": approval.get("reason"), "requested_by": approval.get("requested_by"),
            "decided_by": approval.get("decided_by"),
            "action_hash": approval.get("action_hash"),
            "expires_at": approval.get("expires_at")}


def webhook_body(notification_id: str, event: str, shown: dict[str, Any],
                 link: str | None) -> bytes:
    return json.dumps({"id": notification_id, "type": f"approval.{event}",
                       "approval": shown, "decide_url": link},
                      sort_keys=True, ensure_ascii=False).encode()


def sign(secret: str, body: bytes, ts: int | None = None) -> str:
    t = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: float | None = None,
           skew_s: int = SKEW_S) -> bool:
    """The receiver's check (also what the tests' receiver runs)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > skew_s:
        return False
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, given)


def slack_text(text: str) -> str:
    """Model-written text for a Slack ``plain_text`` object: ``&``, ``<``, ``>`` escaped,
    so no ``<!channel>``, ``<@U…>`` or ``<url|label>`` can form; plain_text renders
    ``* _ ~ `` `` literally (it is never mrkdwn)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _args_text(args: Any) -> str:
    text = json.dumps(args, indent=1, sort_keys=True, ensure_ascii=False)
    if len(text) > _MAX_ARGS_CHARS:
        text = text[:_MAX_ARGS_CHARS] + f"… [+{len(text) - _MAX_ARGS_CHARS} chars]"
    return text


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": slack_text(text) or " ", "emoji": False}


def slack_message(event: str, shown: dict[str, Any], link: str | None) -> dict[str, Any]:
    """An incoming-webhook message: every value that came from a model or a request is a
    ``plain_text`` object; the only mrkdwn is the gateway's own fixed wording."""
    title = f"{_TITLES.get(event, event)}: {shown.get('action_type')}"
    fields = [_plain(f"{k}: {shown.get(k)}") for k in
              ("environment", "requested_by", "reason", "id") if shown.get(k) is not None]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _plain(title[:150])},
        {"type": "section", "fields": fields[:10]} if fields else
        {"type": "section", "text": _plain(str(shown.get("id")))},
        {"type": "section", "text": _plain(_args_text(shown.get("arguments")))},
    ]
    if link is not None:
        blocks.append({"type": "actions", "elements": [{
            "type": "button", "text": _plain("Review and decide"), "url": link,
            "action_id": "authority_decide"}]})
    return {"text": slack_text(title), "blocks": blocks, "unfurl_links": False,
            "unfurl_media": False}


def email_text(event: str, shown: dict[str, Any], link: str | None) -> tuple[str, str]:
    """Subject and plain-text body (no HTML: nothing a model wrote is ever markup)."""
    subject = f"{_TITLES.get(event, event)}: {shown.get('action_type')} ({shown.get('id')})"
    lines = [f"{_TITLES.get(event, event)} — {shown.get('action_type')}",
             f"Approval: {shown.get('id')}", f"Environment: {shown.get('environment')}",
             f"Requested by: {shown.get('requested_by')}", f"Why held: {shown.get('reason')}",
             f"Status: {shown.get('status')}", "", "Arguments (as the policy shows them):",
             _args_text(shown.get("arguments"))]
    if link is not None:
        lines += ["", "Review and decide (one-time link, for you only):", link]
    return subject.replace("\r", " ").replace("\n", " "), "\n".join(lines) + "\n"

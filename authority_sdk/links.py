"""One-time decision links (issue 16): a token that lets one approver decide one approval.

The token is 256 random bits, sent only inside the notification; the store keeps its
SHA-256, so a copy of the store decides nothing. A link is bound to the approval, to the
action hash shown when it was minted (a changed action invalidates it) and to the named
approver key; it expires (``notifications.link_ttl_s``, 30 min by default) and is used
once: consuming it is a conditional delete, so of two posts of one link exactly one wins.

Link records live in the idempotency primitives (``idem_put`` / ``idem_get`` /
``idem_delete`` under ``link:<hash>``): they are exactly "a record with a TTL and a
compare-and-delete", and every backend already offers them, so no store method was added.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

__all__ = ["confirmation_code", "consume", "link_id", "lookup", "mint", "token_hash",
           "well_formed"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32): 256 bits
_PREFIX = "link:"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def link_id(token: str) -> str:
    """What the audit log and the access log name a link by: a prefix of its hash, which
    decides nothing (the token itself is the credential, and never written anywhere)."""
    return token_hash(token)[:16]


def confirmation_code(token: str) -> str:
    """What the person types on the page: shown there, never in the link itself, so a
    scanner that only follows links (or auto-submits forms) cannot decide."""
    return hashlib.sha256(b"confirm:" + token.encode()).hexdigest()[:6].upper()


def mint(store: Any, *, approval: dict[str, Any], approver: str, channel: str,
         ttl_s: float) -> str:
    """A new link token for ``approver`` on ``approval``; only its hash is stored."""
    token = secrets.token_urlsafe(32)
    digest = token_hash(token)
    now = time.time()
    store.idem_put(_PREFIX + digest, {
        "claim_id": digest, "kind": "decision_link", "approval_id": approval["id"],
        "action_hash": approval.get("action_hash"), "approver": approver,
        "channel": channel, "created_at": now, "expires_at": now + ttl_s}, ttl_s=ttl_s)
    return token


def well_formed(token: str) -> bool:
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


def lookup(store: Any, token: str, now: float | None = None) -> dict[str, Any] | None:
    """The link's record while it is valid (unused, unexpired), else None."""
    if not well_formed(token):
        return None
    rec = store.idem_get(_PREFIX + token_hash(token))
    if not isinstance(rec, dict) or rec.get("kind") != "decision_link":
        return None
    exp = rec.get("expires_at")
    if not isinstance(exp, int | float) or exp <= (time.time() if now is None else now):
        return None
    return rec


def consume(store: Any, token: str) -> bool:
    """Use the link up: True for exactly one caller."""
    digest = token_hash(token)
    return bool(store.idem_delete(_PREFIX + digest, digest))

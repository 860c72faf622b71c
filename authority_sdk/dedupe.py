"""Business keys (``dedupe_on``): the same action on the same object runs at most once
within the idempotency TTL, however the model words the rest of its arguments.

Values are normalised before they are compared (:mod:`.business_keys`), so spellings of
one order id that a person reads as the same (case, surrounding or repeated spaces,
no-break spaces, zero-width and other invisible characters, full-width letters) are the
same key.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from .business_keys import normalise_business_value
from .effects import Decision, S
from .modes import lookup
from .wire import canonical_json

__all__ = ["claim_d", "key_for"]


def key_for(environment: str, action_type: str, fields: list[str],
            args: dict[str, Any]) -> str | None:
    """The dedupe key of an action, or None when it names no business key (or lacks one)."""
    if not fields:
        return None
    values = {}
    for f in fields:
        found, value = lookup(args, f)
        if not found:
            return None  # the business key is absent: nothing to deduplicate on
        values[f] = normalise_business_value(value)
    raw = canonical_json([environment, action_type, values])
    return "dedupe:" + hashlib.sha256(raw.encode()).hexdigest()


def void_claim_d(owner: dict[str, Any]) -> Decision[bool]:
    """A claim whose approval expired, was rejected or failed did not take effect."""
    from .approvals import is_overdue

    approval_id = owner.get("approval_id")
    if not approval_id:
        return False
    a = yield S.approval_get(str(approval_id))
    if a is None:
        return False  # its request is still creating it: the claim is live
    if is_overdue(a, time.time()):
        return True
    return a.get("status") in ("expired", "rejected", "failed")


def claim_d(key: str, owner: dict[str, Any], *, ttl_s: float) -> Decision[dict[str, Any] | None]:
    """Claim the business key for ``owner["action_key"]``; the existing owner if another
    action holds it (a retry of the same action — the same key — is not a duplicate)."""
    from .liveness import process_owner

    owner = {**owner, "owner": process_owner()}
    existing = yield S.dedupe_claim(key, owner, ttl_s=ttl_s)
    if existing is not None and (yield from void_claim_d(existing)):
        # Release is owner-checked and the claim atomic: of two racing takers one wins.
        yield S.dedupe_release(key, str(existing.get("action_key")))
        existing = yield S.dedupe_claim(key, owner, ttl_s=ttl_s)
    if existing is None or existing.get("action_key") == owner["action_key"]:
        return None
    # Tell what really happened to the action that holds it.
    entry = yield S.journal_get(str(existing.get("action_key")))
    if isinstance(entry, dict):
        result = entry.get("result")
        body: dict[str, Any] = result if isinstance(result, dict) else {}
        existing = {**existing, "status": entry.get("status"), "result": body.get("result")}
    return existing

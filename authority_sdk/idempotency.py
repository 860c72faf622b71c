"""Idempotency keys (DESIGN.md §2 step 2): the rules, above any backend.

A record under a key is an in-flight *claim* (``claim_id``, ``fingerprint``,
``lease_until``, ``owner``) until the request finishes and stores its answer.
Same key and fingerprint, finished → replay; in flight → in progress (409);
another fingerprint → conflict (422). A claim whose holder died (its process is
gone, its replica's heartbeat stopped, or its lease ran out) is taken over.

Before any action of an answer can take effect, the upstream answer is stored
in the claim (a *checkpoint*): a request that takes over a dead claim with a
checkpoint re-gates that same answer, with the same action keys, and never
asks the model again (issue: a crash then a retry must not send a second,
differently worded email). A dead claim with a checkpoint cannot be taken over
by a request with another body: effects may have happened under that key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from .errors import AuthorityUnavailable
from .liveness import owner_alive, process_owner
from .store.protocol import IdempotencyStore

__all__ = ["Claim", "abandon", "begin", "checkpoint", "finish"]

ClaimState = Literal["new", "replay", "conflict", "in_progress", "takeover"]

# A takeover can lose a race to another taker; after this many tries the key is busy.
_TAKEOVER_TRIES = 3


@dataclass
class Claim:
    state: ClaimState
    key: str
    record: dict[str, Any]  # ours for new/takeover; the other's otherwise

    @property
    def answer(self) -> Any:
        """The upstream answer a taken-over claim had checkpointed (None: ask again)."""
        return self.record.get("answer") if self.state == "takeover" else None


def _valid(record: Any) -> dict[str, Any]:
    if (not isinstance(record, dict) or record.get("status") not in ("in_flight", "done")
            or not isinstance(record.get("claim_id"), str)):
        raise AuthorityUnavailable("state store unavailable: a corrupt idempotency record")
    return record


def _stale(store: Any, record: dict[str, Any], now: float) -> bool:
    if record.get("status") != "in_flight":
        return False
    lease = record.get("lease_until")
    if not isinstance(lease, int | float) or lease <= now:
        return True
    return not owner_alive(store, record.get("owner"))


def begin(store: IdempotencyStore, key: str, fingerprint: str, *, claim_id: str,
          ttl_s: float, lease_s: float, now: float | None = None) -> Claim:
    """Claim ``key`` for this request, or say why not."""
    for _ in range(_TAKEOVER_TRIES):
        t = time.time() if now is None else now
        claim = {"claim_id": claim_id, "status": "in_flight", "fingerprint": fingerprint,
                 "lease_until": t + lease_s, "claimed_at": t, "owner": process_owner()}
        keep = max(ttl_s, lease_s)
        existing = store.idem_claim(key, claim, ttl_s=keep)
        if existing is None:
            return Claim("new", key, claim)
        existing = _valid(existing)
        same = existing.get("fingerprint") == fingerprint
        if _stale(store, existing, t):
            answer = existing.get("answer")
            if answer is not None and not same:
                return Claim("conflict", key, existing)
            mine = {**claim, "takeover_of": existing["claim_id"]}
            if answer is not None:
                mine["answer"] = answer
            if store.idem_replace(key, existing["claim_id"], mine, ttl_s=keep):
                return Claim("takeover" if answer is not None else "new", key, mine)
            continue  # another taker won; look again
        if not same:
            return Claim("conflict", key, existing)
        if existing["status"] == "in_flight":
            return Claim("in_progress", key, existing)
        return Claim("replay", key, existing)
    raise AuthorityUnavailable("state store unavailable: idempotency key contended")


def checkpoint(store: IdempotencyStore, claim: Claim, answer: Any, *, ttl_s: float) -> bool:
    """Keep the upstream answer in our claim before anything of it takes effect."""
    record = {**claim.record, "answer": answer}
    ok = store.idem_replace(claim.key, claim.record["claim_id"], record, ttl_s=ttl_s)
    if ok:
        claim.record = record
    return ok


def finish(store: IdempotencyStore, claim: Claim, response: dict[str, Any], *,
           ttl_s: float) -> bool:
    """Store the finished answer for replays (only if the key is still ours)."""
    record = {"claim_id": claim.record["claim_id"], "status": "done",
              "fingerprint": claim.record["fingerprint"], "response": response,
              "finished_at": time.time()}
    return store.idem_replace(claim.key, claim.record["claim_id"], record, ttl_s=ttl_s)


def abandon(store: IdempotencyStore, claim: Claim) -> bool:
    """Drop our claim (nothing took effect), so a retry may run."""
    return store.idem_delete(claim.key, claim.record["claim_id"])

"""Idempotency keys (DESIGN.md §2 step 2): the rules, above any backend.

A record under a key is an in-flight *claim* (``claim_id``, ``fingerprint``,
``lease_until``, ``owner``) until the request finishes and stores its answer.
Same key and fingerprint, finished → replay; in flight → in progress (409);
another fingerprint → conflict (422). A claim whose holder died (its process is
gone, its replica's heartbeat stopped, or its lease ran out) is taken over.

Before any action of an answer can take effect, the upstream answer is stored
in the claim (a *checkpoint*): a request that takes over a dead claim with a
checkpoint re-gates that same answer, with the same action keys, and never
asks the model again (a crash then a retry must not send a second,
differently worded email). A dead claim with a checkpoint cannot be taken over
by a request with another body: effects may have happened under that key.

Each rule is a decision (:mod:`authority_sdk.effects`); the plain functions run
it directly on a store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from .effects import Decision, S, StoreOp, run_on_store
from .errors import AuthorityUnavailable
from .liveness import owner_alive_d, process_owner

__all__ = ["Claim", "LazyClaim", "abandon", "abandon_d", "begin", "begin_d", "checkpoint",
           "checkpoint_d", "finish", "finish_d", "finish_op"]

ClaimState = Literal["new", "replay", "conflict", "in_progress", "takeover"]

# A takeover can lose a race to another taker; after this many tries the key is busy.
_TAKEOVER_TRIES = 3


@dataclass
class Claim:
    state: ClaimState
    key: str
    record: dict[str, Any]  # ours for new/takeover; the other's otherwise
    ttl_s: float = 0.0
    # The reservation asked for with the claim (begin_d's ``reserve``), made only if the
    # claim was taken on the first try: ``(True, the grant or None)`` or ``(False, the
    # error)``; None when it was not made (the caller reserves by itself).
    grant: tuple[bool, Any] | None = None

    @property
    def answer(self) -> Any:
        """The upstream answer a taken-over claim had checkpointed (None: ask again)."""
        return self.record.get("answer") if self.state == "takeover" else None


def _valid(record: Any) -> dict[str, Any]:
    if (not isinstance(record, dict) or record.get("status") not in ("in_flight", "done")
            or not isinstance(record.get("claim_id"), str)):
        raise AuthorityUnavailable("state store unavailable: a corrupt idempotency record")
    return record


def _stale_d(record: dict[str, Any], now: float) -> Decision[bool]:
    if record.get("status") != "in_flight":
        return False
    lease = record.get("lease_until")
    if not isinstance(lease, int | float) or lease <= now:
        return True
    return not (yield from owner_alive_d(record.get("owner")))


def begin_d(key: str, fingerprint: str, *, claim_id: str, ttl_s: float, lease_s: float,
            reserve: StoreOp | None = None, together: bool = False) -> Decision[Claim]:
    """Claim ``key`` for this request, or say why not.

    ``reserve`` (a ``budget_reserve``): the request's reservation, made only if the claim
    is taken (a replayed or refused request holds no budget), in one write with it where
    the store offers one (``together``: ``idem_claim_reserve``), else right after it; its
    outcome is the claim's ``grant``."""
    keep = max(ttl_s, lease_s)
    for attempt in range(_TAKEOVER_TRIES):
        t = time.time()
        claim = {"claim_id": claim_id, "status": "in_flight", "fingerprint": fingerprint,
                 "lease_until": t + lease_s, "claimed_at": t, "owner": process_owner()}
        if attempt == 0 and reserve is not None:
            existing, grant = yield from _claim_reserving_d(key, claim, keep, reserve,
                                                            together)
            if existing is None:
                return Claim("new", key, claim, keep, grant=grant)
        else:
            existing = yield S.idem_claim(key, claim, ttl_s=keep)
            if existing is None:
                return Claim("new", key, claim, keep)
        existing = _valid(existing)
        same = existing.get("fingerprint") == fingerprint
        if (yield from _stale_d(existing, t)):
            answer = existing.get("answer")
            if answer is not None and not same:
                return Claim("conflict", key, existing)
            mine = {**claim, "takeover_of": existing["claim_id"]}
            if answer is not None:
                mine["answer"] = answer
            if (yield S.idem_replace(key, existing["claim_id"], mine, ttl_s=keep)):
                return Claim("takeover" if answer is not None else "new", key, mine, keep)
            continue  # another taker won; look again
        if not same:
            return Claim("conflict", key, existing)
        if existing["status"] == "in_flight":
            return Claim("in_progress", key, existing)
        return Claim("replay", key, existing)
    raise AuthorityUnavailable("state store unavailable: idempotency key contended")


def _claim_reserving_d(key: str, claim: dict[str, Any], keep: float, reserve: StoreOp,
                       together: bool) -> Decision[tuple[Any, tuple[bool, Any] | None]]:
    """The claim, and the reservation if the claim was taken: ``(the record in the way,
    None)`` or ``(None, the reservation's outcome)``."""
    if together:
        counters, = reserve.args
        return (yield S.idem_claim_reserve(
            key, claim, ttl_s=keep, counters=counters, min_usd=reserve.kwargs["min_usd"],
            max_usd=reserve.kwargs["max_usd"], budget_ttl_s=reserve.kwargs["ttl_s"]))
    existing = yield S.idem_claim(key, claim, ttl_s=keep)
    if existing is not None:
        return existing, None
    try:
        return None, (True, (yield reserve))
    except Exception as exc:  # the claim is taken: its caller handles the failure with it
        return None, (False, exc)


@dataclass
class LazyClaim:
    """A key claimed only when an answer is about to take effect at the gateway (the SDK's
    retry key: a retry by openai's loop only follows an attempt whose answer the app never
    got, so a plain completion, or one whose calls all go back to the app to run, need not
    pay for a record). The claim is taken before the first effect: a limit charged, a
    business key taken, an approval created, an executor run (``actions._AnswerHold``)."""

    key: str
    fingerprint: str
    claim_id: str
    ttl_s: float
    lease_s: float
    claim: Claim | None = None

    def claim_d(self, answer: Any) -> Decision[Claim]:
        got = yield from begin_d(self.key, self.fingerprint, claim_id=self.claim_id,
                                 ttl_s=self.ttl_s, lease_s=self.lease_s)
        if got.state == "new":
            yield from checkpoint_d(got, answer)
            self.claim = got
        return got


def claim_fresh_d(key: str, fingerprint: str, *, claim_id: str, ttl_s: float,
                  lease_s: float) -> Decision[Claim]:
    """Claim ``key`` unconditionally (a keyless request's first attempt: a retry of it
    finds this record; a second, identical request is not a retry and runs anew)."""
    t = time.time()
    claim = {"claim_id": claim_id, "status": "in_flight", "fingerprint": fingerprint,
             "lease_until": t + lease_s, "claimed_at": t, "owner": process_owner()}
    keep = max(ttl_s, lease_s)
    yield S.idem_put(key, claim, ttl_s=keep)
    return Claim("new", key, claim, keep)


def checkpoint_d(claim: Claim, answer: Any) -> Decision[bool]:
    """Keep the upstream answer in our claim before anything of it takes effect."""
    op, record = checkpoint_op(claim, answer)
    return checkpointed(claim, record, (yield op))


def checkpoint_op(claim: Claim, answer: Any) -> tuple[StoreOp, dict[str, Any]]:
    """The checkpoint's write and the record it keeps, for a caller that sends it together
    with another write (``effects.StoreOps``); :func:`checkpointed` takes its result."""
    record = {**claim.record, "answer": answer}
    return S.idem_replace(claim.key, claim.record["claim_id"], record,
                          ttl_s=claim.ttl_s or 86400.0), record


def checkpointed(claim: Claim, record: dict[str, Any], ok: Any) -> bool:
    if ok:
        claim.record = record
    return bool(ok)


def finish_d(claim: Claim, response: dict[str, Any], *, ttl_s: float) -> Decision[bool]:
    """Store the finished answer for replays (only if the key is still ours)."""
    return bool((yield finish_op(claim, response, ttl_s=ttl_s)))


def finish_op(claim: Claim, response: dict[str, Any], *, ttl_s: float) -> StoreOp:
    """:func:`finish_d`'s write, for a caller that sends it with another one."""
    record = {"claim_id": claim.record["claim_id"], "status": "done",
              "fingerprint": claim.record["fingerprint"], "response": response,
              "finished_at": time.time()}
    # Not flushed on its own (store protocol): the answer kept before any effect was, so
    # losing this in a database crash costs a retry a re-gating, never a second effect.
    return S.idem_replace(claim.key, claim.record["claim_id"], record, ttl_s=ttl_s,
                          flush=False)


def abandon_d(claim: Claim) -> Decision[bool]:
    """Drop our claim (nothing took effect), so a retry may run."""
    return bool((yield S.idem_delete(claim.key, claim.record["claim_id"])))


def begin(store: Any, key: str, fingerprint: str, *, claim_id: str, ttl_s: float,
          lease_s: float) -> Claim:
    return run_on_store(begin_d(key, fingerprint, claim_id=claim_id, ttl_s=ttl_s,
                                lease_s=lease_s), store)


def checkpoint(store: Any, claim: Claim, answer: Any, *, ttl_s: float) -> bool:
    claim.ttl_s = ttl_s
    return run_on_store(checkpoint_d(claim, answer), store)


def finish(store: Any, claim: Claim, response: dict[str, Any], *, ttl_s: float) -> bool:
    return run_on_store(finish_d(claim, response, ttl_s=ttl_s), store)


def abandon(store: Any, claim: Claim) -> bool:
    return run_on_store(abandon_d(claim), store)

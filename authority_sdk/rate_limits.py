"""Rate limits per API key (issue 17, point 5): requests and tokens per minute, and
requests in flight, shared by every process and replica through the state store.

Each limit is a counter reserved atomically with the budgets' primitive
(``budget_reserve`` never lets a counter pass its cap, whatever the concurrency), so two
replicas cannot admit one request too many between them. Per-minute counters are fixed
windows (the minute of the clock), kept two minutes; a refused request is told when its
window ends (``Retry-After``). Tokens are reserved as the cost plan's worst case (the
prompt plus the output cap) and settled to what the upstream reports. A request in flight
holds one of the key's slots — a lease in the store named after the request — until it
ends; a process killed mid-request leaves its slot until the lease runs out (the upstream
timeout and a margin), never forever. Slots are probed from a random start, so a free one
is found in about 1/(1 - load) tries.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .effects import Decision, S
from .errors import RateLimited
from .wire import token_count

if TYPE_CHECKING:
    from .costs import CostPlan
    from .policy import RateLimit

__all__ = ["RateHold", "admit_d", "release_d", "settle_d", "usage_tokens"]

_WINDOW_S = 60
_KEEP_S = 2 * _WINDOW_S


@dataclass
class RateHold:
    """What one admitted request holds against its key's limits."""

    holder: str
    requests_counter: str | None = None
    tokens_counter: str | None = None
    tokens_reserved: float = 0.0
    slot: str | None = None


def _retry_after(now: float) -> int:
    return max(1, math.ceil(_WINDOW_S - now % _WINDOW_S))


def admit_d(limit: RateLimit | None, key: str, holder: str, plan: CostPlan | None, *,
            slot_ttl_s: float, now: float | None = None) -> Decision[RateHold | None]:
    """Reserve this request (``holder``: its request id) against the key's limits, or raise
    ``RateLimited`` (429) with nothing held."""
    if limit is None:
        return None
    now = time.time() if now is None else now
    window = int(now // _WINDOW_S)
    hold = RateHold(holder)
    try:
        if limit.requests_per_minute is not None:
            counter = f"rate:{key}:requests:{window}"
            if (yield S.budget_reserve([(counter, float(limit.requests_per_minute))],
                                       min_usd=1.0, max_usd=1.0, ttl_s=_KEEP_S)) is None:
                raise RateLimited(
                    f"key {key!r} reached its limit of {limit.requests_per_minute} requests "
                    f"a minute", decided_by="rate_limit:requests_per_minute",
                    retry_after_s=_retry_after(now))
            hold.requests_counter = counter
        if limit.tokens_per_minute is not None:
            want = float(plan.prompt_tokens + plan.output_limit * plan.n) if plan else 1.0
            if want > limit.tokens_per_minute:
                raise RateLimited(
                    f"this request may use {int(want)} tokens, more than key {key!r} may use "
                    f"in a minute ({limit.tokens_per_minute}); lower max_tokens",
                    code="rate_limit_exceeds_window",
                    decided_by="rate_limit:tokens_per_minute")
            counter = f"rate:{key}:tokens:{window}"
            if (yield S.budget_reserve([(counter, float(limit.tokens_per_minute))],
                                       min_usd=want, max_usd=want, ttl_s=_KEEP_S)) is None:
                raise RateLimited(
                    f"key {key!r} reached its limit of {limit.tokens_per_minute} tokens a "
                    f"minute", decided_by="rate_limit:tokens_per_minute",
                    retry_after_s=_retry_after(now))
            hold.tokens_counter, hold.tokens_reserved = counter, want
        if limit.concurrent is not None:
            first = random.randrange(limit.concurrent)
            for i in range(limit.concurrent):
                slot = f"rate:{key}:slot:{(first + i) % limit.concurrent}"
                if (yield S.lease_acquire(slot, holder, ttl_s=slot_ttl_s)):
                    hold.slot = slot
                    break
            else:
                raise RateLimited(
                    f"key {key!r} already has {limit.concurrent} requests in flight",
                    decided_by="rate_limit:concurrent", retry_after_s=1)
    except RateLimited:
        # A refused request takes nothing: give back what it reserved before the refusal.
        if hold.requests_counter is not None:
            yield S.budget_settle([hold.requests_counter], reserved=1.0, actual=0.0,
                                  ttl_s=_KEEP_S)
        yield from release_d(hold)
        raise
    return hold


def usage_tokens(usage: dict[str, Any] | None) -> float | None:
    """Total tokens an answer reports (chat: prompt/completion; Responses: input/output)."""
    if not isinstance(usage, dict):
        return None
    # Only a count an answer can really report: anything else (a string, NaN, a negative
    # number, 10**400) says nothing, and the reservation stands instead.
    total = token_count(usage.get("total_tokens"))
    if total is not None:
        return float(total)
    parts = [token_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens",
                                                 "input_tokens", "output_tokens")]
    nums = [float(p) for p in parts if p is not None]
    return sum(nums) if nums else None


def settle_d(hold: RateHold | None, usage: dict[str, Any] | None) -> Decision[None]:
    """The request ended with an answer (or a stream that may have been billed): tokens
    become what was used (the reservation when unknown); the slot is freed."""
    if hold is None:
        return
    if hold.tokens_counter is not None:
        used = usage_tokens(usage)
        counter, hold.tokens_counter = hold.tokens_counter, None  # settled once
        yield S.budget_settle([counter], reserved=hold.tokens_reserved,
                              actual=hold.tokens_reserved if used is None else used,
                              ttl_s=_KEEP_S)
    yield from _free_slot_d(hold)


def release_d(hold: RateHold | None) -> Decision[None]:
    """The upstream gave no usable answer: no tokens were used; the slot is freed. (The
    request still counts against requests a minute: it was made.)"""
    if hold is None:
        return
    if hold.tokens_counter is not None:
        counter, hold.tokens_counter = hold.tokens_counter, None  # settled once
        yield S.budget_settle([counter], reserved=hold.tokens_reserved, actual=0.0,
                              ttl_s=_KEEP_S)
    yield from _free_slot_d(hold)


def _free_slot_d(hold: RateHold) -> Decision[None]:
    if hold.slot is not None:
        slot, hold.slot = hold.slot, None
        yield S.lease_release(slot, hold.holder)

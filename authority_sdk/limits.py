"""Limits over time (issue: splitting): caps on the count of an action and on the sum of
one of its arguments, per answer or per hour/day/month, per environment or per key.

Per-answer limits are counted in the answer's fixed call order (pure). Period limits
are *reserved* atomically in the store like budgets (a conditional add that can
never pass the cap), so concurrent requests cannot pass a limit together. An
exceeded limit — or a value a limit cannot read (a missing or non-numeric
argument for a sum) — moves the action to the limit's ``then`` mode, and only
ever towards the strict end. A pending approval holds its reservation; rejection,
expiry and a failed execution give it back (:func:`release_d`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .effects import Decision, S
from .modes import lookup
from .policy import Limit

__all__ = ["Charge", "LimitCheck", "LimitTally", "charges_for", "release_d", "reserve_d"]

_PERIOD_S = {"hour": 3600, "day": 86400, "month": 31 * 86400}


@dataclass(frozen=True)
class Charge:
    """One reservation against one counter."""

    counter: str
    delta: float
    cap: float
    ttl_s: float
    label: str

    def to_record(self) -> dict[str, Any]:
        return {"counter": self.counter, "delta": self.delta, "ttl_s": self.ttl_s}


@dataclass
class LimitCheck:
    exceeded: list[tuple[Limit, str]] = field(default_factory=list)  # (limit, why)
    charges: list[tuple[Limit, Charge]] = field(default_factory=list)


@dataclass
class LimitTally:
    """Counts and sums of one answer so far, for per-answer limits."""

    counts: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, delta: float) -> float:
        self.counts[key] = self.counts.get(key, 0.0) + delta
        return self.counts[key]


def _limit_id(limit: Limit) -> str:
    raw = json.dumps(limit.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _window(period: str, now: float) -> str:
    t = time.gmtime(now)
    fmt = {"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[period]
    return time.strftime(fmt, t)


def _number(args: dict[str, Any], name: str) -> float | None:
    found, value = lookup(args, name)
    if not found or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        v = float(value)
    except OverflowError:  # an int past any float (10**400 is valid JSON): nothing to add up
        return None
    return v if math.isfinite(v) else None


def describe(limit: Limit) -> str:
    what = []
    if limit.max_calls is not None:
        what.append(f"{limit.max_calls} calls")
    if limit.sum is not None:
        what.append(f"{limit.sum} summing to {limit.max:g}")
    return " and ".join(what) + f" per {limit.per} per {limit.scope}"


def charges_for(limits: list[Limit], *, action_type: str, args: dict[str, Any],
                environment: str, caller: str, tally: LimitTally,
                now: float | None = None) -> LimitCheck:
    """Check per-answer limits (counting this call) and list the period reservations."""
    out = LimitCheck()
    t = time.time() if now is None else now
    for limit in limits:
        lid = _limit_id(limit)
        value = None
        if limit.sum is not None:
            value = _number(args, limit.sum)
            if value is None or value < 0:
                out.exceeded.append((limit, f"limit {describe(limit)}: {limit.sum} is not a "
                                            "non-negative number it can add up"))
                continue
        if limit.per == "answer":
            n = tally.add(f"{lid}:calls", 1.0)
            if limit.max_calls is not None and n > limit.max_calls:
                out.exceeded.append((limit, f"limit {describe(limit)} exceeded "
                                            f"({int(n)} calls in this answer)"))
            if limit.max is not None and value is not None:
                total = tally.add(f"{lid}:sum", value)
                if total > limit.max:
                    out.exceeded.append((limit, f"limit {describe(limit)} exceeded "
                                                f"({limit.sum} totals {total:g} in this answer)"))
            continue
        owner = environment if limit.scope == "environment" else caller
        base = f"limit:{limit.scope}:{owner}:{action_type}:{lid}:{limit.per}:" \
               f"{_window(limit.per, t)}"
        ttl = _PERIOD_S[limit.per] * 2.0
        if limit.max_calls is not None:
            out.charges.append((limit, Charge(base + ":calls", 1.0, float(limit.max_calls), ttl,
                                              describe(limit))))
        if limit.max is not None and value is not None:
            out.charges.append((limit, Charge(base + ":sum", value, float(limit.max), ttl,
                                              describe(limit))))
    return out


def reserve_d(check: LimitCheck) -> Decision[list[Charge]]:
    """Reserve every period charge; on the first refusal give back what was taken and record
    the limit as exceeded. Returns the charges held."""
    held: list[Charge] = []
    for limit, charge in check.charges:
        got = yield S.budget_reserve([(charge.counter, charge.cap)], min_usd=charge.delta,
                                     max_usd=charge.delta, ttl_s=charge.ttl_s)
        if got is None:
            check.exceeded.append((limit, f"limit {charge.label} exceeded"))
            yield from release_d([c.to_record() for c in held])
            return []
        held.append(charge)
    return held


def release_d(charges: list[dict[str, Any]]) -> Decision[None]:
    """Give back reservations (an approval rejected or expired, an execution that failed)."""
    for c in charges:
        if not isinstance(c, dict) or not isinstance(c.get("counter"), str):
            continue
        delta = float(c.get("delta") or 0.0)
        yield S.budget_settle([c["counter"]], reserved=delta, actual=0.0,
                              ttl_s=float(c.get("ttl_s") or 86400.0))

"""What if the policy changed? Replay the actions on record under a new policy (issue 17,
point 2): ``authority policy diff --against NEW.yaml``.

Each decided action in the audit log (type, arguments as recorded, environment) is
resolved under the policy in force and under the new one, with the same pure function the
gateway decides with (``modes.resolve_action``), and the two modes compared. What the log
cannot decide is counted as "cannot tell", never guessed:

- arguments the policy redacted before they were recorded (a rule may read them);
- an environment the new policy does not define;
- limits over time and business-key dedupe, which depend on state at the time: an action
  either policy limits or dedupes is "cannot tell" when the policy alone would run it.

The tool's declared schema is not in the log; schema checks are not replayed.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .audit.redaction import REDACTED
from .modes import resolve_action
from .policy import Policy

__all__ = ["Change", "WhatIf", "decided_actions", "parse_since", "replay"]

_UNITS = {"m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """``7d``, ``12h``, ``30m`` → seconds. ``ValueError`` with the reason otherwise."""
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise ValueError(f"--since takes a number and m, h or d (e.g. 7d), not {text!r}")
    return int(text[:-1]) * _UNITS[text[-1]]


def _ts(entry: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(entry.get("ts")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def decided_actions(entries: Iterable[dict[str, Any]], since_s: float | None = None,
                    now: float | None = None) -> Iterator[dict[str, Any]]:
    """The action entries that record a decision (not the "executing" intents)."""
    cutoff = None if since_s is None else (time.time() if now is None else now) - since_s
    for e in entries:
        details = e.get("details") or {}
        if e.get("event") != "action" or details.get("status") == "executing":
            continue
        if not isinstance(e.get("action_type"), str) or "mode" not in details:
            continue
        if cutoff is not None and (_ts(e) or 0.0) < cutoff:
            continue
        yield e


def _has_redacted(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if v == REDACTED:
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


@dataclass
class Change:
    request_id: str | None
    environment: str
    arguments: Any
    old: str
    new: str


@dataclass
class WhatIf:
    total: Counter[str] = field(default_factory=Counter)        # per action type
    changed: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    cannot_tell: Counter[tuple[str, str]] = field(default_factory=Counter)  # (type, why)
    examples: dict[tuple[str, str, str], list[Change]] = field(
        default_factory=lambda: defaultdict(list))

    def to_json(self) -> dict[str, Any]:
        return {
            "actions": sum(self.total.values()),
            "by_action": {
                t: {"recorded": n,
                    "would_change": [
                        {"from": o, "to": w, "count": c,
                         "examples": [ex.__dict__ for ex in self.examples[(t, o, w)]]}
                        for (tt, o, w), c in sorted(self.changed.items()) if tt == t],
                    "cannot_tell": {why: c for (tt, why), c in sorted(self.cannot_tell.items())
                                    if tt == t}}
                for t, n in sorted(self.total.items())},
        }


def _state_dependent(policy: Policy, action_type: str) -> bool:
    a = policy.actions.get(action_type)
    return a is not None and bool(a.limits or a.dedupe_on)


def replay(old: Policy, new: Policy, actions: Iterable[dict[str, Any]],
           examples: int = 3) -> WhatIf:
    out = WhatIf()
    for e in actions:
        action_type = e["action_type"]
        details = e.get("details") or {}
        env = str(e.get("environment") or old.default_environment)
        args = details.get("arguments")
        out.total[action_type] += 1
        if env not in new.environments or env not in old.environments:
            out.cannot_tell[(action_type, "environment not in both policies")] += 1
            continue
        if _has_redacted(args):
            out.cannot_tell[(action_type, "arguments redacted on record")] += 1
            continue
        raw = json.dumps(args if isinstance(args, dict) else {})
        was = resolve_action(old, env, action_type, raw).mode
        now = resolve_action(new, env, action_type, raw).mode
        if was != now:
            key = (action_type, was, now)
            out.changed[key] += 1
            if len(out.examples[key]) < examples:
                out.examples[key].append(Change(e.get("request_id"), env, args, was, now))
        elif now != "deny" and (_state_dependent(old, action_type)
                                or _state_dependent(new, action_type)):
            out.cannot_tell[(action_type, "limits or dedupe depend on state")] += 1
    return out

"""The entry format every sink writes, and how entries link (DESIGN.md §6).

An entry carries ``prev_hash`` (the previous entry's ``hash``, ``"0" * 64`` for the
first) and ``hash = sha256(prev_hash + canonical_json(entry without hash and mac))``,
so an edit, deletion, insertion or reordering breaks the chain. With a key
(``audit.hmac_key_env`` / ``audit.hmac_key_file``) each entry also carries
``mac = HMAC-SHA256(key, "entry:" + hash)``: whoever can write the log but lacks the
key cannot append an entry that verifies.

A ``recovery`` entry whose ``details.problem`` is one of :data:`LOSS_PROBLEMS`
records entries that were known to exist (synced, their head recorded) and are gone:
``details.lost = [first_seq, last_seq]``, and its own ``seq`` is ``last_seq + 1``, so the
seq keeps moving forward past what was lost and the gap is accounted for exactly.
Verification fails on such a range until a later ``recovery`` entry with problem
``acknowledged`` lists its seq in ``details.acknowledges`` (``authority audit
acknowledge``: who and why, on the record).

Sinks share :func:`prepare` (validate the caller's fields, redact, bound) and
:func:`build` (seal an entry), so every sink writes byte-for-byte the same entries.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..wire import canonical_json as _canonical
from .redaction import redact
from .values import bound

__all__ = [
    "ACKNOWLEDGED",
    "DECISIONS",
    "EVENTS",
    "FIELDS",
    "GENESIS_HASH",
    "LOSS_PROBLEMS",
    "Prepared",
    "build",
    "build_run",
    "canonical_json",
    "entry_hash",
    "entry_mac",
    "loss_entry",
    "lost_range",
    "prepare",
    "shape_problem",
]

FIELDS: tuple[str, ...] = (
    "ts", "seq", "event", "request_id", "environment", "model", "action_type", "decision",
    "reason", "cost_estimate_usd", "cost_actual_usd", "approval_status", "execution_result",
    "actor", "policy_hash", "prev_hash", "hash",
)
EVENTS = frozenset({"request", "action", "approval", "kill_switch", "replay", "recovery",
                    "notification", "policy", "upstream", "retention"})
DECISIONS = frozenset({"allow", "deny", "error", None})
GENESIS_HASH = "0" * 64
# Entries the chain knew (a synced head, a checkpoint) that are gone: verify fails on them
# until acknowledged.
LOSS_PROBLEMS = frozenset({"lost_entries", "rewritten"})
ACKNOWLEDGED = "acknowledged"

_FIELD_SET = frozenset(FIELDS)
_ALLOWED_KEYS = _FIELD_SET | {"details", "mac"}
# Assigned by the log itself: a caller supplying them is a bug, not extra context.
_RESERVED = frozenset({"ts", "seq", "prev_hash", "hash", "mac"})
_UNHASHED = frozenset({"hash", "mac"})


def canonical_json(obj: Any) -> str:
    """The text an entry's hash covers: the UTF-8 spelling of the gateway's canonical JSON."""
    return _canonical(obj, ascii_only=False)


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """The hash an entry must carry, given the previous entry's hash."""
    body = {k: v for k, v in entry.items() if k not in _UNHASHED}
    # New entries hold no lone surrogate (values.bound escapes them); surrogatepass keeps
    # entries written before that hashing as they did.
    data = (prev_hash + canonical_json(body)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def entry_mac(key: bytes, hash_: str) -> str:
    return hmac.new(key, b"entry:" + hash_.encode("ascii", "replace"), hashlib.sha256).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Prepared:
    """An entry's content, checked and made safe, waiting for its place in the chain."""

    event: str
    fields: dict[str, Any]
    details: dict[str, Any]


def prepare(event: str, fields: dict[str, Any], redact_names: frozenset[str] = frozenset()
            ) -> Prepared:
    """Check a caller's entry; unknown keys go into ``details``; redact and bound values."""
    fields = dict(fields)
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    reserved = _RESERVED & fields.keys()
    if reserved:
        raise ValueError(f"assigned by the audit log, not the caller: {sorted(reserved)}")
    if fields.get("decision") not in DECISIONS:
        raise ValueError(f"decision must be allow, deny, error or None, "
                         f"not {fields['decision']!r}")
    details = fields.pop("details", None)
    if details is not None and not isinstance(details, dict):
        raise TypeError("details must be a dict")
    details = dict(details or {})
    for key in [k for k in fields if k not in _FIELD_SET]:
        if key in details:
            raise ValueError(f"{key!r} given both as a field and inside details")
        details[key] = fields.pop(key)
    if redact_names:
        fields = redact(fields, redact_names)
        details = redact(details, redact_names)
    # One budget for the whole entry: a 4 MB model name costs the log 4 KB, and a huge
    # execution result cannot push the other fields out.
    safe = bound({"fields": fields, "details": details})
    return Prepared(event, safe.get("fields") or {}, safe.get("details") or {})


def build_run(prepared: list[Prepared], prev_seq: int, prev_hash: str,
              key: bytes | None) -> list[dict[str, Any]]:
    """Seal several entries in a row after ``(prev_seq, prev_hash)``."""
    entries: list[dict[str, Any]] = []
    for p in prepared:
        entry = build(p, prev_seq, prev_hash, key)
        entries.append(entry)
        prev_seq, prev_hash = entry["seq"], entry["hash"]
    return entries


def build(prepared: Prepared, prev_seq: int, prev_hash: str, key: bytes | None, *,
          seq: int | None = None) -> dict[str, Any]:
    """Seal an entry after ``(prev_seq, prev_hash)``; ``seq`` skips ahead past a lost range."""
    entry: dict[str, Any] = {"ts": _now(), "seq": prev_seq + 1 if seq is None else seq,
                             "event": prepared.event}
    for name in FIELDS[3:-2]:
        entry[name] = prepared.fields.get(name)
    if prepared.details:
        entry["details"] = prepared.details
    entry["prev_hash"] = prev_hash
    entry["hash"] = entry_hash(prev_hash, entry)
    if key is not None:
        entry["mac"] = entry_mac(key, entry["hash"])
    return entry


def shape_problem(entry: dict[str, Any]) -> str | None:
    keys = entry.keys()
    missing = _FIELD_SET - keys
    if missing:
        return "missing fields: " + ", ".join(sorted(missing))
    extra = keys - _ALLOWED_KEYS
    if extra:
        return "unknown fields: " + ", ".join(sorted(extra))
    if type(entry["seq"]) is not int:
        return "seq is not an integer"
    if not isinstance(entry["hash"], str) or not isinstance(entry["prev_hash"], str):
        return "hash or prev_hash is not a string"
    if "mac" in entry and not isinstance(entry["mac"], str):
        return "mac is not a string"
    if entry["event"] not in EVENTS:
        return f"unknown event {entry['event']!r}"
    if "details" in entry and not isinstance(entry["details"], dict):
        return "details is not an object"
    return None


def lost_range(entry: dict[str, Any]) -> tuple[int, int] | None:
    """``(first, last)`` seq a loss-recording ``recovery`` entry accounts for, if it is one."""
    if entry.get("event") != "recovery":
        return None
    details = entry.get("details")
    if not isinstance(details, dict) or details.get("problem") not in LOSS_PROBLEMS:
        return None
    lost = details.get("lost")
    if (isinstance(lost, list) and len(lost) == 2 and all(type(x) is int for x in lost)
            and 0 < lost[0] <= lost[1]):
        return lost[0], lost[1]
    return None


def loss_entry(first: int, last: int, problem: str, reason: str,
               extra: dict[str, Any]) -> Prepared:
    """The ``recovery`` entry recording that seqs ``first..last`` are gone."""
    return prepare("recovery", {"reason": reason, "actor": "audit-log",
                                "details": {"problem": problem, "lost": [first, last], **extra}})

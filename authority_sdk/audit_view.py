"""The audit log as people read it: pages of its tail, and the chain's verdict, per scope.

The file is the record; this is a view of it, shared by the management API and
the console, and it never fails on what it finds in the file:

- any line renders: one that is not JSON, not an object, or whose known fields
  have the wrong types comes back as ``{"invalid_line", "offset"}``; lone
  surrogates are escaped and strings longer than ``MAX_STRING`` are clipped
  (``…[+N chars]``), so a 4 MB model name costs a page 4 KB;
- a page holds at most ``limit`` entries and about ``PAGE_BYTES`` of log, and
  reads at most ``SCAN_BYTES`` looking for them; ``next_cursor`` continues
  towards the start of the file from where it stopped;
- a key bound to an environment sees only entries of that environment (not
  global events, not lines that are not entries: those could hold anything).

``verify`` checks the whole chain whatever the scope: an environment's entries
are only as trustworthy as the chain they sit in, and the verdict (ok, counts,
line number, head hash) says nothing about another environment. Its warnings
quote recovery entries, which may hold any environment's data, so a scoped key
gets only how many there are.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .audit import redact, verify_sink
from .control import UNSCOPED, Scope
from .errors import AuthorityUnavailable, InvalidRequest
from .paging import check_limit, decode_cursor, encode_cursor
from .render import clip_strings, printable

if TYPE_CHECKING:
    from .engine import Gateway

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_STRING", "audit_page", "audit_verdict"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_STRING = 4096
PAGE_BYTES = 1 << 20
SCAN_BYTES = 16 << 20
_INVALID_TEXT = 4096

_STR_FIELDS = ("ts", "event", "request_id", "environment", "model", "action_type", "decision",
               "reason", "approval_status", "actor", "policy_hash", "prev_hash", "hash")
_NUM_FIELDS = ("cost_estimate_usd", "cost_actual_usd")


def _shape_ok(entry: Any) -> bool:
    """Whether a parsed line can be shown as an entry (the fields people read are typed)."""
    if not isinstance(entry, dict):
        return False
    seq = entry.get("seq")
    if type(seq) is not int or not isinstance(entry.get("hash"), str):
        return False
    for name in _STR_FIELDS:
        v = entry.get(name)
        if v is not None and not isinstance(v, str):
            return False
    for name in _NUM_FIELDS:
        v = entry.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return False
    details = entry.get("details")
    return details is None or isinstance(details, dict)


def audit_page(gw: Gateway, *, limit: int | None = None, cursor: str | None = None,
               scope: Scope = UNSCOPED) -> dict[str, Any]:
    """``{"object": "list", "data": [...oldest first], "next_cursor"}``: the newest entries
    before ``cursor`` (the end of the log when None) that ``scope`` may read."""
    n = check_limit(limit, default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
    before: int | None = None
    if cursor is not None:
        position, _ = decode_cursor("audit", cursor)
        before = int(position)
        if before != position or before < 0:
            raise _bad_cursor()
    out: list[dict[str, Any]] = []
    next_position: int | None = None
    scanned = shown = 0
    last_scanned: int | None = None
    try:
        for rec in gw.audit.records_before(before):
            if len(out) >= n or (out and shown >= PAGE_BYTES) or scanned >= SCAN_BYTES:
                # The next page: the records before the last one this page looked at.
                next_position = last_scanned
                break
            last_scanned = rec.position
            scanned += rec.size
            entry = rec.entry if rec.entry is not None and _shape_ok(rec.entry) else None
            if entry is None:
                if scope.unscoped:
                    raw = rec.raw if rec.entry is None else json.dumps(
                        rec.entry, ensure_ascii=False, default=str)
                    out.append({"invalid_line": raw, "offset": rec.position})
                    shown += min(rec.size, _INVALID_TEXT)
                continue
            if not scope.covers(entry.get("environment")):
                continue
            out.append(entry)
            shown += rec.size
    except ValueError as exc:
        raise _bad_cursor() from exc
    except OSError as exc:
        raise AuthorityUnavailable(
            f"audit log unreadable: {gw.audit.location}: {exc.strerror or exc}") from exc
    out.reverse()
    data = [printable(clip_strings(redact(e, gw.policy.redact), MAX_STRING)) for e in out]
    nxt = encode_cursor("audit", (next_position, "")) if next_position else None
    return {"object": "list", "data": data, "next_cursor": nxt}


def _bad_cursor() -> InvalidRequest:
    return InvalidRequest("invalid cursor for the audit log (pass back the next_cursor of a "
                          "page unchanged)")


def audit_verdict(gw: Gateway, *, scope: Scope = UNSCOPED) -> dict[str, Any]:
    """The whole chain's verdict, checked against the head the state store keeps."""
    # The head is read before the log: every entry it names is then already written.
    head = gw.store.get_audit_head()
    result = verify_sink(gw.audit, head)
    warnings = list(result.warnings)
    if head is not None and result.ok and result.last_seq > head[0]:
        # On a live gateway, appends made while the file was being read land past the
        # head read before it. If the head has caught up since, that is traffic, not the
        # crash the warning is about.
        later = gw.store.get_audit_head()
        if later is not None and later[0] >= result.last_seq:
            stale = (f"{result.last_seq - head[0]} entries after the head recorded in the "
                     f"state store (seq {head[0]}); expected only after a crash")
            warnings = [w for w in warnings if w != stale]
    if head is None:
        warnings.append("head check skipped: the state store has no audit head yet")
    if not scope.unscoped and warnings:
        warnings = [f"{len(warnings)} warning(s) about the whole log; a key with no "
                    "environment can read them"]
    return dict(printable(clip_strings({
        "ok": result.ok, "entries": result.entries, "first_bad_line": result.first_bad_line,
        "reason": result.reason, "last_seq": result.last_seq, "last_hash": result.last_hash,
        "head_checked": head is not None, "kind": result.kind,
        "checkpoint_checked": gw.audit.checkpoints is not None, "warnings": warnings},
        MAX_STRING)))

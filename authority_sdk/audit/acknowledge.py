"""A person records that lost audit entries were investigated (``authority audit acknowledge``).

A ``recovery`` entry recording a loss keeps verification failing until then. The
acknowledgement is itself an entry of the chain (``problem: acknowledged``), naming
who, why and exactly which recovery entries it settles, and MAC'd like any other: a
forger without the key cannot acknowledge a loss away. Only recorded losses can be
acknowledged; a chain that is broken (edited, forged, cut without a record) cannot.
"""

from __future__ import annotations

from typing import Any

from ..errors import AuditIntegrityError, InvalidRequest
from .chain import ACKNOWLEDGED
from .protocol import AuditHead, AuditSink
from .verify import Loss, verify_sink

__all__ = ["MAX_TEXT", "acknowledge"]

MAX_TEXT = 500


def acknowledge(sink: AuditSink, head: AuditHead | None, *, by: str,
                reason: str) -> tuple[list[Loss], dict[str, Any] | None]:
    """Acknowledge every unacknowledged loss; returns them and the entry written (None when
    there was nothing to acknowledge)."""
    by, reason = by.strip(), reason.strip()
    if not by or not reason:
        raise InvalidRequest("an acknowledgement needs who (--by) and why (--reason)")
    if len(by) > MAX_TEXT or len(reason) > MAX_TEXT:
        raise InvalidRequest(f"--by and --reason are at most {MAX_TEXT} characters")
    sink.open()  # records a loss the log has not yet noticed, so it is acknowledged too
    result = verify_sink(sink, head.get_audit_head() if head is not None else None)
    if not result.ok and result.kind != "lost":
        raise AuditIntegrityError(f"the audit chain fails verification, and not because of a "
                                  f"recorded loss: {result.reason}")
    open_losses = list(result.unacknowledged)
    if not open_losses:
        return [], None
    entry = sink.append("recovery", actor=by, reason=reason, details={
        "problem": ACKNOWLEDGED, "acknowledges": [loss.seq for loss in open_losses],
        "ranges": [list(loss.lost) if loss.lost else None for loss in open_losses]})
    return open_losses, entry

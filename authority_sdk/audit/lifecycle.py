"""The audit log's periodic jobs: rotate, compress, prune, stream — and their status.

The background worker (one lease holder at a time) runs :func:`lifecycle_round` every
tick; ``authority audit rotate|prune|status`` run the same pieces by hand. Rotation also
happens in the append path as soon as the active file is due (see :mod:`.file`); here it
catches an age limit passed while nothing was appended, and compresses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import AuthorityError
from .file import FileSink
from .retention import PruneResult, prune
from .stream import StreamCursor, cursor_dir, stream_round

if TYPE_CHECKING:
    from ..policy import HttpStream, Policy, SyslogStream
    from .protocol import AuditSink

__all__ = ["LifecycleState", "can_prune", "lifecycle_round", "lifecycle_status", "prune_now",
           "safe_seq", "stream_cursor", "stream_metrics"]

log = logging.getLogger("authority.audit")

PRUNE_EVERY_S = 300.0  # retention works in days; reading the oldest archive each tick is waste


@dataclass
class LifecycleState:
    last_prune: float = 0.0
    prune_every_s: float = PRUNE_EVERY_S
    reports: dict[str, Any] = field(default_factory=dict)


def stream_cursor(policy: Policy, target: SyslogStream | HttpStream) -> StreamCursor:
    from ..policy import stream_name

    return StreamCursor(cursor_dir(policy.audit_path) / f"{stream_name(target)}.json")


def safe_seq(policy: Policy, sink: AuditSink) -> int | None:
    """The last seq that is safe elsewhere: checkpointed (when checkpoints are kept) and sent
    to every stream. None: nothing to wait for."""
    limits: list[int] = []
    if sink.checkpoints is not None:
        cp = sink.checkpoints.read()
        limits.append(cp.seq if cp is not None else 0)
    for target in policy.audit.stream:
        limits.append(stream_cursor(policy, target).read().seq)
    return min(limits) if limits else None


def can_prune(sink: AuditSink) -> bool:
    """A file sink prunes archived files; another sink may offer ``prune`` (the table)."""
    return isinstance(sink, FileSink) or callable(getattr(sink, "prune", None))


def prune_now(policy: Policy, sink: AuditSink, *, actor: str = "retention",
              now: float | None = None) -> PruneResult:
    from ..policy import duration_s

    assert policy.audit.retention is not None
    older_than_s = duration_s(policy.audit.retention)
    keep_after = safe_seq(policy, sink)
    return prune(sink, older_than_s=older_than_s, keep_after=keep_after, actor=actor, now=now)


def lifecycle_round(policy: Policy, sink: AuditSink, state: LifecycleState) -> dict[str, Any]:
    """One pass of every configured job; a failing job is reported, the others still run."""
    report: dict[str, Any] = {}

    def job(name: str, fn: Any) -> None:
        try:
            result = fn()
        except (AuthorityError, OSError) as exc:
            msg = exc.message if isinstance(exc, AuthorityError) else str(exc)
            report[name] = {"error": msg}
            log.warning("audit %s failed: %s", name, msg)
        else:
            if result:
                report[name] = result

    if isinstance(sink, FileSink) and policy.audit.rotate is not None:
        job("rotated", lambda: (a := sink.rotate()) and a.name)
        if policy.audit.rotate.compress:
            job("compressed", sink.compress_archives)
    now = time.time()
    if (can_prune(sink) and policy.audit.retention
            and now - state.last_prune >= state.prune_every_s):
        state.last_prune = now
        job("pruned", lambda: (r := prune_now(policy, sink)).deleted and asdict(r))
    for target in policy.audit.stream:
        def one(t: SyslogStream | HttpStream = target) -> dict[str, Any] | None:
            st = stream_round(sink, t, stream_cursor(policy, t))
            return {"seq": st.seq, "error": st.last_error} if st.last_error else None
        job(f"stream:{target.kind}", one)
    return report


def lifecycle_status(policy: Policy, sink: AuditSink) -> dict[str, Any]:
    """What ``authority audit status`` shows: files, the prune record, each stream's lag."""
    from ..policy import stream_name

    last_seq = 0
    for rec in sink.records_before(None):
        if rec.entry is not None and type(rec.entry.get("seq")) is int:
            last_seq = rec.entry["seq"]
            break
    out: dict[str, Any] = {"location": sink.location, "last_seq": last_seq}
    if isinstance(sink, FileSink):
        out["active_bytes"] = sink.path.stat().st_size if sink.path.exists() else 0
        out["archives"] = [{"file": a.name, "first": a.first, "last": a.last,
                            "compressed": a.compressed} for a in sink.archives()]
        pruned = sink.prune_record()
        out["pruned_through"] = pruned.seq if pruned else None
    streams = []
    for target in policy.audit.stream:
        st = stream_cursor(policy, target).read()
        streams.append({"name": stream_name(target), "kind": target.kind, "seq": st.seq,
                        "lag": max(0, last_seq - st.seq), "failures": st.failures,
                        "last_error": st.last_error, "last_success_ts": st.last_success_ts,
                        "sent_total": st.sent_total, "divergence": st.divergence})
    out["streams"] = streams
    return out


def stream_metrics(policy: Policy, head_seq: int) -> str:
    """Prometheus text for each stream's lag and failures, read from the cursor files at
    scrape time (shared by every worker process, so any of them answers the same)."""
    from ..policy import stream_name

    lag, failing = [], []
    for target in policy.audit.stream:
        try:
            st = stream_cursor(policy, target).read()
        except AuthorityError:
            continue
        name = stream_name(target)  # [A-Za-z0-9_.-]: no label escaping needed
        lag.append(f'authority_audit_stream_lag_entries{{stream="{name}"}} '
                   f"{max(0, head_seq - st.seq)}")
        failing.append(f'authority_audit_stream_failures{{stream="{name}"}} {st.failures}')
    if not lag:
        return ""
    return "\n".join([
        "# HELP authority_audit_stream_lag_entries Audit entries written but not yet "
        "acknowledged by the stream target.",
        "# TYPE authority_audit_stream_lag_entries gauge", *lag,
        "# HELP authority_audit_stream_failures Consecutive failed attempts to reach the "
        "stream target (0: healthy).",
        "# TYPE authority_audit_stream_failures gauge", *failing]) + "\n"

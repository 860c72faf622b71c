"""Retention: delete archived audit files past a period, and keep the chain verifiable.

Only archived files go, oldest first and contiguous (never the active file, never a
file between two kept ones), and only files whose newest entry is older than the
period and whose entries are all safe elsewhere: at or before the signed checkpoint
(when checkpoints are configured) and already sent to every stream (their cursors).

The steps, under the lock that serialises appends, each surviving a crash:

1. a ``retention`` entry is appended to the chain naming the last deleted seq and its
   hash (``details.pruned_through``/``pruned_hash``) and the files (MAC'd like any entry);
2. the prune record (:mod:`.pruned`) is written atomically with the same seq and hash,
   signed with the audit key when there is one;
3. the files are deleted, oldest first, and the folder synced.

A crash after 1 leaves every file and an announced prune (the next prune repeats it); after
2, files the record covers that are still there are verified against it; during 3, the
oldest kept file starts inside the pruned range, which verify accepts with a warning and
the next prune finishes. At no point is an entry gone that the record does not account for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import AuthorityUnavailable, InvalidRequest
from .archive import ArchiveFile, first_and_last
from .crashpoints import crash_point
from .file import FileSink, _parse_ts
from .protocol import AuditSink
from .pruned import fsync_dir, write_prune_record

__all__ = ["PruneResult", "prune"]


@dataclass(frozen=True)
class PruneResult:
    deleted: tuple[str, ...]
    pruned_through: int | None  # the last deleted seq (None: nothing deleted)
    held_back: str | None  # why older files were kept, if any were


def prune(sink: AuditSink, *, older_than_s: float, keep_after: int | None = None,
          actor: str = "retention", now: float | None = None) -> PruneResult:
    """Delete the archived files whose newest entry is older than ``older_than_s``, none past
    seq ``keep_after`` (the checkpoint's and every stream's position: what is not yet safe
    elsewhere stays). Another sink prunes its own way (``sink.prune``: the table's rows)."""
    if not isinstance(sink, FileSink):
        own = getattr(sink, "prune", None)
        if not callable(own):
            raise InvalidRequest(f"{sink.location} does not support retention")
        result: PruneResult = own(older_than_s=older_than_s, keep_after=keep_after,
                                  actor=actor, now=now)
        return result
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    with sink._locked():
        archives = sink.archives()
        chosen: list[tuple[ArchiveFile, dict[str, Any]]] = []
        held_back = None
        for af in archives:
            _first, last = first_and_last(af)
            if last is None:
                raise AuthorityUnavailable(f"audit archive {af.path} does not end in an entry; "
                                           "run `authority audit verify` before pruning")
            ts = _parse_ts(str(last.get("ts")))
            if ts is None or ts > cutoff:
                break
            if keep_after is not None and last["seq"] > keep_after:
                held_back = (f"{af.name} is older than the retention period but holds entries "
                             f"past seq {keep_after}, not yet checkpointed or streamed")
                break
            chosen.append((af, last))
        if not chosen:
            return PruneResult((), None, held_back)
        last = chosen[-1][1]
        names = [af.name for af, _ in chosen]
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        sink._write_locked([("retention", {
            "actor": actor,
            "reason": f"retention: archived entries up to seq {last['seq']} deleted",
            "details": {"pruned_through": last["seq"], "pruned_hash": last["hash"],
                        "files": names, "older_than_s": older_than_s}})])
        crash_point("prune:after_entry")
        write_prune_record(sink.prune_record_path, last["seq"], last["hash"],
                           stamp.replace("+00:00", "Z"), names, sink.key)
        crash_point("prune:after_record")
        _delete((af for af, _ in chosen), sink)
    return PruneResult(tuple(names), last["seq"], held_back)


def _delete(files: Iterable[ArchiveFile], sink: FileSink) -> None:
    for af in files:
        for path in (af.path, af.path.with_name(af.name + ".gz") if not af.compressed else None):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        fsync_dir(sink.archive_dir)
        crash_point("prune:after_delete_one")

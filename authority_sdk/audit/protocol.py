"""What an audit sink is: the engine, recovery, verify and the views use only this.

The JSONL file (:class:`~authority_sdk.audit.file.FileSink`) is one implementation;
``audit.backend`` in the policy picks one from :mod:`~authority_sdk.audit.registry`.
A sink appends entries built by :mod:`~authority_sdk.audit.chain` (so every sink
writes the same entries), serialises appends across threads and processes, records
the head in the state store after each append, writes checkpoints, and on
:meth:`AuditSink.open` turns what a crash or a deletion left into ``recovery``
entries. Reading never writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .checkpoint import CheckpointFile

__all__ = ["AuditHead", "AuditSink", "Record", "SinkSettings", "last_entries"]


@runtime_checkable
class AuditHead(Protocol):
    """Where the chain's head is kept outside the log (the state store); only moves forward."""

    def get_audit_head(self) -> tuple[int, str] | None: ...

    def set_audit_head(self, seq: int, hash: str) -> None: ...


@dataclass(frozen=True)
class Record:
    """One stored item, as read: an entry, or what stands where an entry should be.

    ``position`` orders records and is what a page cursor holds (a byte offset for the
    file); ``size`` is roughly what it costs to show. ``entry`` is None when the item
    is not an entry: ``problem`` says why and ``raw`` holds (the start of) its text.
    """

    position: int
    size: int
    entry: dict[str, Any] | None
    problem: str | None = None
    raw: str | None = None
    source: str | None = None  # the file it was read from, when the chain spans several


@runtime_checkable
class AuditSink(Protocol):
    location: str  # named in messages: a path, a table
    key: bytes | None  # entries carry a MAC under it when set
    checkpoints: CheckpointFile | None

    def open(self) -> AuditSink:
        """Make the sink writable now: recover what a crash left, record lost entries."""
        ...

    def append(self, event: str, **fields: Any) -> dict[str, Any]: ...

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Write entries together (one lock, one sync, one head update); return them."""
        ...

    def records(self) -> Iterator[Record]:
        """Every record, oldest first (verify's input). A missing log raises ``OSError``."""
        ...

    def records_before(self, position: int | None = None) -> Iterator[Record]:
        """Records before ``position`` (the end when None), newest first (pages, tail)."""
        ...

    def exists(self) -> bool: ...

    def close(self) -> None:
        """Write a last checkpoint and release what the sink holds."""
        ...


def last_entries(newest_first: Iterable[Record], n: int) -> list[dict[str, Any]]:
    """The first ``n`` of ``newest_first``, oldest first; an item that is not an entry (torn,
    garbage) comes back as ``{"invalid_line": text, "offset": position}``, not hidden."""
    out: list[dict[str, Any]] = []
    for rec in newest_first:
        if len(out) >= n:
            break
        out.append(rec.entry if rec.entry is not None
                   else {"invalid_line": rec.raw, "offset": rec.position})
    out.reverse()
    return out


class SinkSettings:
    """What every sink takes from the policy (``registry.sink_options``), kept alike."""

    fsync: bool
    key: bytes | None
    checkpoints: CheckpointFile | None
    checkpoint_every: int

    def _settings(self, *, fsync: bool, head: AuditHead | None, redact: Iterable[str],
                  key: bytes | None, checkpoints: CheckpointFile | None,
                  checkpoint_every: int) -> None:
        self.fsync = fsync
        self.key = key
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self._head = head
        self._redact = frozenset(redact)

"""The audit log (DESIGN.md §6): a hash chain, MAC'd and checkpointed, behind a sink protocol.

- :mod:`.chain` — the entry format, hashing, MACs, and what a loss looks like;
- :mod:`.values` — bounding values and escaping lone surrogates before they are hashed;
- :mod:`.redaction` — fields the policy says never reach the log;
- :mod:`.protocol` — :class:`AuditSink`, what the engine, recovery and verify talk to;
- :mod:`.file` — the JSONL file sink (``audit.backend: file``); :mod:`.lines` reads it;
- :mod:`.registry` — sinks by name; :mod:`.keys` — the audit key;
- :mod:`.checkpoint` — signed checkpoints kept outside the state folder;
- :mod:`.losses` — what a sink records when entries it knew of are gone;
- :mod:`.verify` — the verdict on a chain;
- :mod:`.acknowledge` — a person recording that a loss was investigated;
- :mod:`.archive` — rotated files, and reading one chain across them; :mod:`.retention`
  and :mod:`.pruned` — deleting old archives and recording where the kept chain starts;
- :mod:`.stream` — sending entries to syslog/HTTP from a durable cursor;
  :mod:`.stream_check` — comparing a receiver's copy with the chain;
- :mod:`.lifecycle` — the periodic jobs (rotate, compress, prune, stream) and their status.
"""

from __future__ import annotations

from .acknowledge import acknowledge
from .archive import ArchiveFile
from .chain import (
    DECISIONS,
    EVENTS,
    FIELDS,
    GENESIS_HASH,
    canonical_json,
    entry_hash,
    entry_mac,
)
from .checkpoint import Checkpoint, CheckpointFile
from .file import AuditLog, FileSink
from .lines import tail
from .protocol import AuditHead, AuditSink, Record
from .pruned import PruneRecord
from .redaction import REDACTED, redact
from .registry import open_sink, register_sink
from .retention import PruneResult, prune
from .stream import StreamCursor, StreamState, stream_round
from .stream_check import StreamComparison, compare_with_stream, read_stream_copy
from .verify import Loss, VerifyResult, verify, verify_records, verify_sink

__all__ = [
    "DECISIONS",
    "EVENTS",
    "FIELDS",
    "GENESIS_HASH",
    "REDACTED",
    "ArchiveFile",
    "AuditHead",
    "AuditLog",
    "AuditSink",
    "Checkpoint",
    "CheckpointFile",
    "FileSink",
    "Loss",
    "PruneRecord",
    "PruneResult",
    "Record",
    "StreamComparison",
    "StreamCursor",
    "StreamState",
    "VerifyResult",
    "acknowledge",
    "canonical_json",
    "compare_with_stream",
    "entry_hash",
    "entry_mac",
    "open_sink",
    "prune",
    "read_stream_copy",
    "redact",
    "register_sink",
    "stream_round",
    "tail",
    "verify",
    "verify_records",
    "verify_sink",
]

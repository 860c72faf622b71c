"""Check a chain, whatever sink holds it: hashes, MACs, the head, the checkpoint, losses.

:func:`verify_records` streams the records and stops at the first bad one. The
verdict's ``kind`` tells an operator what to do:

- ``tampered``: the chain is broken, an entry fails its MAC, or the log disagrees with
  the head or the checkpoint (edit, deletion, forgery, truncation) — investigate;
- ``lost``: the chain is intact but a ``recovery`` entry records entries that were
  known to exist and are gone, and no one has acknowledged it (``authority audit
  acknowledge``, exit 3 from ``authority audit verify``);
- ``unreadable``: the log or the checkpoint cannot be read.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AuthorityUnavailable
from .archive import archive_range
from .chain import ACKNOWLEDGED, GENESIS_HASH, LOSS_PROBLEMS, entry_hash, entry_mac, lost_range
from .chain import shape_problem as _shape_problem
from .protocol import Record

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .protocol import AuditSink
    from .pruned import PruneRecord

__all__ = ["Loss", "VerifyResult", "verify", "verify_records", "verify_sink"]


@dataclass(frozen=True)
class Loss:
    """A ``recovery`` entry that records lost or rewritten entries."""

    seq: int  # of the recovery entry
    line: int
    problem: str
    lost: tuple[int, int] | None
    reason: str
    acknowledged_by: str | None = None

    def describe(self) -> str:
        what = (f"entries {self.lost[0]}..{self.lost[1]} lost" if self.lost
                else "entries rewritten")
        return f"{what} (recovery entry seq {self.seq}, line {self.line}): {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_line: int | None
    reason: str | None
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    # Not failures, but worth an auditor's eye: recovery entries, entries past the head.
    warnings: tuple[str, ...] = ()
    kind: str | None = None  # tampered | lost | unreadable when not ok
    losses: tuple[Loss, ...] = field(default=())  # every loss, acknowledged or not

    @property
    def unacknowledged(self) -> tuple[Loss, ...]:
        return tuple(loss for loss in self.losses if loss.acknowledged_by is None)


def verify_records(records: Iterable[Record], head: tuple[int, str] | None = None, *,
                   key: bytes | None = None, checkpoint: Checkpoint | None = None,
                   location: str = "the log", pruned: PruneRecord | None = None
                   ) -> VerifyResult:
    """Check the whole chain; stop at the first bad record.

    With ``head`` (the state store's) or ``checkpoint``, the entry with that seq must be
    there with that hash (or be inside a recorded loss), which catches entries cut off
    the end and a log replaced wholesale. Entries after the head are tolerated with a
    warning: a crash between writing a line and recording the head leaves exactly that.
    With ``key``, every entry from the first MAC'd one on must carry a valid MAC.

    Records read from several files (rotation: ``Record.source``) are one chain: a file's
    first entry links to the previous file's last, each archived file must hold the seqs
    its name states, and a failure names the file and its line. With ``pruned`` (the
    retention record) the chain may begin after seq 1, exactly where the record says,
    and a ``retention`` entry in the chain must confirm the record.
    """
    seq = 0
    prev_hash = GENESIS_HASH
    lineno = 0
    warnings: list[str] = []
    losses: dict[int, Loss] = {}
    seen: dict[int, tuple[int, str]] = {}  # the seqs the head and checkpoint name
    wanted = {s for s in ((head or (0, ""))[0], checkpoint.seq if checkpoint else 0) if s > 0}
    macs_seen = unmacd_prefix = 0
    macs_unchecked = False
    entries = 0
    files = _Files()
    prune_confirmed = pruned is None
    if pruned is not None:
        wanted.add(pruned.seq)

    def result(ok: bool, line: int | None, reason: str | None, kind: str | None) -> VerifyResult:
        return VerifyResult(ok, seq, line, reason, seq, prev_hash, tuple(warnings), kind,
                            tuple(losses.values()))

    def fail(line: int | None, reason: str, kind: str = "tampered") -> VerifyResult:
        return result(False, line, reason + files.where(line == lineno), kind)

    if checkpoint is not None and key is not None and not checkpoint.signed_by(key):
        return fail(None, "the checkpoint is not signed by the audit key (forged, or written "
                          "with another key)")
    if pruned is not None and key is not None and not pruned.in_chain and not pruned.signed_by(key):
        return fail(None, "the prune record is not signed by the audit key (forged, or "
                          "written with another key)")
    try:
        for rec in records:
            lineno += 1
            bad_file = files.enter(rec)
            if bad_file:
                return fail(lineno, bad_file)
            entry = rec.entry
            if entry is None:
                return fail(lineno, rec.problem or "not an audit entry")
            problem = _shape_problem(entry)
            if problem:
                return fail(lineno, problem)
            s, h = entry["seq"], entry["hash"]
            misnamed = files.misnamed(s)
            if misnamed:
                return fail(lineno, misnamed)
            if h != entry_hash(entry["prev_hash"], entry):
                return fail(lineno, f"hash mismatch at seq {s}: the entry was altered")
            if key is not None:
                mac = entry.get("mac")
                if mac is None:
                    if macs_seen:
                        return fail(lineno, f"seq {s} has no MAC although earlier entries do: "
                                            "not written by the gateway (forged)")
                    unmacd_prefix += 1
                elif not hmac.compare_digest(mac, entry_mac(key, h)):
                    return fail(lineno, f"MAC mismatch at seq {s}: forged, or written with "
                                        "another key")
                else:
                    macs_seen += 1
            elif "mac" in entry:
                macs_unchecked = True
            lost = lost_range(entry)
            if entries == 0 and (s, entry["prev_hash"]) != (1, GENESIS_HASH) and (
                    lost is None or lost[0] != 1):
                start = _chain_start(s, entry["prev_hash"], pruned, warnings)
                if isinstance(start, str):
                    return fail(lineno, start)
                seq, prev_hash = start
            if lost is not None and lost == (seq + 1, s - 1):
                pass  # a gap the recovery entry accounts for exactly
            elif s > seq + 1 and files.line == 1 and entries:
                return fail(lineno, f"seq gap between files: {files.previous} ends at seq "
                                    f"{seq} but {files.current} starts at seq {s}: a file "
                                    f"holding seqs {seq + 1}..{s - 1} is missing")
            elif s != seq + 1:
                if s > seq + 1:
                    return fail(lineno, f"seq gap: expected {seq + 1}, found {s} "
                                        "(entries deleted)")
                return fail(lineno, f"seq out of order: expected {seq + 1}, found {s} "
                                    "(entry inserted, duplicated or reordered)")
            if entry["prev_hash"] != prev_hash:
                return fail(lineno, f"prev_hash at seq {s} does not match the previous "
                                    "entry's hash (entry inserted, deleted or reordered)")
            seq, prev_hash = s, h
            entries += 1
            files.saw(s)
            if s in wanted:
                seen[s] = (lineno, h)
            if pruned is not None and _confirms(entry, pruned):
                prune_confirmed = True
            if entry["event"] == "recovery":
                _recovery(entry, lineno, lost, losses, warnings)
        bad_file = files.leave()
        if bad_file:
            return fail(lineno, bad_file)
    except OSError as exc:
        return fail(None, f"cannot read {location}: {exc.strerror or exc}", "unreadable")

    if pruned is not None:
        if entries == 0:
            seq, prev_hash = pruned.seq, pruned.hash  # everything archived was pruned
        if pruned.seq in seen and seen[pruned.seq][1] != pruned.hash:
            return fail(seen[pruned.seq][0], f"entry seq {pruned.seq} does not match the prune "
                                             f"record (hash {pruned.hash[:16]}…)")
        if not prune_confirmed:
            return fail(None, f"the prune record (entries up to seq {pruned.seq} deleted by "
                              "retention) is not confirmed by a retention entry in the chain")
        seen.setdefault(pruned.seq, (0, pruned.hash))
        warnings.append(f"entries up to seq {pruned.seq} were deleted by retention "
                        f"({pruned.ts}); the chain is verified from there")

    if head is not None:
        bad = _anchor_problem("the state store's head", head, seq, seen, losses, pruned)
        if bad is not None:
            return fail(bad[0] if bad[0] is not None else lineno + 1, bad[1])
        if head[0] < seq:
            warnings.append(f"{seq - head[0]} entries after the head recorded in the state "
                            f"store (seq {head[0]}); expected only after a crash")
    if checkpoint is not None:
        bad = _anchor_problem("the checkpoint", (checkpoint.seq, checkpoint.hash), seq, seen,
                              losses, pruned)
        if bad is not None:
            return fail(bad[0] if bad[0] is not None else lineno + 1, bad[1])
    if key is not None and unmacd_prefix:
        warnings.append(f"the first {unmacd_prefix} entries carry no MAC (written before the "
                        "audit key was configured): only their hashes vouch for them")
    if macs_unchecked:
        warnings.append("entries carry MACs but no audit key was given: MACs not checked")
    open_losses = [loss for loss in losses.values() if loss.acknowledged_by is None]
    if open_losses:
        first = open_losses[0]
        more = f" (and {len(open_losses) - 1} more)" if len(open_losses) > 1 else ""
        return fail(first.line, f"{first.describe()}{more}; once investigated, record it with "
                                "`authority audit acknowledge`", "lost")
    return result(True, None, None, None)


def _recovery(entry: dict[str, object], lineno: int, lost: tuple[int, int] | None,
              losses: dict[int, Loss], warnings: list[str]) -> None:
    details = entry.get("details")
    details = details if isinstance(details, dict) else {}
    problem = details.get("problem")
    seq = int(entry["seq"])  # type: ignore[call-overload]
    if problem in LOSS_PROBLEMS:
        losses[seq] = Loss(seq, lineno, str(problem), lost, str(entry.get("reason")))
    elif problem == ACKNOWLEDGED:
        acks = details.get("acknowledges")
        who = str(entry.get("actor"))
        for target in acks if isinstance(acks, list) else []:
            loss = losses.get(target) if type(target) is int else None
            if loss is not None and loss.acknowledged_by is None:
                losses[target] = Loss(loss.seq, loss.line, loss.problem, loss.lost, loss.reason,
                                      who)
                warnings.append(f"line {loss.line}: {loss.describe()} — acknowledged by {who} "
                                f"at seq {seq}: {entry.get('reason')}")
    else:
        warnings.append(f"line {lineno}: recovery entry: {entry.get('reason')}")


def _anchor_problem(name: str, anchor: tuple[int, str], last_seq: int,
                    seen: dict[int, tuple[int, str]], losses: dict[int, Loss],
                    pruned: PruneRecord | None = None) -> tuple[int | None, str] | None:
    """Why the log disagrees with a recorded (seq, hash), or None when it agrees."""
    aseq, ahash = anchor
    if aseq <= 0:
        return None
    if aseq > last_seq:
        return None, (f"truncated: the log ends at seq {last_seq} but {name} is seq {aseq} "
                      "(entries removed from the end, or the log replaced)")
    if aseq in seen:
        line, h = seen[aseq]
        if h == ahash:
            return None
        return line, (f"entry seq {aseq} does not match {name} (hash {ahash[:16]}…): the log "
                      "was rewritten")
    if any(loss.lost and loss.lost[0] <= aseq <= loss.lost[1] for loss in losses.values()):
        return None  # inside a loss the log records (and verify reports)
    if pruned is not None and aseq < pruned.seq:
        return None  # deleted by retention, which the prune record and the chain confirm
    return None, f"seq {aseq} of {name} is not in the log"


def verify_sink(sink: AuditSink, head: tuple[int, str] | None = None) -> VerifyResult:
    """Verify what ``sink`` holds with its key and its checkpoint file, if configured."""
    checkpoint = None
    if sink.checkpoints is not None:
        try:
            checkpoint = sink.checkpoints.read()
        except AuthorityUnavailable as exc:
            return VerifyResult(False, 0, None, exc.message, kind="unreadable")
        if checkpoint is not None and not sink.exists():
            return VerifyResult(
                False, 0, None, f"{sink.location} is missing but the checkpoint "
                f"{sink.checkpoints.path} records seq {checkpoint.seq}: the log was deleted",
                kind="tampered")
    pruned = None
    prune_record = getattr(sink, "prune_record", None)  # a sink with retention
    if prune_record is not None:
        try:
            pruned = prune_record()
        except AuthorityUnavailable as exc:
            return VerifyResult(False, 0, None, exc.message, kind="unreadable")
    return verify_records(sink.records(), head, key=sink.key, checkpoint=checkpoint,
                          location=sink.location, pruned=pruned)


def verify(path: str | os.PathLike[str], head: tuple[int, str] | None = None, *,
           key: bytes | None = None, checkpoint: Checkpoint | None = None) -> VerifyResult:
    """Verify a JSONL audit file (see :func:`verify_records`)."""
    from .lines import read_records

    return verify_records(read_records(path), head, key=key, checkpoint=checkpoint,
                          location=str(path))


def _chain_start(s: int, prev: str, pruned: PruneRecord | None,
                 warnings: list[str]) -> tuple[int, str] | str:
    """Where a chain whose first entry is not seq 1 may begin: (seq, hash) before its first
    entry, or why it may not."""
    if pruned is None:
        return (f"the chain starts at seq {s}, not 1: entries 1..{s - 1} are missing (the "
                "oldest file deleted?) and no prune record accounts for them")
    if s == pruned.seq + 1:
        return pruned.seq, pruned.hash  # the first entry's prev_hash is checked against it
    if s <= pruned.seq:
        # A prune that deleted some of its files and was interrupted: the first kept link
        # cannot be checked, but the record's own seq must still be there with its hash.
        warnings.append(f"the chain starts at seq {s}, inside the range the prune record "
                        f"deleted (up to {pruned.seq}): a prune was interrupted; the next one "
                        "finishes it")
        return s - 1, prev
    return (f"the chain starts at seq {s} but the prune record accounts only for entries up "
            f"to seq {pruned.seq}: entries {pruned.seq + 1}..{s - 1} are missing")


def _confirms(entry: dict[str, object], pruned: PruneRecord) -> bool:
    details = entry.get("details")
    return (entry.get("event") == "retention" and isinstance(details, dict)
            and details.get("pruned_through") == pruned.seq
            and details.get("pruned_hash") == pruned.hash)


class _Files:
    """Which file the records come from (when they span several): names it in messages,
    and checks each archived file holds the seqs its name states."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.previous: str | None = None
        self.line = 0
        self._first: int | None = None
        self._last: int | None = None

    def enter(self, rec: Record) -> str | None:
        if rec.source == self.current:
            self.line += 1
            return None
        problem = self.leave()
        self.previous, self.current, self.line = self.current, rec.source, 1
        self._first = self._last = None
        return problem

    def misnamed(self, seq: int) -> str | None:
        """An archived file whose first entry is not the seq its name starts at."""
        named = archive_range(self.current) if self.current and self.line == 1 else None
        if named is None or named[0] == seq:
            return None
        return (f"{self.current} starts at seq {seq} but its name says {named[0]}..{named[1]} "
                "(renamed, swapped or edited)")

    def saw(self, seq: int) -> None:
        if self._first is None:
            self._first = seq
        self._last = seq

    def leave(self) -> str | None:
        named = archive_range(self.current) if self.current else None
        if named is None or self._first is None:
            return None
        if (self._first, self._last) != named:
            return (f"{self.current} holds seqs {self._first}..{self._last} but its name says "
                    f"{named[0]}..{named[1]} (renamed, edited or swapped)")
        return None

    def where(self, here: bool) -> str:
        if not here or self.current is None:
            return ""
        if self.previous is None and archive_range(self.current) is None:
            return ""  # one file: the line number says it all
        return f" [{self.current}, line {self.line}]"

"""Comparing the local chain with a receiver's copy of the stream (an outside checkpoint).

The copy is a file of what a receiver collected: one entry per line as JSON (what the
HTTP stream posts, ``{"entries": [...]}`` bodies or their entries), or syslog lines whose
message is the entry (RFC 5424 as the syslog stream sends it; a UDP stub carries only the
seq and hash). For every seq in the copy the local chain must hold that seq with the same
hash, or account for it (pruned by retention, inside a recorded loss). A full entry in the
copy is also re-hashed, so a receiver-side edit is told apart from a local one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .chain import entry_hash, lost_range
from .protocol import Record

__all__ = ["StreamComparison", "compare_with_stream", "read_stream_copy"]


@dataclass
class StreamComparison:
    compared: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_stream_copy(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The entries (or seq/hash stubs) a receiver's file holds, in file order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            yield from _entries_in(line)


def _entries_in(line: str) -> Iterator[dict[str, Any]]:
    candidates = [line]
    if not line.startswith("{"):
        # A syslog line: the JSON message follows the structured data.
        i = line.find("] {")
        candidates = [line[i + 2:]] if i >= 0 else []
    for text in candidates:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("entries"), list):
            yield from (e for e in data["entries"] if isinstance(e, dict))
        elif isinstance(data, dict):
            yield data


def compare_with_stream(local: Iterable[Record], copy: Iterable[dict[str, Any]], *,
                        pruned_through: int = 0) -> StreamComparison:
    out = StreamComparison()
    remote: dict[int, str] = {}
    for e in copy:
        seq, h = e.get("seq"), e.get("hash")
        if type(seq) is not int or not isinstance(h, str):
            out.problems.append(f"the stream copy holds an item without seq and hash: "
                                f"{json.dumps(e)[:120]}")
            continue
        if "prev_hash" in e and not e.get("truncated") and entry_hash(e["prev_hash"], e) != h:
            out.problems.append(f"seq {seq}: the stream copy's entry does not match its own "
                                "hash (altered at the receiver)")
        if seq in remote and remote[seq] != h:
            out.problems.append(f"seq {seq}: the stream copy holds two different hashes")
        remote[seq] = h
    last_local = 0
    lost: list[tuple[int, int]] = []
    for rec in local:
        if rec.entry is None or type(rec.entry.get("seq")) is not int:
            continue
        seq, h = rec.entry["seq"], rec.entry.get("hash")
        last_local = max(last_local, seq)
        r = lost_range(rec.entry)
        if r is not None:
            lost.append(r)
        want = remote.pop(seq, None)
        if want is None:
            continue
        out.compared += 1
        if want != h:
            out.problems.append(f"seq {seq}: local hash {str(h)[:16]}… but the stream copy has "
                                f"{want[:16]}…: the local log was rewritten after it was sent")
    for seq in sorted(remote):
        if seq <= pruned_through:
            continue
        if any(a <= seq <= b for a, b in lost):
            out.notes.append(f"seq {seq} is in the stream copy; locally it is a recorded loss")
            continue
        where = ("past the local end" if seq > last_local else "missing from the local chain")
        out.problems.append(f"seq {seq} is in the stream copy but {where} (local chain ends at "
                            f"seq {last_local}): entries were removed locally")
        if len(out.problems) > 50:
            out.problems.append("… (more left out)")
            break
    sent = out.compared
    if last_local and sent < last_local:
        out.notes.append(f"{last_local - sent} local entries are not in the stream copy (not "
                         "yet streamed, pruned, or the copy is partial)")
    return out

"""What a sink finds missing when it opens, as the ``recovery`` entries that record it.

Shared by every sink: the sink says what is known to have been written (its own last
append, the state store's head, the checkpoint: ``(source, seq, hash)``), what it holds
(its last seq and hash), and how to walk its entries newest first; this decides what
to record:

- a known seq past the sink's last: the seqs in between are lost (``lost_entries``,
  ``details.lost = [first, last]``); the recovery entry takes the seq after them, so
  the head, which only moves forward, can follow;
- a known seq the sink holds with another hash: the entries were ``rewritten``.

A loss an earlier recovery entry already records (another writer saw it first, or a
checkpoint a crash left inside the lost range) is not recorded again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .chain import Prepared, loss_entry, lost_range, prepare

__all__ = ["Known", "NewestFirst", "losses"]

Known = tuple[str, int, str]
# Entries newest first (None for an item that is not an entry).
NewestFirst = Callable[[], Iterable["dict[str, Any] | None"]]
Older = Callable[[int, str], bool]


def losses(known: list[Known], seq: int, hsh: str, newest_first: NewestFirst, *,
           older: Older | None = None) -> list[tuple[Prepared, int | None]]:
    """The recovery entries to append, each with the seq it must take (None: the next).

    ``older(seq, hash)`` answers for a seq before everything ``newest_first`` walks (a file
    sink's archive): does it hold that entry, or account for it?"""
    out: list[tuple[Prepared, int | None]] = []
    ahead = [k for k in known if k[1] > seq]
    if ahead:
        source, top, top_hash = max(ahead, key=lambda k: k[1])
        what = "the log is empty or missing" if seq == 0 else f"the log ends at seq {seq}"
        out.append((loss_entry(seq + 1, top, "lost_entries",
                               f"entries {seq + 1}..{top} lost: {what} but {source} is seq {top}",
                               {"known_from": source, "known_hash": top_hash,
                                "log_seq": seq, "log_hash": hsh}), top + 1))
    for source, kseq, khash in known:
        if 0 < kseq <= seq and not _still_there(newest_first, kseq, khash, seq, hsh, older):
            out.append((prepare("recovery", {
                "reason": f"the log does not match {source} at seq {kseq} (hash "
                          f"{khash[:16]}…): entries rewritten",
                "actor": "audit-log",
                "details": {"problem": "rewritten", "known_from": source, "known_seq": kseq,
                            "known_hash": khash, "log_seq": seq, "log_hash": hsh}}), None))
    return out


def _still_there(newest_first: NewestFirst, want: int, want_hash: str, seq: int,
                 hsh: str, older: Older | None) -> bool:
    """Does the sink hold entry ``want`` with ``want_hash``, or record its loss?"""
    if want == seq:
        return hsh == want_hash
    for entry in newest_first():
        if entry is None or entry["seq"] < want:
            return False
        if entry["seq"] == want:
            return bool(entry["hash"] == want_hash)
        lost = lost_range(entry)
        if lost is not None and lost[0] <= want <= lost[1]:
            return True
    return older is not None and older(want, want_hash)

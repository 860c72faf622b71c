"""Reading a JSONL audit file: forwards for verify, backwards for pages and the tail.

Nothing here writes. Memory is bounded by the longest line read (``MAX_LINE`` when
reading forwards); a line that is not an entry comes back as a :class:`Record` with
a ``problem`` and the start of its text, never hidden and never fatal to a reader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

from .protocol import Record, last_entries

__all__ = ["MAX_LINE", "MAX_SHOWN", "line_start", "parse_entry", "read_records",
           "read_records_from", "records_before", "records_before_in", "reverse_lines", "tail"]

Reader = Callable[[int, int], bytes]

_READ_BLOCK = 64 * 1024
# verify streams line by line; this caps the memory one line may take.
MAX_LINE = 64 << 20
# How much of a line that is not an entry is kept for people to read.
MAX_SHOWN = 4096


def reverse_lines(read: Reader, end: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, line without newline)`` for the lines in ``[0, end)``, last first.

    ``end`` must be 0 or just past a newline. Memory is bounded by the longest line.
    """
    pos = end
    buf = b""
    block = _READ_BLOCK
    while True:
        i = buf.rfind(b"\n", 0, len(buf) - 1)
        if i >= 0:
            yield pos + i + 1, buf[i + 1:-1]
            buf = buf[:i + 1]
            continue
        if pos == 0:
            if buf:
                yield 0, buf[:-1]
            return
        step = min(block, pos)
        pos -= step
        buf = read(pos, step) + buf
        block = min(block * 2, 1 << 24)  # few reads even for a huge line


def line_start(read: Reader, end: int) -> int:
    """Offset just past the last newline before ``end`` (0 if there is none)."""
    pos = end
    block = _READ_BLOCK
    while pos > 0:
        step = min(block, pos)
        pos -= step
        i = read(pos, step).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
        block = min(block * 2, 1 << 24)
    return 0


def parse_entry(raw: bytes) -> dict[str, Any] | None:
    """The entry a line holds, or None when it is not one (not JSON, no seq or hash)."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if (not isinstance(entry, dict) or type(entry.get("seq")) is not int
            or not isinstance(entry.get("hash"), str)):
        return None
    return entry


def shown(raw: bytes, length: int | None = None) -> str:
    """The start of a line that is not an entry, as text, saying how much was left out."""
    length = len(raw) if length is None else length
    text = raw[:MAX_SHOWN].decode("utf-8", "replace")
    if length > MAX_SHOWN:
        text += f"…[+{length - MAX_SHOWN} bytes]"
    return text


def _invalid(raw: bytes, offset: int, problem: str, length: int | None = None,
             source: str | None = None) -> Record:
    size = len(raw) if length is None else length
    return Record(offset, min(size, MAX_SHOWN), None, problem, shown(raw, size), source)


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Every line of the file as a record, oldest first. A missing file raises ``OSError``."""
    f = open(path, "rb")  # noqa: SIM115 - a generator: closed by the with below
    with f:
        yield from read_records_from(f)


def read_records_from(f: IO[bytes], *, base: int = 0, limit: int | None = None,
                      source: str | None = None) -> Iterator[Record]:
    """The lines of an open file from where it stands, oldest first; positions are ``base``
    plus the offset. With ``limit``, bytes from there on are not read (appended later)."""
    offset = 0
    while limit is None or offset < limit:
        want = MAX_LINE if limit is None else min(MAX_LINE, limit - offset)
        raw = f.readline(want)
        if not raw:
            return
        if not raw.endswith(b"\n"):
            problem = (f"line longer than {MAX_LINE >> 20} MiB" if len(raw) == MAX_LINE
                       else "torn line: no trailing newline (incomplete write)")
            yield _invalid(raw, base + offset, problem, source=source)
            return
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            yield _invalid(raw[:-1], base + offset, "not valid JSON", source=source)
        else:
            if isinstance(entry, dict):
                yield Record(base + offset, len(raw), entry, source=source)
            else:
                yield _invalid(raw[:-1], base + offset, "not a JSON object", source=source)
        offset += len(raw)


def records_before(path: str | os.PathLike[str], position: int | None = None
                   ) -> Iterator[Record]:
    """The records that start before byte ``position`` (the end when None), newest first.

    ``position`` must be a record's position (0, or just past a newline); a torn last line
    is the first record when reading from the end. A missing file yields nothing.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - a generator: closed by the with below
    except FileNotFoundError:
        return
    with f:
        yield from records_before_in(f, f.seek(0, os.SEEK_END), position)


def records_before_in(f: IO[bytes], size: int, position: int | None = None, *, base: int = 0,
                      source: str | None = None) -> Iterator[Record]:
    """:func:`records_before` on an open, seekable file of ``size`` bytes."""
    def read(offset: int, n: int) -> bytes:
        f.seek(offset)
        data: bytes = f.read(n)
        return data

    if position is None:
        end = size
        if size and read(size - 1, 1) != b"\n":
            end = line_start(read, size)
            yield _invalid(read(end, min(size - end, MAX_SHOWN)), base + end,
                           "torn line: no trailing newline (incomplete write)", size - end,
                           source)
    else:
        end = position
        if not 0 <= end <= size or (end and read(end - 1, 1) != b"\n"):
            raise ValueError(f"{position} is not the position of a record")
    for off, raw in reverse_lines(read, end):
        entry = parse_entry(raw)
        yield (Record(base + off, len(raw) + 1, entry, source=source) if entry is not None
               else _invalid(raw, base + off, "not an audit entry", source=source))


def tail(path: str | os.PathLike[str], n: int = 20) -> list[dict[str, Any]]:
    """The last ``n`` entries, oldest first, read from the end of the file.

    A line that is not an entry (torn, garbage) is returned as
    ``{"invalid_line": text, "offset": byte_offset}`` rather than hidden.
    """
    if n <= 0:
        return []
    if not os.path.exists(path):
        open(path, "rb").close()  # the caller wants the OSError of a missing log
    return last_entries(records_before(path), n)

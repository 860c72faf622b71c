"""The archive of rotated audit files, and reading one chain across it and the active file.

Layout (``audit.archive_dir``, by default ``archive/`` beside the log)::

    audit.jsonl                                   the active file (appends go here)
    archive/audit-000000000001-000000001000.jsonl a rotated file: seqs 1..1000
    archive/audit-000000001001-000000002000.jsonl.gz   … compressed once rotated
    archive/audit.pruned.json                     what retention deleted (see retention.py)

A file's name states the first and last seq it holds; the chain itself links the files
(the first entry of a file carries the last hash of the one before), so the names are
only an index: verify checks them against the contents. A file is never modified once
archived; compressing writes the ``.gz`` beside it (synced, then renamed into place)
before the plain file is removed, so a crash leaves one or both, never neither.

Reading takes a snapshot: under the lock that serialises appends, the archive is listed,
the active file opened and its size noted, so no line read was still being written (with
``fsync`` on, nothing read can be taken back by a crash: that is what lets a stream send
only durable entries) and a rotation cannot move entries out of sight mid-read. Archived
files are opened one at a time as the read reaches them (a long archive must not cost a
descriptor per file): they never change, a compressed one is found under its ``.gz``
name, and only retention deletes them, oldest first.

A record's position is ``(first_seq - 1) << 40 | byte offset`` in its file (uncompressed):
the same before and after a file is rotated or compressed, ordered across files, and the
plain byte offset in the first file, as before rotation existed.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .crashpoints import crash_point
from .lines import parse_entry, read_records_from, records_before_in, reverse_lines
from .locking import FlockLock, LockTimeout
from .protocol import Record
from .pruned import fsync_dir

__all__ = [
    "POSITION_BITS",
    "ArchiveFile",
    "Segment",
    "Snapshot",
    "archive_name",
    "archive_range",
    "compress",
    "first_and_last",
    "list_archives",
    "split_position",
]

POSITION_BITS = 40  # a file may hold up to 1 TiB
_OFFSET_MASK = (1 << POSITION_BITS) - 1
_NAME = re.compile(r"^(?P<stem>.+)-(?P<first>\d{12,})-(?P<last>\d{12,})\.jsonl(?P<gz>\.gz)?$")


@dataclass(frozen=True)
class ArchiveFile:
    first: int
    last: int
    path: Path
    compressed: bool

    @property
    def name(self) -> str:
        return self.path.name


def archive_name(stem: str, first: int, last: int, *, compressed: bool = False) -> str:
    return f"{stem}-{first:012d}-{last:012d}.jsonl" + (".gz" if compressed else "")


def list_archives(directory: Path, stem: str) -> list[ArchiveFile]:
    """The archived files of the log named ``stem``, oldest first (one per range: the plain
    file when a crash left it beside its compressed copy)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found: dict[tuple[int, int], ArchiveFile] = {}
    for name in names:
        m = _NAME.match(name)
        if m is None or m["stem"] != stem:
            continue
        af = ArchiveFile(int(m["first"]), int(m["last"]), directory / name, bool(m["gz"]))
        key = (af.first, af.last)
        if key not in found or found[key].compressed:
            found[key] = af
    return [found[k] for k in sorted(found)]


def archive_range(name: str) -> tuple[int, int] | None:
    """The ``(first, last)`` seqs an archived file's name states (None: not an archive)."""
    m = _NAME.match(name)
    return (int(m["first"]), int(m["last"])) if m else None


def split_position(position: int) -> tuple[int, int]:
    """``(first seq of the file, byte offset)`` a position names."""
    return (position >> POSITION_BITS) + 1, position & _OFFSET_MASK


def _base(first: int) -> int:
    return (max(first, 1) - 1) << POSITION_BITS


def open_archive(af: ArchiveFile) -> IO[bytes]:
    """An archived file's uncompressed bytes (a plain file removed by a compressor meanwhile
    is read from its ``.gz``)."""
    # gzip.open, not GzipFile(fileobj=...): closing the latter leaves the file open.
    if af.compressed:
        return gzip.open(af.path, "rb")  # type: ignore[return-value]
    try:
        return open(af.path, "rb")
    except FileNotFoundError:
        return gzip.open(af.path.with_name(af.name + ".gz"), "rb")  # type: ignore[return-value]


def first_and_last(af: ArchiveFile) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """An archived file's first and last entries (None where that line is not an entry);
    a compressed file is read through (archives are read so only on rare paths)."""
    with open_archive(af) as f:
        first = parse_entry(f.readline().rstrip(b"\n"))
        if isinstance(f, gzip.GzipFile):
            last_raw = b""
            for line in f:
                last_raw = line
            return first, parse_entry(last_raw.rstrip(b"\n")) if last_raw else first
        size = f.seek(0, os.SEEK_END)

        def read(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        end = size if size and read(size - 1, 1) == b"\n" else 0
        for _off, raw in reverse_lines(read, end):
            return first, parse_entry(raw)
        return first, None


@dataclass
class Segment:
    """One file of a snapshot: an archive, or the active file (``last`` None)."""

    first: int
    last: int | None
    source: str
    archive: ArchiveFile | None  # opened when reached
    file: IO[bytes] | None  # the active file; None: it does not exist (yet)
    size: int | None  # the active file's size when the snapshot was taken

    @property
    def compressed(self) -> bool:
        return self.archive is not None and self.archive.compressed

    @contextlib.contextmanager
    def opened(self) -> Iterator[IO[bytes] | None]:
        if self.archive is None:
            yield self.file
            return
        try:
            f = open_archive(self.archive)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                exc.errno, f"{self.archive.name} was deleted (by retention?) while the log was "
                "being read; read it again") from exc
        with f:
            yield f

    @property
    def base(self) -> int:
        return _base(self.first)


class Snapshot:
    """The archive and the active file as they stood at one moment (see the module doc)."""

    def __init__(self, active: Path, directory: Path, stem: str, lock_path: Path) -> None:
        self.segments: list[Segment] = []
        self.archives: list[ArchiveFile] = []
        lock = FlockLock(lock_path)
        locked = False
        try:
            try:
                lock.acquire()
                locked = True
            except (OSError, LockTimeout):
                pass  # a read-only copy, or a wedged writer: read what is there
            self.archives = list_archives(directory, stem)
            for af in self.archives:
                self.segments.append(Segment(af.first, af.last, af.name, af, None, None))
            try:
                f: IO[bytes] | None = open(active, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                if not self.archives:
                    raise  # no log at all: the caller wants the OSError of a missing log
                f = None  # rotated, and the next file not yet created
            size = f.seek(0, os.SEEK_END) if f is not None else 0
            if f is not None:
                f.seek(0)
            self.segments.append(Segment(self._active_first(f), None, active.name, None, f,
                                         size))
        except BaseException:
            self.close()
            raise
        finally:
            if locked:
                lock.release()
            lock.close()

    def _active_first(self, f: IO[bytes] | None) -> int:
        after = self.archives[-1].last + 1 if self.archives else 1
        if f is None:
            return after
        entry = parse_entry(f.readline().rstrip(b"\n"))
        f.seek(0)
        return entry["seq"] if entry is not None and entry["seq"] >= 1 else after

    def close(self) -> None:
        for seg in self.segments:
            if seg.file is not None:
                with contextlib.suppress(OSError):
                    seg.file.close()
        self.segments = []

    def records(self, start_position: int | None = None) -> Iterator[Record]:
        """Every record, oldest first (from ``start_position`` on, when given)."""
        want_first, want_offset = split_position(start_position or 0)
        for seg in self.segments:
            if start_position is not None and seg.first < want_first:
                continue
            with seg.opened() as f:
                if f is None:
                    continue
                offset = 0
                if start_position is not None and seg.first == want_first:
                    offset = want_offset
                f.seek(offset)  # a compressed file decompresses up to there
                limit = None if seg.size is None else seg.size - offset
                yield from read_records_from(f, base=seg.base + offset, limit=limit,
                                             source=seg.source)

    def records_before(self, position: int | None = None) -> Iterator[Record]:
        """Records before ``position`` (the end when None), newest first."""
        want_first, want_offset = split_position(position) if position is not None else (0, 0)
        if (position is not None and not any(s.first == want_first for s in self.segments)
                and not any(s.first < want_first for s in self.segments)):
            return  # before everything kept (pruned meanwhile): nothing older
        for seg in reversed(self.segments):
            if position is not None and seg.first > want_first:
                continue
            before = want_offset if position is not None and seg.first == want_first else None
            with seg.opened() as f:
                if f is None:
                    continue
                if isinstance(f, gzip.GzipFile):  # no reading backwards: unpack it first
                    with tempfile.TemporaryFile() as tmp:
                        _copy(f, tmp)
                        yield from records_before_in(tmp, tmp.tell(), before, base=seg.base,
                                                     source=seg.source)
                else:
                    size = seg.size if seg.size is not None else f.seek(0, os.SEEK_END)
                    yield from records_before_in(f, size, before, base=seg.base,
                                                 source=seg.source)


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def compress(directory: Path, stem: str) -> int:
    """gzip the archived files that are still plain; returns how many. Outside the append
    lock (an archived file never changes): the ``.gz`` is synced and renamed into place
    before the plain file goes, so a crash leaves one or both, and two compressors racing
    write the same bytes."""
    done = 0
    for af in list_archives(directory, stem):
        if af.compressed:
            continue
        gz = af.path.with_name(af.name + ".gz")
        if not gz.exists():
            try:
                _gzip(af.path, gz)
            except FileNotFoundError:
                continue  # another process compressed it meanwhile
            crash_point("compress:after_gz")
        with contextlib.suppress(FileNotFoundError):
            af.path.unlink()
        fsync_dir(directory)
        done += 1
    return done


def _gzip(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as raw:
            with gzip.GzipFile(filename=src.name, fileobj=raw, mode="wb", mtime=0) as gz:
                shutil.copyfileobj(fin, gz, 1 << 20)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

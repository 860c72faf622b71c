"""The JSONL file sink: one entry per line, appended whole, synced (DESIGN.md §6).

Appends are serialised across processes by a sibling ``<name>.lock`` file and
across threads by a lock; each batch of lines is written by one ``os.write`` on an
``O_APPEND`` descriptor, then synced, and only then is the head recorded in the
state store (and, every ``checkpoint_every`` entries, in the checkpoint file). The
last seq/hash and the file size are cached, so an append re-reads only the tail,
and only when another process grew the file.

Whenever the file is (re)opened, what it holds is compared with what is known to
have been written (the state store's head, the checkpoint, this process's own last
append):

- a torn last line (no newline: a write that never completed, so never synced and
  never in the head) is moved into a ``recovery`` entry with its text, and the log
  verifies;
- fewer entries than known (the tail cut, the file deleted) gives a ``recovery``
  entry recording exactly the lost seqs (``problem: lost_entries``), whose seq
  continues after them; verify fails until someone acknowledges it;
- the known seq present with another hash gives ``problem: rewritten``, likewise.

Any I/O failure raises :class:`~authority_sdk.errors.AuthorityUnavailable`, so
callers deny (fail closed).

With ``audit.rotate`` the active file is renamed into the archive folder (see
:mod:`.archive`) under the same lock, once it passes a size or an age; the next entry
starts a new file and links to the archived last hash, so the chain runs on across
files. Readers see the archive and the active file as one chain. When the active file
holds no entry (just rotated), the tail is taken from the newest archive, or from the
prune record when retention deleted them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AuthorityError, AuthorityUnavailable
from .archive import (
    ArchiveFile,
    Snapshot,
    archive_name,
    compress,
    first_and_last,
    list_archives,
    open_archive,
)
from .chain import GENESIS_HASH, Prepared, build, build_run, lost_range, prepare
from .checkpoint import Checkpoint, CheckpointFile
from .crashpoints import crash_point
from .lines import line_start, parse_entry, reverse_lines
from .locking import LOCK_TIMEOUT_S, FlockLock, LockTimeout
from .losses import Known, losses
from .protocol import AuditHead, Record, SinkSettings
from .pruned import PruneRecord, fsync_dir, prune_record_path, read_prune_record

if TYPE_CHECKING:
    from ..policy import AuditRotate, Policy

log = logging.getLogger("authority.audit")

__all__ = ["AuditLog", "FileSink", "open_for_policy"]

_MAX_TORN_TEXT = 4096
_TS = re.compile(rb'^\{"ts":"([^"]{1,64})"')


class FileSink(SinkSettings):
    """The append side of the log, and its reader. Safe across threads and processes.

    The file is opened lazily by the first :meth:`append` (or explicitly by
    :meth:`open`, to recover a torn line and record losses at start-up).
    ``redact`` names argument fields whose values never reach the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True,
                 head: AuditHead | None = None, redact: Iterable[str] = (),
                 key: bytes | None = None, checkpoints: CheckpointFile | None = None,
                 checkpoint_every: int = 1000, archive_dir: str | os.PathLike[str] | None = None,
                 rotate: AuditRotate | None = None) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.archive_dir = Path(archive_dir) if archive_dir else self.path.parent / "archive"
        self.stem = self.path.stem
        self.rotate_settings = rotate
        self._settings(fsync=fsync, head=head, redact=redact, key=key, checkpoints=checkpoints,
                       checkpoint_every=checkpoint_every)
        self._reset_process_state()

    @classmethod
    def for_policy(cls, policy: Policy, head: AuditHead | None = None) -> FileSink:
        from .registry import sink_options

        return cls(policy.audit_path, head=head, archive_dir=policy.audit_archive_path,
                   rotate=policy.audit.rotate, **sink_options(policy))

    @property
    def inline_when_alone(self) -> bool:
        """May a request alone in the proxy append on its event loop (``effects``)? Only
        when nothing of the append leaves this machine: the file, and a head kept in a
        local store (not in PostgreSQL, which the loop never waits on)."""
        head = self._head
        return head is None or bool(getattr(getattr(head, "aio", None), "inline_when_alone",
                                            False))

    def _reset_process_state(self) -> None:
        # Locks and descriptors do not survive fork() usefully; a child starts afresh.
        self._pid = os.getpid()
        self._tlock = threading.Lock()
        self._flock = FlockLock(self.lock_path)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._size = -1  # -1: unknown, re-read the tail
        self._seq = 0
        self._hash = GENESIS_HASH
        self._checkpointed = 0
        self._first_ts: float | None = None  # the active file's first entry, for rotate.every

    # -- writing --------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry and return it. Unknown keys go into ``details``."""
        return self.append_many([(event, fields)])[0]

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Write several entries at once: one lock, one write, one sync, one head update.

        The gateway records a request and the actions it only decided (nothing
        executed) together, so the hot path pays for one fsync instead of several.
        """
        prepared = [prepare(event, dict(fields), self._redact) for event, fields in items]
        if not prepared:
            return []
        with self._locked():
            entries = build_run(prepared, self._seq, self._hash, self.key)
            self._write(entries)
            if self.rotate_settings is not None:
                self._rotate_if_due()
        return entries

    def _write_locked(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """:meth:`append_many` for a caller already holding the locks (retention)."""
        prepared = [prepare(event, dict(fields), self._redact) for event, fields in items]
        entries = build_run(prepared, self._seq, self._hash, self.key)
        self._write(entries)
        return entries

    # -- rotation -------------------------------------------------------------------------

    def rotate(self, *, force: bool = False) -> ArchiveFile | None:
        """Archive the active file now when it is due (any time with ``force``, unless it
        holds no entry); returns the archived file."""
        with self._locked():
            return self._rotate() if force else self._rotate_if_due()

    def archives(self) -> list[ArchiveFile]:
        return list_archives(self.archive_dir, self.stem)

    @property
    def prune_record_path(self) -> Path:
        return prune_record_path(self.archive_dir, self.stem)

    def prune_record(self) -> PruneRecord | None:
        return read_prune_record(self.prune_record_path)

    def compress_archives(self) -> int:
        """gzip archived files that are still plain; returns how many (see
        :func:`.archive.compress`)."""
        return compress(self.archive_dir, self.stem)

    def _rotate_if_due(self) -> ArchiveFile | None:
        cfg = self.rotate_settings
        if cfg is None or self._size <= 0:
            return None
        due = cfg.max_bytes is not None and self._size >= cfg.max_bytes
        every = cfg.every_s
        if every is not None and self._first_ts is not None:
            due = due or time.time() - self._first_ts >= every
        if not due:
            return None
        try:
            return self._rotate()
        except AuthorityError as exc:
            # The entries are written and synced: a failed rotation must not fail the append.
            # The active file keeps growing, and the next append tries again.
            log.warning("audit log rotation failed: %s", exc.message)
            return None

    def _rotate(self) -> ArchiveFile | None:
        """Called under the locks, the tail synced. Rename, sync both folders, start anew."""
        fd = self._fd
        assert fd is not None
        if self._size <= 0:
            return None
        first = _first_entry(fd)
        if first is None:
            raise AuthorityUnavailable(f"audit log unavailable: cannot rotate {self.path}: its "
                                       "first line is not an entry; run `authority audit verify`")
        target = self.archive_dir / archive_name(self.stem, first["seq"], self._seq)
        try:
            if not self.archive_dir.exists():
                self.archive_dir.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.archive_dir.parent)
            if target.exists() or target.with_name(target.name + ".gz").exists():
                raise FileExistsError(f"{target} already exists")
            if not self.fsync:
                _datasync(fd)  # an archived file is final: nothing in it may be taken back
            crash_point("rotate:before_rename")
            os.rename(self.path, target)
            crash_point("rotate:after_rename")
            fsync_dir(self.archive_dir)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise self._unavailable("cannot rotate", exc) from exc
        # The new active file now, so readers find an (empty) file; the cached seq and hash
        # are the archive's last, which the next entry links to.
        seq, hsh = self._seq, self._hash
        self._open_fd()
        self._seq, self._hash, self._size, self._first_ts = seq, hsh, 0, None
        crash_point("rotate:after_create")
        log.info("audit log rotated: %s (seqs %d..%d)", target, first["seq"], seq)
        return ArchiveFile(first["seq"], seq, target, False)

    def open(self) -> FileSink:
        """Open the file now: recover a torn last line, record losses, create the file."""
        with self._locked():
            pass
        return self

    def close(self) -> None:
        if self.checkpoints is not None and self._fd is not None and self._pid == os.getpid():
            # At shutdown the checkpoint catches up with the log (under the lock, so two
            # processes closing together cannot move it backwards). A failure here leaves
            # the last periodic checkpoint, which is still true.
            with contextlib.suppress(AuthorityError), self._locked():
                if self._seq > self._checkpointed:
                    self._checkpoint_now()
        with self._tlock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
                self._flock.close()
            self._fd = None
            self._size = -1

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (never writes) -----------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists() or bool(self.archives())

    def records(self) -> Iterator[Record]:
        """Every record across the archive and the active file, oldest first."""
        return self.records_from(None)

    def records_from(self, position: int | None) -> Iterator[Record]:
        """Records from ``position`` (a record's position) on, oldest first."""
        snap = self._snapshot()
        try:
            yield from snap.records(position)
        finally:
            snap.close()

    def records_before(self, position: int | None = None) -> Iterator[Record]:
        try:
            snap = self._snapshot()
        except FileNotFoundError:
            return
        try:
            yield from snap.records_before(position)
        finally:
            snap.close()

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.path, self.archive_dir, self.stem, self.lock_path)

    # -- internals ------------------------------------------------------------------------

    def _locked(self) -> _Locked:
        if self._pid != os.getpid():
            self._reset_process_state()
        return _Locked(self)

    def _unavailable(self, what: str, exc: BaseException) -> AuthorityUnavailable:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return AuthorityUnavailable(f"audit log unavailable: {what} {self.path}: {detail}")

    def _open_fd(self) -> int:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        if not existed and self.fsync:
            _fsync_dir(self.path.parent)  # the new name itself must survive a crash
        st = os.fstat(fd)
        self._fd, self._ino, self._size = fd, (st.st_dev, st.st_ino), -1
        return fd

    def _sync(self) -> None:
        """Bring the cached (seq, hash, size) up to date with the file. Called under the locks."""
        fd = self._fd
        if fd is None:
            fd = self._open_fd()
        else:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != self._ino:
                fd = self._open_fd()  # replaced or removed under us: follow the path
        size = os.fstat(fd).st_size
        if size != self._size:
            self._load_tail(fd, size, reopened=self._size < 0)

    def _load_tail(self, fd: int, size: int, *, reopened: bool) -> None:
        def read(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        complete_end = size
        if size and read(size - 1, 1) != b"\n":
            complete_end = line_start(read, size)  # a torn fragment starts here
        good_end = complete_end
        last: dict[str, Any] | None = None
        for off, raw in reverse_lines(read, complete_end):
            last = parse_entry(raw)
            if last is not None:
                break
            # The last complete line is not an entry: move it aside with the fragment. Only
            # that one, though: a log ending in several such lines is not ours to rewrite.
            if good_end != complete_end:
                raise AuthorityUnavailable(
                    f"audit log unavailable: {self.path} is corrupt near byte {off} (its last "
                    "lines are not audit entries); run `authority audit verify`")
            good_end = off
        if last is not None:
            seq, hsh = last["seq"], last["hash"]
        else:
            seq, hsh = self._archived_tail()  # just rotated (or everything pruned)
        self._first_ts = _first_ts(read, good_end)

        # What is known to have been written: this process's own appends, the store's head,
        # the checkpoint. Read before anything changes, so a loss is measured against them.
        known: list[Known] = [("this process's last append", self._seq, self._hash)]
        stored = self._stored_head()
        if stored is not None:
            known.append(("the state store's head", *stored))
        # Only on (re)opening: between appends, another process growing the file is traffic.
        checkpoint = self._read_checkpoint() if reopened and self.checkpoints else None
        if checkpoint is not None and self.checkpoints is not None:
            known.append((f"the checkpoint {self.checkpoints.path}", checkpoint.seq,
                          checkpoint.hash))
            self._checkpointed = max(self._checkpointed, checkpoint.seq)

        def newest_first() -> Iterator[dict[str, Any] | None]:
            return (parse_entry(raw) for _off, raw in reverse_lines(read, good_end))

        lost = losses(known, seq, hsh, newest_first, older=self._archived_holds)
        torn: Prepared | None = None
        if good_end < size:
            length = size - good_end
            text = read(good_end, min(length, _MAX_TORN_TEXT)).decode("utf-8", "replace")
            # Read before truncating, so the window in which the bytes exist nowhere is tiny.
            torn = prepare("recovery", {
                "reason": f"torn last line moved aside ({length} bytes at offset {good_end})",
                "actor": "audit-log",
                "details": {"problem": "torn_line", "offset": good_end, "length": length,
                            "torn": text, "torn_truncated": length > _MAX_TORN_TEXT}})
            os.ftruncate(fd, good_end)
        self._seq, self._hash, self._size = seq, hsh, good_end
        # Losses first: a lost range must follow the last entry the log still holds.
        for p, skip_to in lost:
            self._write([build(p, self._seq, self._hash, self.key, seq=skip_to)])
        if torn is not None:
            self._write([build(torn, self._seq, self._hash, self.key)])

    def _archived_tail(self) -> tuple[int, str]:
        archives = self.archives()
        if archives:
            _first, last = first_and_last(archives[-1])
            if last is None:
                raise AuthorityUnavailable(
                    f"audit log unavailable: the last line of {archives[-1].path} is not an "
                    "entry; run `authority audit verify`")
            return last["seq"], last["hash"]
        pruned = self.prune_record()
        if pruned is not None:
            return pruned.seq, pruned.hash
        return 0, GENESIS_HASH

    def _archived_holds(self, want: int, want_hash: str) -> bool:
        """Is entry ``want`` (older than the active file) archived with ``want_hash``, or
        accounted for (inside a recorded loss, or pruned up to the prune record)?"""
        pruned = self.prune_record()
        if pruned is not None and want <= pruned.seq:
            return want < pruned.seq or pruned.hash == want_hash
        for af in self.archives():
            if not af.first <= want <= af.last:
                continue
            with open_archive(af) as f:
                for raw in f:
                    entry = parse_entry(raw.rstrip(b"\n"))
                    if entry is None or entry["seq"] < want:
                        continue
                    if entry["seq"] == want:
                        return bool(entry["hash"] == want_hash)
                    lost = lost_range(entry)
                    return lost is not None and lost[0] <= want <= lost[1]
        return False

    def _read_checkpoint(self) -> Checkpoint | None:
        assert self.checkpoints is not None
        return self.checkpoints.read_signed()

    def _stored_head(self) -> tuple[int, str] | None:
        if self._head is None:
            return None
        try:
            return self._head.get_audit_head()
        except AuthorityError:
            raise
        except Exception as exc:
            raise AuthorityUnavailable(f"audit head unreadable: {exc}") from exc

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Append built entries; the cached seq/hash move past them once they are written."""
        fd = self._fd
        assert fd is not None
        # values.bound left no lone surrogate: strict UTF-8, so every line is valid text.
        data = "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False)
                       + "\n" for e in entries).encode("utf-8")
        old_size = self._size
        try:
            written = os.write(fd, data)
        except OSError as exc:
            self._size = -1
            raise self._unavailable("cannot write", exc) from exc
        if written != len(data):
            # Disk full mid-line: take the fragment back so the next writer finds a clean end.
            # If even that fails, the next open moves the fragment into a recovery entry.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, old_size)
            self._size = -1
            raise AuthorityUnavailable(f"audit log unavailable: short write to {self.path}")
        if old_size == 0:
            self._first_ts = _parse_ts(entries[0]["ts"])
        self._size = old_size + written
        last = entries[-1]
        self._seq, self._hash = last["seq"], last["hash"]
        if self.fsync:
            try:
                _datasync(fd)
            except OSError as exc:
                raise self._unavailable("cannot sync", exc) from exc
        if self._head is not None:
            try:
                self._head.set_audit_head(last["seq"], last["hash"])
            except AuthorityError:
                raise
            except Exception as exc:
                raise AuthorityUnavailable(f"audit head not recorded: {exc}") from exc
        if (self.checkpoints is not None
                and last["seq"] // self.checkpoint_every > self._checkpointed
                // self.checkpoint_every):
            self._checkpoint_now()

    def _checkpoint_now(self) -> None:
        assert self.checkpoints is not None
        if self._fd is not None and not self.fsync:
            _datasync(self._fd)  # a checkpoint must never name an entry a crash can take back
        self.checkpoints.write(self._seq, self._hash)
        self._checkpointed = self._seq


AuditLog = FileSink  # the name the first version exported


def open_for_policy(policy: Policy, head: AuditHead | None) -> FileSink:
    return FileSink.for_policy(policy, head)


_fsync_dir = fsync_dir


def _first_entry(fd: int) -> dict[str, Any] | None:
    line = b""
    offset = 0
    while b"\n" not in line:
        chunk = os.pread(fd, 64 * 1024, offset)
        if not chunk:
            break
        line += chunk
        offset += len(chunk)
    return parse_entry(line.split(b"\n", 1)[0])


def _first_ts(read: Any, end: int) -> float | None:
    """The active file's first entry's time (for rotate.every), from its first bytes."""
    if end <= 0:
        return None
    m = _TS.match(read(0, min(end, 128)))
    return _parse_ts(m.group(1).decode("ascii", "replace")) if m else None


def _parse_ts(ts: str) -> float | None:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _datasync(fd: int) -> None:
    # fdatasync also flushes the size change an append makes, and skips mtime.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


class _Locked:
    """Holds the thread lock and the file lock, and syncs the cached tail on entry."""

    def __init__(self, log: FileSink) -> None:
        self.log = log

    def __enter__(self) -> None:
        log = self.log
        log._tlock.acquire()
        try:
            log._flock.acquire()
        except LockTimeout as exc:
            log._tlock.release()
            raise AuthorityUnavailable(f"audit log unavailable: lock {log.lock_path} "
                                       f"held for more than {LOCK_TIMEOUT_S:.0f}s") from exc
        except OSError as exc:
            log._tlock.release()
            raise log._unavailable("cannot lock", exc) from exc
        try:
            log._sync()
        except AuthorityError:
            self.__exit__()
            raise
        except OSError as exc:
            log._size = -1
            self.__exit__()
            raise log._unavailable("cannot open", exc) from exc
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.log._flock.release()
        finally:
            self.log._tlock.release()

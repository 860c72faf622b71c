"""Append-only, hash-chained audit log (DESIGN.md §6).

One JSON object per line. Each entry carries ``prev_hash`` (the previous
entry's ``hash``, ``"0" * 64`` for the first) and
``hash = sha256(prev_hash + canonical_json(entry without "hash"))``, so an
edit, deletion, insertion or reordering breaks the chain and :func:`verify`
names the first bad line. The chain's head (last seq and hash) is also kept in
the state store (:class:`AuditHead`), so cutting entries off the end is
detected too.

Appends are serialised across processes by a sibling ``<name>.lock`` file and
across threads by a lock; each line is written whole by one ``os.write`` on an
``O_APPEND`` descriptor, then synced. The last seq/hash and the file size are
cached, so an append re-reads only the tail, and only when another process
grew the file. A torn last line left by a crash is moved into a ``recovery``
entry when the log is next opened for appending, never silently dropped. Any
I/O failure raises :class:`~authority_sdk.errors.AuthorityUnavailable`, so
callers deny (fail closed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import AuthorityError, AuthorityUnavailable

if TYPE_CHECKING:
    from .policy import Policy

__all__ = [
    "DECISIONS",
    "EVENTS",
    "FIELDS",
    "GENESIS_HASH",
    "REDACTED",
    "AuditHead",
    "AuditLog",
    "VerifyResult",
    "canonical_json",
    "entry_hash",
    "redact",
    "tail",
    "verify",
]

FIELDS: tuple[str, ...] = (
    "ts", "seq", "event", "request_id", "environment", "model", "action_type", "decision",
    "reason", "cost_estimate_usd", "cost_actual_usd", "approval_status", "execution_result",
    "actor", "policy_hash", "prev_hash", "hash",
)
EVENTS = frozenset({"request", "action", "approval", "kill_switch", "replay", "recovery",
                    "notification"})
DECISIONS = frozenset({"allow", "deny", "error", None})
GENESIS_HASH = "0" * 64
REDACTED = "[REDACTED]"

_FIELD_SET = frozenset(FIELDS)
_ALLOWED_KEYS = _FIELD_SET | {"details"}
# Assigned by the log itself: a caller supplying them is a bug, not extra context.
_RESERVED = frozenset({"ts", "seq", "prev_hash", "hash"})
_MAX_TORN_TEXT = 4096
_LOCK_TIMEOUT_S = 30.0
# First poll interval for a contended lock: an append holds it for microseconds.
_LOCK_POLL_S = 0.0005
_READ_BLOCK = 64 * 1024
# verify streams line by line; this caps the memory one line may take.
_MAX_LINE = 64 << 20

Reader = Callable[[int, int], bytes]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def entry_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """The hash an entry must carry, given the previous entry's hash."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    # surrogatepass: a lone surrogate in a string must hash, not crash; json.loads(bytes)
    # decodes with the same handler, so verify sees the same bytes.
    data = (prev_hash + canonical_json(body)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    # Containers are round-tripped so the entry we hash is exactly what verify will
    # parse back (tuples become lists, int keys become strings, objects become str).
    if isinstance(value, dict | list | tuple):
        return json.loads(json.dumps(value, ensure_ascii=False, default=str))
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)


# --------------------------------------------------------------------------- redaction


def redact(obj: Any, names: Iterable[str]) -> Any:
    """A copy of ``obj`` with the value of every dict key named in ``names`` replaced.

    Keys match case-insensitively at any depth, inside lists and tuples too. A string
    holding a JSON object or array (tool-call ``arguments`` travel that way) is
    searched as well and re-encoded only when something in it was redacted.
    """
    wanted = frozenset(n.lower() for n in names)
    if not wanted:
        return obj
    return _redact(obj, wanted)


def _redact(obj: Any, wanted: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and k.lower() in wanted else _redact(v, wanted))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, wanted) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_redact(v, wanted) for v in obj)
    if isinstance(obj, str) and obj[:1] in ("{", "[") and any(w in obj.lower() for w in wanted):
        try:
            parsed = json.loads(obj)
        except ValueError:
            return obj
        cleaned = _redact(parsed, wanted)
        return obj if cleaned == parsed else json.dumps(cleaned, ensure_ascii=False)
    return obj


# --------------------------------------------------------------------------- reading


def _reverse_lines(read: Reader, end: int) -> Iterator[tuple[int, bytes]]:
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


def _line_start(read: Reader, end: int) -> int:
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


def _parse_entry(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if (not isinstance(entry, dict) or type(entry.get("seq")) is not int
            or not isinstance(entry.get("hash"), str)):
        return None
    return entry


def _file_reader(f: Any) -> Reader:
    def read(offset: int, n: int) -> bytes:
        f.seek(offset)
        data: bytes = f.read(n)
        return data
    return read


def tail(path: str | os.PathLike[str], n: int = 20) -> list[dict[str, Any]]:
    """The last ``n`` entries, oldest first, read from the end of the file.

    A line that is not an entry (torn, garbage) is returned as
    ``{"invalid_line": text, "offset": byte_offset}`` rather than hidden.
    """
    if n <= 0:
        return []
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        read = _file_reader(f)
        size = f.seek(0, os.SEEK_END)
        end = size
        if size and read(size - 1, 1) != b"\n":
            end = _line_start(read, size)
            out.append(_invalid(read(end, min(size - end, _MAX_TORN_TEXT)), end))
        for off, raw in _reverse_lines(read, end):
            if len(out) >= n:
                break
            entry = _parse_entry(raw)
            out.append(entry if entry is not None else _invalid(raw[:_MAX_TORN_TEXT], off))
    out.reverse()
    return out[-n:]


def _invalid(raw: bytes, offset: int) -> dict[str, Any]:
    return {"invalid_line": raw.decode("utf-8", "replace"), "offset": offset}


# --------------------------------------------------------------------------- verify


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


def verify(path: str | os.PathLike[str], head: tuple[int, str] | None = None) -> VerifyResult:
    """Check the whole chain, streaming; stop at the first bad line.

    With ``head`` (the seq and hash the state store recorded), the entry with that
    seq must exist and carry that hash, which catches entries cut off the end.
    Entries after the head are tolerated with a warning: a crash between writing a
    line and recording the head leaves exactly that, and the next append repairs it.
    """
    seq = 0
    prev_hash = GENESIS_HASH
    lineno = 0
    warnings: list[str] = []
    head_line: int | None = None
    head_hash_seen: str | None = None

    def fail(line: int | None, reason: str) -> VerifyResult:
        return VerifyResult(False, seq, line, reason, seq, prev_hash, tuple(warnings))

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below, after the error check
    except OSError as exc:
        return fail(None, f"cannot read {path}: {exc.strerror or exc}")
    with f:
        while raw := f.readline(_MAX_LINE):
            lineno += 1
            if not raw.endswith(b"\n"):
                if len(raw) == _MAX_LINE:
                    return fail(lineno, f"line longer than {_MAX_LINE >> 20} MiB")
                return fail(lineno, "torn line: no trailing newline (incomplete write)")
            try:
                entry = json.loads(raw)
            except ValueError:
                return fail(lineno, "not valid JSON")
            if not isinstance(entry, dict):
                return fail(lineno, "not a JSON object")
            problem = _shape_problem(entry)
            if problem:
                return fail(lineno, problem)
            if entry["hash"] != entry_hash(entry["prev_hash"], entry):
                return fail(lineno, f"hash mismatch at seq {entry['seq']}: the entry was altered")
            if entry["seq"] != seq + 1:
                if entry["seq"] > seq + 1:
                    return fail(lineno, f"seq gap: expected {seq + 1}, found {entry['seq']} "
                                        "(entries deleted)")
                return fail(lineno, f"seq out of order: expected {seq + 1}, found {entry['seq']} "
                                    "(entry inserted, duplicated or reordered)")
            if entry["prev_hash"] != prev_hash:
                return fail(lineno, f"prev_hash at seq {entry['seq']} does not match the previous "
                                    "entry's hash (entry inserted, deleted or reordered)")
            seq, prev_hash = entry["seq"], entry["hash"]
            if entry["event"] == "recovery":
                warnings.append(f"line {lineno}: recovery entry: {entry.get('reason')}")
            if head is not None and seq == head[0]:
                head_line, head_hash_seen = lineno, prev_hash
    if head is not None:
        hs, hh = head
        if hs > seq:
            return fail(lineno + 1, f"truncated: the log ends at seq {seq} but the state store's "
                                    f"head is seq {hs} (entries removed from the end)")
        if hs > 0 and head_hash_seen != hh:
            return fail(head_line, f"entry seq {hs} does not match the head recorded in the state "
                                   f"store (hash {hh[:16]}…): the log was rewritten")
        if hs < seq:
            warnings.append(f"{seq - hs} entries after the head recorded in the state store "
                            f"(seq {hs}); expected only after a crash")
    return VerifyResult(True, seq, None, None, seq, prev_hash, tuple(warnings))


def _shape_problem(entry: dict[str, Any]) -> str | None:
    keys = entry.keys()
    missing = _FIELD_SET - keys
    if missing:
        return "missing fields: " + ", ".join(sorted(missing))
    extra = keys - _ALLOWED_KEYS
    if extra:
        return "unknown fields: " + ", ".join(sorted(extra))
    if type(entry["seq"]) is not int:
        return "seq is not an integer"
    if not isinstance(entry["hash"], str) or not isinstance(entry["prev_hash"], str):
        return "hash or prev_hash is not a string"
    if entry["event"] not in EVENTS:
        return f"unknown event {entry['event']!r}"
    if "details" in entry and not isinstance(entry["details"], dict):
        return "details is not an object"
    return None


# --------------------------------------------------------------------------- appending


@runtime_checkable
class AuditHead(Protocol):
    """Where the chain's head is kept outside the log (the state store)."""

    def get_audit_head(self) -> tuple[int, str] | None: ...

    def set_audit_head(self, seq: int, hash: str) -> None: ...


class AuditLog:
    """The append side of the log. Safe across threads and processes.

    The file is opened lazily by the first :meth:`append` (or explicitly by
    :meth:`open`, to detect a torn line and a head mismatch at start-up).
    ``redact`` names argument fields whose values never reach the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True,
                 head: AuditHead | None = None, redact: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.fsync = fsync
        self._head = head
        self._redact = frozenset(redact)
        self._reset_process_state()

    @classmethod
    def for_policy(cls, policy: Policy, head: AuditHead | None = None) -> AuditLog:
        return cls(policy.audit_path, fsync=policy.audit.fsync, head=head, redact=policy.redact)

    def _reset_process_state(self) -> None:
        # Locks and descriptors do not survive fork() usefully; a child starts afresh.
        self._pid = os.getpid()
        self._tlock = threading.Lock()
        self._flock = _FlockLock(self.lock_path)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._size = -1  # -1: unknown, re-read the tail
        self._seq = 0
        self._hash = GENESIS_HASH

    # -- public ---------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry and return it. Unknown keys go into ``details``."""
        return self.append_many([(event, fields)])[0]

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Write several entries at once: one lock, one write, one sync, one head update.

        The gateway records a request and the actions it only decided (nothing
        executed) together, so the hot path pays for one fsync instead of several.
        """
        prepared = [self._prepare(event, dict(fields)) for event, fields in items]
        if not prepared:
            return []
        with self._locked():
            entries = []
            for event, fields, details in prepared:
                entry = self._build(event, fields, details)
                entries.append(entry)
                self._seq, self._hash = entry["seq"], entry["hash"]
            self._write(entries)
        return entries

    def _prepare(self, event: str,
                 fields: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        reserved = _RESERVED & fields.keys()
        if reserved:
            raise ValueError(f"assigned by the audit log, not the caller: {sorted(reserved)}")
        if fields.get("decision") not in DECISIONS:
            raise ValueError(f"decision must be allow, deny, error or None, "
                             f"not {fields['decision']!r}")
        details = fields.pop("details", None)
        if details is not None and not isinstance(details, dict):
            raise TypeError("details must be a dict")
        details = dict(details or {})
        for key in [k for k in fields if k not in _FIELD_SET]:
            if key in details:
                raise ValueError(f"{key!r} given both as a field and inside details")
            details[key] = fields.pop(key)
        if self._redact:
            fields = redact(fields, self._redact)
            details = redact(details, self._redact)
        return event, fields, details

    def open(self) -> AuditLog:
        """Open the file now: recover a torn last line, check the head, create the file."""
        with self._locked():
            pass
        return self

    def close(self) -> None:
        with self._tlock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
                self._flock.close()
            self._fd = None
            self._size = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            self._load_tail(fd, size)

    def _load_tail(self, fd: int, size: int) -> None:
        def read(offset: int, n: int) -> bytes:
            return os.pread(fd, n, offset)

        complete_end = size
        if size and read(size - 1, 1) != b"\n":
            complete_end = _line_start(read, size)  # a torn fragment starts here
        good_end = complete_end
        last: dict[str, Any] | None = None
        for off, raw in _reverse_lines(read, complete_end):
            last = _parse_entry(raw)
            if last is not None:
                break
            # The last complete line is not an entry: move it aside with the fragment. Only
            # that one, though: a log ending in several such lines is not ours to rewrite.
            if good_end != complete_end:
                raise AuthorityUnavailable(
                    f"audit log unavailable: {self.path} is corrupt near byte {off} (its last "
                    "lines are not audit entries); run `authority audit verify`")
            good_end = off
        seq, hsh = (last["seq"], last["hash"]) if last is not None else (0, GENESIS_HASH)

        stored = self._stored_head()
        mismatch = stored is not None and not _head_matches(read, good_end, seq, hsh, stored)

        self._seq, self._hash, self._size = seq, hsh, size
        if good_end < size:
            length = size - good_end
            text = read(good_end, min(length, _MAX_TORN_TEXT)).decode("utf-8", "replace")
            recovery = self._build("recovery", {
                "reason": f"torn last line moved aside ({length} bytes at offset {good_end})",
                "actor": "audit-log",
            }, {"problem": "torn_line", "offset": good_end, "length": length, "torn": text,
                "torn_truncated": length > _MAX_TORN_TEXT})
            # Built before truncating so the window in which the bytes exist nowhere is tiny.
            os.ftruncate(fd, good_end)
            self._size = good_end
            self._commit(recovery)
        if mismatch and stored is not None:
            hs, hh = stored
            self._commit(self._build("recovery", {
                "reason": f"log does not match the head in the state store: store has seq {hs}, "
                          f"log ends at seq {seq} (entries removed or rewritten)",
                "actor": "audit-log",
            }, {"problem": "head_mismatch", "store_seq": hs, "store_hash": hh,
                "log_seq": seq, "log_hash": hsh}))

    def _stored_head(self) -> tuple[int, str] | None:
        if self._head is None:
            return None
        try:
            return self._head.get_audit_head()
        except AuthorityError:
            raise
        except Exception as exc:
            raise AuthorityUnavailable(f"audit head unreadable: {exc}") from exc

    def _build(self, event: str, fields: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = {"ts": _now(), "seq": self._seq + 1, "event": event}
        for key in FIELDS[3:-2]:
            entry[key] = _jsonable(fields.get(key))
        if details:
            entry["details"] = _jsonable(details)
        entry["prev_hash"] = self._hash
        entry["hash"] = entry_hash(self._hash, entry)
        return entry

    def _commit(self, entry: dict[str, Any]) -> None:
        self._seq, self._hash = entry["seq"], entry["hash"]
        self._write([entry])

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Append built entries (``_seq``/``_hash`` already advanced past them)."""
        fd = self._fd
        assert fd is not None
        data = "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False, default=str)
                       + "\n" for e in entries).encode("utf-8", "surrogatepass")
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
        self._size = old_size + written
        last = entries[-1]
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


def _head_matches(read: Reader, end: int, seq: int, hsh: str, stored: tuple[int, str]) -> bool:
    """Does the log up to ``end`` (ending at ``seq``/``hsh``) contain the stored head?"""
    hs, hh = stored
    if hs == seq:
        return hh == hsh
    if hs > seq:
        return False
    if hs <= 0:
        return True
    # The log is ahead of the store: a crash between write and set_audit_head leaves one
    # entry past it. Walk back to the stored seq; that entry must still carry its hash.
    for _off, raw in _reverse_lines(read, end):
        entry = _parse_entry(raw)
        if entry is None or entry["seq"] < hs:
            return False
        if entry["seq"] == hs:
            return bool(entry["hash"] == hh)
    return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere; the file's own sync still holds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _datasync(fd: int) -> None:
    # fdatasync also flushes the size change an append makes, and skips mtime.
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)


class _LockTimeout(Exception):
    pass


class _FlockLock:
    """``flock`` on a sibling lock file, kept open for the process's life.

    The same lock filelock's UnixFileLock takes (so tools using it interoperate),
    without its per-acquire open/close and bookkeeping, which cost more than the
    append itself. Uncontended it is one system call; contended it polls briefly,
    since a holder keeps it for microseconds.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        delay = _LOCK_POLL_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _LockTimeout from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also drops the lock, were it held
            self._fd = None


class _Locked:
    """Holds the thread lock and the file lock, and syncs the cached tail on entry."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def __enter__(self) -> None:
        log = self.log
        log._tlock.acquire()
        try:
            log._flock.acquire()
        except _LockTimeout as exc:
            log._tlock.release()
            raise AuthorityUnavailable(f"audit log unavailable: lock {log.lock_path} "
                                       f"held for more than {_LOCK_TIMEOUT_S:.0f}s") from exc
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

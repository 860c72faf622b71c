"""Streaming every audit entry to outside sinks (syslog, HTTP), from a durable cursor.

An entry is sent only once it is durable locally: the stream reads the log through the
same snapshot as verify (taken under the append lock, so every line read was written and
synced before the lock was let go), never from the append path. A failing receiver
therefore never blocks or fails an append: it only lags.

Each target keeps a cursor file (``<log folder>/<stem>.stream/<name>.json``): the seq,
hash and position of the last entry the receiver acknowledged, plus the failure count,
the last error and when to try again (exponential backoff, capped). The cursor moves
only after a batch is acknowledged (HTTP 2xx, written to the TCP socket), so a crash or
restart resends at most the last batch: delivery is at least once, and every message
carries the entry's seq and hash for the receiver to drop duplicates. UDP syslog cannot
tell a delivered datagram from a lost one; use TCP or HTTP where every entry must arrive.

The receiver's copy is an outside checkpoint: ``authority audit verify --against-stream``
compares it with the local chain (see :mod:`.stream_check`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AuthorityUnavailable
from .crashpoints import crash_point
from .pruned import fsync_dir

if TYPE_CHECKING:
    from ..policy import HttpStream, SyslogStream
    from .protocol import AuditSink

__all__ = ["MAX_BACKOFF_S", "StreamCursor", "StreamState", "cursor_dir", "stream_round",
           "syslog_message"]

MAX_BACKOFF_S = 60.0
_FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "authpriv": 10, "local0": 16,
               "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
               "local6": 22, "local7": 23}
_UDP_MAX = 65000  # a datagram larger than this is not sent whole (see syslog_message)


@dataclass
class StreamState:
    seq: int = 0
    hash: str = ""
    position: int | None = None
    sent_total: int = 0
    failures: int = 0
    last_error: str | None = None
    last_success_ts: float | None = None
    next_attempt_ts: float = 0.0
    # The local entry at the cursor no longer has the hash that was sent: the log was
    # rewritten after streaming (an alarm for people; the stream goes on).
    divergence: str | None = None


class StreamCursor:
    """One target's position, in a small file replaced atomically after every batch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> StreamState:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return StreamState()
        except (OSError, ValueError) as exc:
            # A cursor that cannot be read must not restart the stream from seq 0 silently
            # (a flood of duplicates) nor skip ahead (a loss): stop and say so.
            raise AuthorityUnavailable(f"audit stream cursor unreadable: {self.path}: {exc}"
                                       ) from exc
        known = StreamState.__dataclass_fields__
        return StreamState(**{k: v for k, v in data.items() if k in known})

    def write(self, state: StreamState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, json.dumps(asdict(state)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def cursor_dir(log_path: Path) -> Path:
    return log_path.parent / f"{log_path.stem}.stream"


# -- the wire -------------------------------------------------------------------------------


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(entry: dict[str, Any], *, facility: str, app_name: str, hostname: str,
                   limit: int | None = None) -> bytes:
    """One RFC 5424 message: the entry's seq and hash as structured data (for dedupe), the
    entry itself as JSON in the message. Past ``limit`` bytes (a UDP datagram), the message
    carries the seq and hash without the entry (the copy can still be compared)."""
    severity = 4 if entry.get("event") == "recovery" else 6
    pri = _FACILITIES[facility] * 8 + severity
    sd = (f'[authority@32473 seq="{entry["seq"]}" hash="{_sd_escape(str(entry["hash"]))}" '
          f'event="{_sd_escape(str(entry.get("event")))}"]')
    head = (f"<{pri}>1 {entry.get('ts') or '-'} {hostname or '-'} {app_name} "
            f"{os.getpid()} {entry.get('event') or '-'} {sd} ")
    body = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
    msg = (head + body).encode("utf-8")
    if limit is not None and len(msg) > limit:
        stub = {"seq": entry["seq"], "hash": entry["hash"], "truncated": True}
        msg = (head + json.dumps(stub, separators=(",", ":"))).encode("utf-8")
    return msg


class _Syslog:
    def __init__(self, target: SyslogStream) -> None:
        self.target = target
        self.hostname = socket.gethostname()[:255]
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        t = self.target
        kind = socket.SOCK_DGRAM if t.protocol == "udp" else socket.SOCK_STREAM
        where: Any
        if t.address.startswith("/"):
            where = t.address
            sock = socket.socket(socket.AF_UNIX, kind)
        else:
            host, _, port = t.address.rpartition(":")
            info = socket.getaddrinfo(host.strip("[]") or "127.0.0.1", int(port), type=kind)[0]
            where = info[4]
            sock = socket.socket(info[0], kind)
        try:
            sock.settimeout(t.timeout_s)
            sock.connect(where)
        except BaseException:
            sock.close()  # a receiver that is down must not cost a descriptor per attempt
            raise
        return sock

    def send(self, entries: list[dict[str, Any]]) -> None:
        if self._sock is None:
            self._sock = self._connect()
        t = self.target
        limit = _UDP_MAX if t.protocol == "udp" else None
        msgs = [syslog_message(e, facility=t.facility, app_name=t.app_name,
                               hostname=self.hostname, limit=limit) for e in entries]
        if t.protocol == "udp":
            for m in msgs:
                self._sock.send(m)
        else:  # RFC 6587 octet counting: a message may hold newlines
            self._sock.sendall(b"".join(str(len(m)).encode() + b" " + m for m in msgs))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class _Http:
    def __init__(self, target: HttpStream) -> None:
        import httpx

        self.target = target
        headers = dict(target.headers)
        for name, var in target.headers_env.items():
            value = os.environ.get(var)
            if not value:
                raise AuthorityUnavailable(f"audit stream {target.url}: header {name} names "
                                           f"${var}, which is not set")
            headers[name] = value
        self._client = httpx.Client(timeout=target.timeout_s, headers=headers)

    def send(self, entries: list[dict[str, Any]]) -> None:
        body = json.dumps({"entries": entries}, separators=(",", ":"), ensure_ascii=False)
        resp = self._client.post(self.target.url, content=body.encode("utf-8"),
                                 headers={"content-type": "application/json"})
        if not 200 <= resp.status_code < 300:
            # Not the URL: it may carry a token in its query, and this text is shown.
            raise OSError(f"HTTP {resp.status_code} from the receiver")

    def close(self) -> None:
        self._client.close()


# -- one round ------------------------------------------------------------------------------


def _batch_size(target: SyslogStream | HttpStream) -> int:
    return getattr(target, "batch", 100)


def stream_round(sink: AuditSink, target: SyslogStream | HttpStream, cursor: StreamCursor, *,
                 budget_s: float = 5.0, now: float | None = None) -> StreamState:
    """Send what the target has not acknowledged yet, batch by batch, for up to ``budget_s``;
    on failure, back off (the state says until when and why). Never raises for the
    receiver's failure; raises ``AuthorityUnavailable`` for an unreadable cursor."""
    state = cursor.read()
    now = time.time() if now is None else now
    if now < state.next_attempt_ts:
        return state
    deadline = time.monotonic() + budget_s
    conn: _Syslog | _Http | None = None
    batch: list[tuple[dict[str, Any], int]] = []
    size = _batch_size(target)

    def flush() -> None:
        nonlocal conn
        if conn is None:
            conn = _Syslog(target) if target.kind == "syslog" else _Http(target)
        conn.send([e for e, _ in batch])
        crash_point("stream:after_send")  # sent, cursor not moved: resent after a restart
        last, position = batch[-1]
        state.seq, state.hash, state.position = last["seq"], last["hash"], position
        state.sent_total += len(batch)
        state.failures, state.last_error = 0, None
        state.last_success_ts = time.time()
        cursor.write(state)  # only after the receiver took the batch: at least once
        batch.clear()

    try:
        for rec in _records_after(sink, state):
            if rec.entry is None or type(rec.entry.get("seq")) is not int:
                continue  # not an entry: verify reports it; the stream cannot send it
            if rec.entry["seq"] <= state.seq:
                if (rec.entry["seq"] == state.seq and state.hash
                        and rec.entry.get("hash") != state.hash):
                    state.divergence = (f"local entry seq {state.seq} has hash "
                                        f"{str(rec.entry.get('hash'))[:16]}… but "
                                        f"{state.hash[:16]}… was sent: the log was rewritten")
                continue
            batch.append((rec.entry, rec.position))
            if len(batch) >= size:
                flush()
                if time.monotonic() > deadline:
                    break
        if batch:
            flush()
    except (OSError, ValueError, AuthorityUnavailable) as exc:
        state.failures += 1
        state.last_error = str(exc)[:500] or type(exc).__name__
        state.next_attempt_ts = time.time() + min(MAX_BACKOFF_S, 0.5 * 2 ** state.failures)
        cursor.write(state)
    except Exception as exc:  # httpx's own errors (connect, timeout) and the like
        state.failures += 1
        state.last_error = f"{type(exc).__name__}: {exc}"[:500]
        state.next_attempt_ts = time.time() + min(MAX_BACKOFF_S, 0.5 * 2 ** state.failures)
        cursor.write(state)
    finally:
        if conn is not None:
            conn.close()
    return state


def _records_after(sink: AuditSink, state: StreamState) -> Any:
    """The records after the cursor: from its position when the sink can seek (a file sink
    reads only what follows), else the whole chain, skipped up to its seq."""
    records_from = getattr(sink, "records_from", None)
    if records_from is not None and state.position is not None:
        it = records_from(state.position)
        first = next(it, None)
        if (first is not None and first.entry is not None
                and first.entry.get("seq") == state.seq and first.entry.get("hash") == state.hash):
            return it  # exactly where it left off
        return sink.records()  # the position moved (pruned, rewritten): walk by seq
    return sink.records()

"""The prune record: where the chain kept on disk begins after retention deleted its start.

``<archive_dir>/<stem>.pruned.json`` holds ``{"seq": N, "hash": H, "ts", "files", "mac"}``:
entries up to seq N were deleted on purpose, and entry N's hash was H, so the oldest kept
file's first entry must carry ``prev_hash`` H. With the audit key the record is signed
(``mac``), so deleting the oldest file and writing a record to excuse it needs the key;
verify refuses an unsigned or badly signed record when a key is configured. Retention
also appends a ``retention`` entry to the chain naming the same N and H, which verify
requires: a record the chain does not confirm is not trusted.

Without the record, a chain that starts after seq 1 fails verification as a missing file.
The file is replaced atomically and only ever moves forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AuthorityUnavailable

__all__ = ["PruneRecord", "prune_record_path", "read_prune_record", "write_prune_record"]


@dataclass(frozen=True)
class PruneRecord:
    seq: int
    hash: str
    ts: str
    files: tuple[str, ...]
    mac: str | None
    # Read from the chain's own retention entry (the PostgreSQL table), not a file: the
    # entry's MAC, checked as verify walks the chain, stands for a signature.
    in_chain: bool = False

    def signed_by(self, key: bytes) -> bool:
        return self.mac is not None and hmac.compare_digest(
            self.mac, _mac(key, self.seq, self.hash, self.ts))


def prune_record_path(archive_dir: Path, stem: str) -> Path:
    return archive_dir / f"{stem}.pruned.json"


def _mac(key: bytes, seq: int, hash_: str, ts: str) -> str:
    msg = json.dumps({"seq": seq, "hash": hash_, "ts": ts}, sort_keys=True,
                     separators=(",", ":"))
    return hmac.new(key, b"pruned:" + msg.encode(), hashlib.sha256).hexdigest()


def read_prune_record(path: Path) -> PruneRecord | None:
    """The record, None when nothing was ever pruned; unreadable or malformed raises."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthorityUnavailable(f"audit prune record unreadable: {path}: "
                                   f"{exc.strerror or exc}") from exc
    try:
        data: Any = json.loads(raw)
        rec = PruneRecord(data["seq"], data["hash"], data["ts"], tuple(data["files"]),
                          data.get("mac"))
    except (ValueError, KeyError, TypeError) as exc:
        raise AuthorityUnavailable(f"audit prune record malformed: {path}") from exc
    if (type(rec.seq) is not int or rec.seq < 1 or not isinstance(rec.hash, str)
            or not isinstance(rec.ts, str) or not (rec.mac is None or isinstance(rec.mac, str))
            or not all(isinstance(f, str) for f in rec.files)):
        raise AuthorityUnavailable(f"audit prune record malformed: {path}")
    return rec


def write_prune_record(path: Path, seq: int, hash_: str, ts: str, files: list[str],
                       key: bytes | None) -> PruneRecord:
    """Write (atomically: temporary file, sync, rename, sync the folder) and return it."""
    rec = PruneRecord(seq, hash_, ts, tuple(files),
                      _mac(key, seq, hash_, ts) if key is not None else None)
    data = json.dumps({"seq": seq, "hash": hash_, "ts": ts, "files": files,
                       **({"mac": rec.mac} if rec.mac else {})}) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise AuthorityUnavailable(f"audit prune record not written: {path}: "
                                   f"{exc.strerror or exc}") from exc
    return rec


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere; the files' own syncs still hold
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

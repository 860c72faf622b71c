"""Signed checkpoints: the chain's seq and hash, kept where the log's deleter cannot reach.

The state store's head catches entries cut off the end, but not the log and the
state folder deleted together. A checkpoint file in another directory (the policy's
``audit.checkpoint_path``) records the head every ``audit.checkpoint_every`` entries
and at shutdown, signed with the audit key. Verification requires the log to
contain the checkpoint's seq with its hash, or a ``recovery`` entry accounting for it;
a missing log next to a checkpoint fails.

What it proves: the log held at least ``seq`` entries ending in ``hash`` when the
checkpoint was written. What it does not: entries after the last checkpoint (the
state store's head covers those while it survives), or anything once the checkpoint
file itself is deleted (then the chain is only as good as the log and the store).

The file is replaced atomically (write, fsync, rename, fsync the folder) and only ever
moves forward: a writer never replaces a checkpoint with a lower seq.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import AuthorityUnavailable

__all__ = ["Checkpoint", "CheckpointFile"]


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    ts: str
    mac: str

    def signed_by(self, key: bytes) -> bool:
        return hmac.compare_digest(self.mac, _mac(key, self.seq, self.hash, self.ts))


def _mac(key: bytes, seq: int, hash_: str, ts: str) -> str:
    msg = json.dumps({"seq": seq, "hash": hash_, "ts": ts}, sort_keys=True,
                     separators=(",", ":"))
    return hmac.new(key, b"checkpoint:" + msg.encode(), hashlib.sha256).hexdigest()


class CheckpointFile:
    def __init__(self, path: str | os.PathLike[str], key: bytes) -> None:
        self.path = Path(path)
        self._key = key

    def read(self) -> Checkpoint | None:
        """The checkpoint, None when there is none yet; unreadable or malformed raises."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthorityUnavailable(f"audit checkpoint unreadable: {self.path}: "
                                       f"{exc.strerror or exc}") from exc
        try:
            data: Any = json.loads(raw)
            cp = Checkpoint(seq=data["seq"], hash=data["hash"], ts=data["ts"], mac=data["mac"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthorityUnavailable(f"audit checkpoint malformed: {self.path}") from exc
        if type(cp.seq) is not int or not all(isinstance(x, str) for x in (cp.hash, cp.ts,
                                                                             cp.mac)):
            raise AuthorityUnavailable(f"audit checkpoint malformed: {self.path}")
        return cp

    def read_signed(self) -> Checkpoint | None:
        """:meth:`read`, refusing a checkpoint the key did not sign."""
        cp = self.read()
        if cp is not None and not cp.signed_by(self._key):
            raise AuthorityUnavailable(f"audit checkpoint {self.path} is not signed by the audit "
                                       "key (forged, or written with another key)")
        return cp

    def write(self, seq: int, hash_: str) -> bool:
        """Record ``(seq, hash_)`` unless the file already holds a later seq."""
        current = self.read()
        if current is not None and current.seq >= seq:
            return False
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        data = json.dumps({"seq": seq, "hash": hash_, "ts": ts,
                           "mac": _mac(self._key, seq, hash_, ts)}) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.write(fd, data.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise AuthorityUnavailable(f"audit checkpoint not written: {self.path}: "
                                       f"{exc.strerror or exc}") from exc
        return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

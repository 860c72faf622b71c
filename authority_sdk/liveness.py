"""Who holds a claim, and whether it is still alive (a rule above every backend).

A claim (an idempotency record in flight, a ``started`` journal entry) records
its owner: the host, the process id and that process's start time, and, for a
replica of a shared backend, the replica's name. An owner on this host is alive
while its process is (the start time tells it from a later process that reused
the pid); an owner on another host is alive while its replica's heartbeat lease
in the store runs, or, with no replica named, until the claim's own lease ends.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .effects import Decision, S, run_on_store

__all__ = ["HOST", "local_owner_state", "owner_alive", "owner_alive_d", "process_owner",
           "replica_lease_name", "set_replica"]

HOST = socket.gethostname()


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data.rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


_SELF: dict[str, Any] = {"host": HOST, "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}
_REPLICA: dict[str, str | None] = {"name": None}


def set_replica(name: str | None) -> None:
    """Name this process's replica (a proxy on a shared backend heartbeats under it)."""
    _REPLICA["name"] = name


def process_owner() -> dict[str, Any]:
    """This process, as recorded on claims."""
    pid = os.getpid()
    if _SELF["pid"] != pid:  # forked since import
        _SELF.update(pid=pid, pid_start=_proc_start(pid))
    owner = dict(_SELF)
    if _REPLICA["name"]:
        owner["replica"] = _REPLICA["name"]
    return owner


def replica_lease_name(replica: str) -> str:
    return f"replica:{replica}"


def local_owner_state(owner: Any) -> bool | None:
    """``True``/``False`` when the owner's liveness can be told on this host without
    the store (its process runs here), ``None`` when only a lease can tell."""
    if not isinstance(owner, dict):
        return False
    if owner.get("host") != HOST:
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = owner.get("pid_start")
    return start is None or _proc_start(pid) == start


def owner_alive_d(owner: Any) -> Decision[bool]:
    """Is the holder of a claim alive? Local process check first; else its replica's
    heartbeat lease; else assume alive (the claim's own lease then decides)."""
    local = local_owner_state(owner)
    if local is not None:
        return local
    replica = owner.get("replica") if isinstance(owner, dict) else None
    if isinstance(replica, str) and replica:
        return (yield S.lease_get(replica_lease_name(replica))) is not None
    return True


def owner_alive(store: Any, owner: Any) -> bool:
    return run_on_store(owner_alive_d(owner), store)

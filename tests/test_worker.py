"""The background worker's lease: one leader at a time, taken over at once from a
process on this host that died, never from one that lives."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from authority_sdk.engine import Engine
from authority_sdk.worker import LEASE_NAME, Worker


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_holders_lease_is_taken_at_once(write_policy: Callable[..., Path]) -> None:
    eng = Engine(write_policy())
    try:
        from authority_sdk.liveness import HOST

        dead = f"{HOST}/{_dead_pid()}/1/abcd"
        assert eng.store.lease_acquire(LEASE_NAME, dead, ttl_s=600)
        report = Worker(eng).tick()
        assert report["leader"] is True
        assert eng.store.lease_get(LEASE_NAME)["holder"] != dead
    finally:
        eng.close()


def test_a_live_holders_lease_is_respected(write_policy: Callable[..., Path]) -> None:
    eng = Engine(write_policy())
    try:
        first, second = Worker(eng), Worker(eng)
        assert first.tick()["leader"] is True
        assert second.tick()["leader"] is False  # the first's process (this one) lives
        # A holder named some other way (another host, an older format) waits for expiry.
        eng.store.lease_release(LEASE_NAME, first.holder)
        assert eng.store.lease_acquire(LEASE_NAME, "elsewhere/1/1/x", ttl_s=600)
        assert second.tick()["leader"] is False
    finally:
        eng.close()

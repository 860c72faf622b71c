"""diskcache-specific behaviour of the default backend: its folder, and failing closed.

The behaviour every backend shares is in ``test_contract.py``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.policy import Policy, StateConfig
from authority_sdk.store import DiskStore, Store, open_store

DAY = 86400.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[DiskStore]:
    s = DiskStore(state_dir)
    yield s
    s.close()


def test_open_store_creates_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state"
    policy = Policy(state=StateConfig(path=str(path)))
    s = open_store(policy)
    assert isinstance(s, Store)
    assert path.is_dir()
    s.health()
    s.close()


# -- fail closed ------------------------------------------------------------------------------

def test_path_under_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(AuthorityUnavailable) as info:
        DiskStore(blocker / "state")
    assert info.value.status_code == 503
    assert str(blocker) not in info.value.message  # no server paths in a 503 body
    with pytest.raises(AuthorityUnavailable):
        open_store(Policy(state=StateConfig(path=str(blocker / "state"))))


def test_corrupted_database_is_unavailable(state_dir: Path) -> None:
    DiskStore(state_dir).close()
    db = state_dir / "control" / "cache.db"
    for sidecar in (db.with_name("cache.db-wal"), db.with_name("cache.db-shm")):
        sidecar.unlink(missing_ok=True)
    db.write_bytes(b"this is not a sqlite database" * 200)
    with pytest.raises(AuthorityUnavailable):
        DiskStore(state_dir)


def test_corrupted_record_is_unavailable(store: DiskStore, state_dir: Path) -> None:
    raw = diskcache.Cache(str(state_dir / "control"))
    raw.set("kill_switch", "{not json")
    raw.close()
    with pytest.raises(AuthorityUnavailable):
        store.kill_switch_state()


def test_lock_held_past_timeout_is_unavailable(state_dir: Path) -> None:
    s = DiskStore(state_dir, timeout_s=0.2)
    holder = sqlite3.connect(state_dir / "budget" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(AuthorityUnavailable):
            s.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=0.5, ttl_s=DAY)
        assert s.budget_used("c") == 0.0  # WAL readers are not blocked by the writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=0.5, ttl_s=DAY) == 0.5
    s.health()
    s.close()


# -- the audit chain's head -------------------------------------------------------------------

def test_a_head_kept_as_a_cache_record_by_an_older_version_is_still_read(
        state_dir: Path) -> None:
    DiskStore(state_dir).close()
    old = diskcache.Cache(str(state_dir / "audit_head"))
    old.set("audit_head", '{"seq":41,"hash":"' + "ab" * 32 + '"}')
    old.close()
    s = DiskStore(state_dir)
    try:
        assert s.get_audit_head() == (41, "ab" * 32)
        s.set_audit_head(40, "cd" * 32)  # behind the old record: the old record still wins
        assert s.get_audit_head() == (41, "ab" * 32)
        s.set_audit_head(42, "ef" * 32)
        assert s.get_audit_head() == (42, "ef" * 32)
    finally:
        s.close()


def test_a_head_is_one_statement_that_holds_while_another_writer_is_locked_out(
        state_dir: Path) -> None:
    """The head is written by one autocommit statement: under another writer's lock it
    waits its busy timeout and then fails closed, it never half-writes."""
    s = DiskStore(state_dir, timeout_s=0.2)
    s.set_audit_head(5, "ab" * 32)
    holder = sqlite3.connect(state_dir / "audit_head" / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(AuthorityUnavailable):
            s.set_audit_head(6, "cd" * 32)
        assert s.get_audit_head() == (5, "ab" * 32)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.set_audit_head(6, "cd" * 32)
    assert s.get_audit_head() == (6, "cd" * 32)
    s.close()


def test_a_malformed_head_is_unavailable(store: DiskStore, state_dir: Path) -> None:
    raw = sqlite3.connect(state_dir / "audit_head" / "cache.db", isolation_level=None)
    raw.execute("INSERT INTO authority_audit_head (id, seq, hash) VALUES (1, 'x', 'y')")
    raw.close()
    with pytest.raises(AuthorityUnavailable):
        store.get_audit_head()


# -- the kill switch read on every request ---------------------------------------------------


def _quiet_stamp(state_dir: Path) -> None:
    """As if the switch was last written long ago (the stamp settles after 0.1 s)."""
    stamp = state_dir / "kill_switch.stamp"
    old = stamp.stat().st_mtime - 3600
    os.utime(stamp, (old, old))


def _counting_reads(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    reads: list[object] = []
    control = store._control
    real_get = control.get

    def get(key: object, *args: object, **kwargs: object) -> object:
        reads.append(key)
        return real_get(key, *args, **kwargs)

    monkeypatch.setattr(control, "get", get)
    return reads


def test_kill_switch_read_is_reused_until_the_stamp_changes(
        store: DiskStore, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _quiet_stamp(state_dir)
    reads = _counting_reads(store, monkeypatch)
    assert store.kill_switch_state() == {}
    assert store.kill_switch_state() == {}
    assert len(reads) == 1  # the second read was one stat, no query
    store.kill_switch_state(fresh=True)  # before an effect: always the database
    assert len(reads) == 2


def test_kill_switch_written_elsewhere_is_seen_by_the_next_read(
        store: DiskStore, state_dir: Path) -> None:
    other = DiskStore(state_dir)
    try:
        _quiet_stamp(state_dir)
        assert store.kill_switch_state() == {}
        other.set_kill_switch("*", True, reason="incident", actor="ops")
        assert store.kill_switch_state()["*"]["engaged"] is True
        # A second write in the same clock tick as the first is not missed either.
        other.set_kill_switch("*", False, reason=None, actor="ops")
        assert store.kill_switch_state()["*"]["engaged"] is False
        other.set_kill_switch("prod", True, reason=None, actor="ops")
        assert store.kill_switch_state()["prod"]["engaged"] is True
    finally:
        other.close()


def test_kill_switch_engaged_by_another_process_refuses_the_next_read(
        store: DiskStore, state_dir: Path) -> None:
    _quiet_stamp(state_dir)
    assert store.kill_switch_state() == {}
    code = ("import sys; from authority_sdk.store import DiskStore; s = DiskStore(sys.argv[1]); "
            "s.set_kill_switch('*', True, reason='cli', actor='ops'); s.close()")
    subprocess.run([sys.executable, "-c", code, str(state_dir)], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert store.kill_switch_state()["*"]["engaged"] is True


def test_kill_switch_without_its_stamp_is_seen_within_the_reuse_bound(
        store: DiskStore, state_dir: Path) -> None:
    """A writer that died between its commit and its stamp: readers catch up within 1 s."""
    _quiet_stamp(state_dir)
    assert store.kill_switch_state() == {}
    raw = diskcache.Cache(str(state_dir / "control"))
    raw.set("kill_switch", '{"*": {"engaged": true, "reason": null, "actor": "x", "ts": 0}}')
    raw.close()
    deadline = time.monotonic() + 1.5
    while not store.kill_switch_state() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.kill_switch_state()["*"]["engaged"] is True


def test_kill_switch_without_a_stamp_file_reads_the_database_every_time(
        store: DiskStore, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (state_dir / "kill_switch.stamp").unlink()
    reads = _counting_reads(store, monkeypatch)
    store.kill_switch_state()
    store.kill_switch_state()
    assert len(reads) == 2

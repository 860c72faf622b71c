"""diskcache-specific behaviour of the default backend: its folder, and failing closed.

The behaviour every backend shares is in ``test_contract.py``.
"""

from __future__ import annotations

import sqlite3
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

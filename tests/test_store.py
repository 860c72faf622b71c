"""The state store: atomicity across threads and real processes, TTLs, fail closed."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.policy import Policy, StateConfig
from authority_sdk.store import DiskStore, Store, open_store

# fork: children start in milliseconds and each opens its own DiskStore on the path.
CTX = (mp.get_context("fork") if "fork" in mp.get_all_start_methods()
       else mp.get_context("spawn"))
DAY = 86400.0


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[DiskStore]:
    s = DiskStore(state_dir)
    yield s
    s.close()


def _run_processes(target: Callable[..., None], args_per_proc: list[tuple[Any, ...]]) -> list[Any]:
    """Start one process per args tuple, release them together, collect one result each."""
    barrier = CTX.Barrier(len(args_per_proc))
    results = CTX.Queue()
    procs = [CTX.Process(target=target, args=(barrier, results, *args)) for args in args_per_proc]
    for p in procs:
        p.start()
    out: list[Any] = []
    deadline = time.monotonic() + 60
    while len(out) < len(procs):
        try:
            out.append(results.get(timeout=0.2))
        except queue.Empty:
            # A child that died before reporting would otherwise hang the test.
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker process failed with exit codes {dead}"
            assert time.monotonic() < deadline, "workers did not report in time"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def _run_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


# -- budgets -------------------------------------------------------------------------------

def _drain(store: Store, counters: list[tuple[str, float]], min_usd: float,
           max_usd: float) -> list[float]:
    grants: list[float] = []
    while (g := store.budget_reserve(counters, min_usd=min_usd, max_usd=max_usd,
                                     ttl_s=DAY)) is not None:
        grants.append(g)
    return grants


def test_budget_reserve_from_threads_never_overspends(store: DiskStore) -> None:
    limit, lo, hi = 1.0, 0.01, 0.07
    per_thread = _run_threads(20, lambda i: _drain(store, [("env:dev:day1", limit)], lo, hi))
    total = sum(sum(g) for g in per_thread)
    assert total <= limit + 1e-9
    assert total > limit - lo  # demand exceeded the limit, so it was used up
    assert store.budget_used("env:dev:day1") == pytest.approx(total)
    assert all(lo <= g <= hi for grants in per_thread for g in grants)
    # What is left (less than min_usd) can still be granted to someone who needs less.
    rest = store.budget_reserve([("env:dev:day1", limit)], min_usd=0.0, max_usd=1.0, ttl_s=DAY)
    assert rest is not None and rest == pytest.approx(limit - total)
    assert store.budget_used("env:dev:day1") == pytest.approx(limit)


def _reserve_worker(barrier: Any, results: Any, path: str) -> None:
    s = DiskStore(path)
    barrier.wait()
    grants = _drain(s, [("env:prod:d", 2.0), ("key:agent:d", 1.5)], 0.02, 0.09)
    s.close()
    results.put(grants)


def test_budget_reserve_from_processes_never_overspends(state_dir: Path) -> None:
    DiskStore(state_dir).close()
    per_proc = _run_processes(_reserve_worker, [(str(state_dir),)] * 6)
    total = sum(sum(g) for g in per_proc)
    assert total <= 1.5 + 1e-9  # the tighter of the two limits binds
    assert total > 1.5 - 0.02
    s = DiskStore(state_dir)
    assert s.budget_used("key:agent:d") == pytest.approx(total)
    assert s.budget_used("env:prod:d") == pytest.approx(total)
    s.close()


def test_budget_refusal_changes_nothing_and_settle_adjusts(store: DiskStore) -> None:
    counters = [("env", 1.0), ("key", 0.5)]
    assert store.budget_reserve(counters, min_usd=0.1, max_usd=0.4, ttl_s=DAY) == 0.4
    assert store.budget_reserve(counters, min_usd=0.2, max_usd=0.4, ttl_s=DAY) is None
    assert store.budget_used("env") == pytest.approx(0.4)
    assert store.budget_used("key") == pytest.approx(0.4)
    # Room smaller than max but at least min: the room is granted.
    assert store.budget_reserve(counters, min_usd=0.05, max_usd=0.4, ttl_s=DAY) == \
        pytest.approx(0.1)
    store.budget_settle(["env", "key"], reserved=0.4, actual=0.15, ttl_s=DAY)
    assert store.budget_used("env") == pytest.approx(0.25)
    store.budget_settle(["env", "key"], reserved=0.1, actual=0.0, ttl_s=DAY)  # release
    assert store.budget_used("key") == pytest.approx(0.15)
    assert store.budget_used("unknown") == 0.0


def test_budget_counter_expires(store: DiskStore) -> None:
    assert store.budget_reserve([("c", 1.0)], min_usd=1.0, max_usd=1.0, ttl_s=0.2) == 1.0
    assert store.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=1.0, ttl_s=0.2) is None
    time.sleep(0.3)
    assert store.budget_used("c") == 0.0
    # Settling into a counter that expired meanwhile never goes negative.
    store.budget_settle(["c"], reserved=1.0, actual=0.2, ttl_s=DAY)
    assert store.budget_used("c") == 0.0


# -- idempotency -------------------------------------------------------------------------

def test_idem_begin_from_threads_has_exactly_one_new(store: DiskStore) -> None:
    states = _run_threads(16, lambda i: store.idem_begin("k1", "fp", ttl_s=DAY, lease_s=60).state)
    assert Counter(states) == {"new": 1, "in_progress": 15}


def test_idem_replay_conflict_and_abandon(store: DiskStore) -> None:
    assert store.idem_begin("k", "fp1", ttl_s=DAY, lease_s=60).state == "new"
    conflict = store.idem_begin("k", "fp2", ttl_s=DAY, lease_s=60)
    assert conflict.state == "conflict" and conflict.record is not None
    assert conflict.record["fingerprint"] == "fp1"
    # Abandon by another fingerprint does not drop our claim.
    store.idem_abandon("k", "fp2")
    assert store.idem_begin("k", "fp1", ttl_s=DAY, lease_s=60).state == "in_progress"
    store.idem_abandon("k", "fp1")
    assert store.idem_begin("k", "fp1", ttl_s=DAY, lease_s=60).state == "new"
    store.idem_finish("k", "fp1", {"id": "chatcmpl-1", "choices": []}, ttl_s=DAY)
    replay = store.idem_begin("k", "fp1", ttl_s=DAY, lease_s=60)
    assert replay.state == "replay" and replay.record is not None
    assert replay.record["status"] == "done"
    assert replay.record["response"] == {"id": "chatcmpl-1", "choices": []}
    assert store.idem_begin("k", "fp2", ttl_s=DAY, lease_s=60).state == "conflict"
    # Abandon never deletes a finished record.
    store.idem_abandon("k", "fp1")
    assert store.idem_begin("k", "fp1", ttl_s=DAY, lease_s=60).state == "replay"


def test_idem_finish_does_not_replace_another_requests_claim(store: DiskStore) -> None:
    assert store.idem_begin("k", "fp-new", ttl_s=DAY, lease_s=60).state == "new"
    store.idem_finish("k", "fp-old", {"stale": True}, ttl_s=DAY)
    assert store.idem_begin("k", "fp-new", ttl_s=DAY, lease_s=60).state == "in_progress"


def test_idem_record_expires_after_ttl(store: DiskStore) -> None:
    assert store.idem_begin("k", "fp", ttl_s=0.2, lease_s=0.1).state == "new"
    store.idem_finish("k", "fp", {"r": 1}, ttl_s=0.2)
    assert store.idem_begin("k", "fp2", ttl_s=DAY, lease_s=60).state == "conflict"
    time.sleep(0.3)
    assert store.idem_begin("k", "fp2", ttl_s=DAY, lease_s=60).state == "new"


def _crashing_claimer(barrier: Any, results: Any, path: str) -> None:
    s = DiskStore(path)
    barrier.wait()
    short = s.idem_begin("short", "fp", ttl_s=DAY, lease_s=0.3)
    long = s.idem_begin("long", "fp", ttl_s=DAY, lease_s=3600)
    assert short.record is not None
    results.put((short.state, long.state, short.record["lease_until"]))
    results.close()
    results.join_thread()  # the report must leave before the crash
    os._exit(0)  # crash: no finish, no abandon, no close


def test_lease_expiry_lets_a_new_claimant_in_after_a_crash(state_dir: Path) -> None:
    DiskStore(state_dir).close()
    [(short, long, lease_until)] = _run_processes(_crashing_claimer, [(str(state_dir),)])
    assert (short, long) == ("new", "new")
    s = DiskStore(state_dir)
    # Live lease: the dead holder still blocks (409) until its lease runs out.
    assert s.idem_begin("long", "fp", ttl_s=DAY, lease_s=60).state == "in_progress"
    time.sleep(max(0.0, lease_until - time.time()) + 0.05)
    taken = s.idem_begin("short", "fp", ttl_s=DAY, lease_s=60)
    assert taken.state == "new"
    assert s.idem_begin("short", "fp", ttl_s=DAY, lease_s=60).state == "in_progress"
    s.close()


# -- kill switch -----------------------------------------------------------------------------

def _read_kill_switch(barrier: Any, results: Any, path: str) -> None:
    s = DiskStore(path)
    barrier.wait()
    results.put(s.kill_switch_state())
    s.close()


def test_kill_switch_scopes_and_visibility_across_processes(
        store: DiskStore, state_dir: Path) -> None:
    assert store.kill_switch_state() == {}
    entry = store.set_kill_switch("*", True, reason="incident 7", actor="ops")
    assert entry["engaged"] is True and entry["reason"] == "incident 7"
    assert entry["actor"] == "ops" and isinstance(entry["ts"], float)
    store.set_kill_switch("prod", True, reason=None, actor="ops")
    store.set_kill_switch("*", False, reason="resolved", actor="lead")
    [seen] = _run_processes(_read_kill_switch, [(str(state_dir),)])
    assert set(seen) == {"*", "prod"}
    assert seen["*"]["engaged"] is False and seen["*"]["actor"] == "lead"
    assert seen["prod"]["engaged"] is True
    with pytest.raises(ValueError):
        store.set_kill_switch("", True, reason=None, actor=None)


# -- approvals ----------------------------------------------------------------------------

def _approval(i: int, ttl: float = 3600) -> dict[str, Any]:
    return {"id": f"apr_{i}", "status": "pending", "expires_at": time.time() + ttl,
            "action_type": "issue_refund", "arguments": {"amount": i}}


def test_approval_lifecycle(store: DiskStore) -> None:
    for i in range(3):
        store.approval_create(_approval(i))
    with pytest.raises(ValueError):
        store.approval_create(_approval(1))
    with pytest.raises(ValueError):
        store.approval_create({"id": "x", "status": "pending"})
    assert [a["id"] for a in store.approval_list()] == ["apr_2", "apr_1", "apr_0"]
    got = store.approval_get("apr_1")
    assert got is not None and got["arguments"] == {"amount": 1}
    assert store.approval_get("nope") is None

    approved = store.approval_transition("apr_1", "pending", "approved", approver="ops")
    assert approved is not None
    assert approved["status"] == "approved" and approved["approver"] == "ops"
    assert store.approval_transition("apr_1", "pending", "rejected") is None
    assert store.approval_transition("apr_1", ("approved", "failed"), "executed",
                                     result={"ok": True}) is not None
    final = store.approval_get("apr_1")
    assert final is not None
    assert final["status"] == "executed" and final["approver"] == "ops"
    assert final["result"] == {"ok": True}
    assert store.approval_transition("missing", "pending", "approved") is None
    assert [a["id"] for a in store.approval_list("pending")] == ["apr_2", "apr_0"]
    assert [a["id"] for a in store.approval_list("executed")] == ["apr_1"]


def test_overdue_pending_approval_is_expired(store: DiskStore) -> None:
    store.approval_create(_approval(1, ttl=-1))  # already overdue
    store.approval_create(_approval(2, ttl=3600))
    got = store.approval_get("apr_1")
    assert got is not None and got["status"] == "expired"
    assert store.approval_transition("apr_1", "pending", "approved") is None
    assert [a["id"] for a in store.approval_list("pending")] == ["apr_2"]
    assert [a["id"] for a in store.approval_list("expired")] == ["apr_1"]

    store.approval_create(_approval(3, ttl=0.2))
    time.sleep(0.3)
    assert store.approval_transition("apr_3", "pending", "approved") is None
    assert [a["id"] for a in store.approval_list("expired")] == ["apr_3", "apr_1"]
    # A decided approval never expires.
    store.approval_create(_approval(4, ttl=0.2))
    assert store.approval_transition("apr_4", "pending", "rejected") is not None
    time.sleep(0.3)
    got = store.approval_get("apr_4")
    assert got is not None and got["status"] == "rejected"


def _approver(barrier: Any, results: Any, path: str, name: str, ids: list[str]) -> None:
    s = DiskStore(path)
    barrier.wait()
    won = [i for i in ids if s.approval_transition(i, "pending", "approved", approver=name)]
    s.close()
    results.put((name, won))


def test_approval_cas_two_processes_exactly_one_winner(state_dir: Path) -> None:
    s = DiskStore(state_dir)
    ids = []
    for i in range(30):
        s.approval_create(_approval(i))
        ids.append(f"apr_{i}")
    results = dict(_run_processes(_approver, [(str(state_dir), "a", ids),
                                              (str(state_dir), "b", ids)]))
    assert sorted(results["a"] + results["b"]) == sorted(ids)  # each won exactly once
    for name, won in results.items():
        for i in won:
            rec = s.approval_get(i)
            assert rec is not None and rec["status"] == "approved" and rec["approver"] == name
    s.close()


# -- execution journal -----------------------------------------------------------------------

def test_journal_begin_finish_mark_list(store: DiskStore) -> None:
    assert store.journal_begin("act1", {"action_type": "send_email"}, ttl_s=DAY) is None
    existing = store.journal_begin("act1", {"action_type": "other"}, ttl_s=DAY)
    assert existing is not None
    assert existing["status"] == "started" and existing["action_type"] == "send_email"
    assert existing["action_key"] == "act1" and "started_at" in existing

    done = store.journal_finish("act1", "executed", {"message_id": "<x@y>"}, ttl_s=DAY)
    assert done["status"] == "executed" and done["action_type"] == "send_email"
    assert store.journal_get("act1") == done
    assert store.journal_mark("act1", "started", "in_doubt") is None

    assert store.journal_begin("act2", {"action_type": "issue_refund"}, ttl_s=DAY) is None
    marked = store.journal_mark("act2", "started", "in_doubt", reason="crash")
    assert marked is not None and marked["status"] == "in_doubt" and marked["reason"] == "crash"
    assert store.journal_mark("act2", "started", "retried") is None
    assert [e["action_key"] for e in store.journal_list("in_doubt")] == ["act2"]
    assert {e["action_key"] for e in store.journal_list()} == {"act1", "act2"}
    assert store.journal_get("missing") is None


def test_journal_mark_keeps_the_ttl(store: DiskStore) -> None:
    assert store.journal_begin("a", {}, ttl_s=0.3) is None
    assert store.journal_mark("a", "started", "started", attempt=2) is not None
    time.sleep(0.4)
    assert store.journal_get("a") is None
    assert store.journal_begin("a", {}, ttl_s=DAY) is None


def _journal_racer(barrier: Any, results: Any, path: str, me: int, keys: list[str]) -> None:
    s = DiskStore(path)
    barrier.wait()
    owned = [k for k in keys if s.journal_begin(k, {"worker": me}, ttl_s=DAY) is None]
    s.close()
    results.put((me, owned))


def test_journal_begin_racing_processes_one_owner(state_dir: Path) -> None:
    DiskStore(state_dir).close()
    keys = [f"act_{i}" for i in range(25)]
    results = _run_processes(_journal_racer, [(str(state_dir), me, keys) for me in range(5)])
    owners = Counter(k for _, owned in results for k in owned)
    assert owners == dict.fromkeys(keys, 1)
    s = DiskStore(state_dir)
    for me, owned in results:
        for k in owned:
            entry = s.journal_get(k)
            assert entry is not None and entry["worker"] == me
    s.close()


# -- dedupe and audit head -----------------------------------------------------------------

def test_dedupe_claim_and_release(store: DiskStore) -> None:
    owner = {"action_key": "act1", "request_id": "req_1"}
    assert store.dedupe_claim("issue_refund:order-42", owner, ttl_s=DAY) is None
    assert store.dedupe_claim("issue_refund:order-42", {"action_key": "act2"}, ttl_s=DAY) == owner
    store.dedupe_release("issue_refund:order-42", "act2")  # not the owner: no effect
    assert store.dedupe_claim("issue_refund:order-42", {"action_key": "act2"}, ttl_s=DAY) == owner
    store.dedupe_release("issue_refund:order-42", "act1")
    assert store.dedupe_claim("issue_refund:order-42", {"action_key": "act2"}, ttl_s=DAY) is None

    assert store.dedupe_claim("short", owner, ttl_s=0.2) is None
    time.sleep(0.3)
    assert store.dedupe_claim("short", {"action_key": "act3"}, ttl_s=DAY) is None


def test_everything_survives_reopen(state_dir: Path) -> None:
    s = DiskStore(state_dir)
    assert s.get_audit_head() is None
    s.set_audit_head(41, "ab" * 32)
    s.set_audit_head(42, "cd" * 32)
    s.set_kill_switch("prod", True, reason="r", actor="a")
    s.idem_begin("k", "fp", ttl_s=DAY, lease_s=60)
    s.idem_finish("k", "fp", {"x": 1}, ttl_s=DAY)
    s.budget_reserve([("c", 10.0)], min_usd=1.0, max_usd=2.5, ttl_s=DAY)
    s.approval_create(_approval(1))
    s.journal_begin("act", {"t": 1}, ttl_s=DAY)
    s.dedupe_claim("d", {"action_key": "act"}, ttl_s=DAY)
    s.close()

    r = DiskStore(state_dir)
    assert r.get_audit_head() == (42, "cd" * 32)
    assert r.kill_switch_state()["prod"]["engaged"] is True
    replay = r.idem_begin("k", "fp", ttl_s=DAY, lease_s=60)
    assert replay.state == "replay" and replay.record is not None
    assert replay.record["response"] == {"x": 1}
    assert r.budget_used("c") == 2.5
    assert [a["id"] for a in r.approval_list("pending")] == ["apr_1"]
    entry = r.journal_get("act")
    assert entry is not None and entry["status"] == "started"
    assert r.dedupe_claim("d", {"action_key": "other"}, ttl_s=DAY) == {"action_key": "act"}
    r.health()
    r.close()


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


def test_in_doubt_journal_entries_outlive_their_ttl(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "s")
    store.journal_begin("act_1", {"executor": "x"}, ttl_s=0.2)
    assert store.journal_mark("act_1", "started", "in_doubt") is not None
    time.sleep(0.4)
    entry = store.journal_get("act_1")
    assert entry is not None and entry["status"] == "in_doubt"
    assert store.journal_mark("act_1", "in_doubt", "failed", resolved_by="ops") is not None
    time.sleep(0.1)
    assert store.journal_get("act_1") is not None

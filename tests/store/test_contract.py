"""The store contract: every backend passes these, across threads and real processes.

The primitives (conditional add, compare-and-set, reserve, leases, the forward-only
audit head) and the rules built on them (idempotency claims and takeovers,
approval expiry) run against each backend of ``STORE_BACKENDS`` (tests/conftest.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import StoreBackend

from authority_sdk import approvals, idempotency
from authority_sdk.errors import AuthorityUnavailable
from authority_sdk.store import Store

# fork: children start in milliseconds and each opens its own connection.
CTX = (mp.get_context("fork") if "fork" in mp.get_all_start_methods()
       else mp.get_context("spawn"))
DAY = 86400.0


@pytest.fixture
def store(store_backend: StoreBackend) -> Iterator[Any]:
    s = store_backend.open()
    yield s
    s.close()


def run_processes(target: Callable[..., None], args_per_proc: list[tuple[Any, ...]]) -> list[Any]:
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
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker process failed with exit codes {dead}"
            assert time.monotonic() < deadline, "workers did not report in time"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def run_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
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


def _state(store: Any, fingerprint: str, claim_id: str) -> str:
    """What a new request with key "k" finds (a day's record, a minute's lease)."""
    return idempotency.begin(store, "k", fingerprint, claim_id=claim_id, ttl_s=DAY,
                             lease_s=60).state


def test_is_a_store(store: Any) -> None:
    assert isinstance(store, Store)
    store.health()


# -- counters ----------------------------------------------------------------------------


def _drain(store: Any, counters: list[tuple[str, float]], min_usd: float,
           max_usd: float) -> list[float]:
    grants: list[float] = []
    while (g := store.budget_reserve(counters, min_usd=min_usd, max_usd=max_usd,
                                     ttl_s=DAY)) is not None:
        grants.append(g)
    return grants


def test_reserve_from_threads_never_overspends(store: Any) -> None:
    limit = 3.0
    counters = [("env:dev:day1", limit)]
    grants = run_threads(8, lambda i: _drain(store, counters, 0.01, 0.07))
    total = sum(sum(g) for g in grants)
    assert total <= limit + 1e-9
    assert store.budget_used("env:dev:day1") == pytest.approx(total)
    assert store.budget_used("env:dev:day1") == pytest.approx(limit, abs=0.011)


def _drainer(barrier: Any, results: Any, backend: StoreBackend) -> None:
    s = backend.open()
    barrier.wait()
    results.put(sum(_drain(s, [("shared", 2.0), ("key", 5.0)], 0.05, 0.11)))
    s.close()


def test_reserve_from_processes_never_overspends(store_backend: StoreBackend,
                                                 store: Any) -> None:
    totals = run_processes(_drainer, [(store_backend,)] * 4)
    assert sum(totals) <= 2.0 + 1e-9
    assert store.budget_used("shared") == pytest.approx(sum(totals))
    assert store.budget_used("key") == pytest.approx(sum(totals))


def test_refusal_changes_nothing_and_settle_adjusts(store: Any) -> None:
    counters = [("env", 1.0), ("key", 0.5)]
    assert store.budget_reserve(counters, min_usd=0.1, max_usd=0.4, ttl_s=DAY) == 0.4
    assert store.budget_reserve(counters, min_usd=0.2, max_usd=0.4, ttl_s=DAY) is None
    assert store.budget_used("env") == pytest.approx(0.4)
    assert store.budget_reserve(counters, min_usd=0.05, max_usd=0.4, ttl_s=DAY) == \
        pytest.approx(0.1)
    store.budget_settle(["env", "key"], reserved=0.4, actual=0.15, ttl_s=DAY)
    assert store.budget_used("env") == pytest.approx(0.25)
    store.budget_settle(["env", "key"], reserved=0.1, actual=0.0, ttl_s=DAY)  # release
    assert store.budget_used("key") == pytest.approx(0.15)
    assert store.budget_used("unknown") == 0.0
    assert store.budget_reserve([], min_usd=0.0, max_usd=7.0, ttl_s=DAY) == 7.0
    with pytest.raises(ValueError):
        store.budget_reserve(counters, min_usd=0.5, max_usd=0.1, ttl_s=DAY)


def test_counter_expires_and_never_goes_negative(store: Any) -> None:
    assert store.budget_reserve([("c", 1.0)], min_usd=1.0, max_usd=1.0, ttl_s=0.3) == 1.0
    assert store.budget_reserve([("c", 1.0)], min_usd=0.1, max_usd=1.0, ttl_s=0.3) is None
    time.sleep(0.4)
    assert store.budget_used("c") == 0.0
    store.budget_settle(["c"], reserved=1.0, actual=0.2, ttl_s=DAY)
    assert store.budget_used("c") == 0.0


# -- idempotency (primitives and the rules above them) -------------------------------------


def test_claim_from_threads_has_exactly_one_new(store: Any) -> None:
    states = run_threads(16, lambda i: idempotency.begin(
        store, "k1", "fp", claim_id=f"r{i}", ttl_s=DAY, lease_s=60).state)
    assert Counter(states) == {"new": 1, "in_progress": 15}


def _claimer(barrier: Any, results: Any, backend: StoreBackend, me: int) -> None:
    s = backend.open()
    barrier.wait()
    results.put(idempotency.begin(s, "shared", "fp", claim_id=f"p{me}", ttl_s=DAY,
                                  lease_s=60).state)
    s.close()


def test_claim_from_processes_has_exactly_one_new(store_backend: StoreBackend) -> None:
    states = run_processes(_claimer, [(store_backend, i) for i in range(4)])
    assert Counter(states) == {"new": 1, "in_progress": 3}


def test_replay_conflict_abandon_and_foreign_claims(store: Any) -> None:
    first = idempotency.begin(store, "k", "fp1", claim_id="r1", ttl_s=DAY, lease_s=60)
    assert first.state == "new"
    conflict = idempotency.begin(store, "k", "fp2", claim_id="r2", ttl_s=DAY, lease_s=60)
    assert conflict.state == "conflict" and conflict.record["fingerprint"] == "fp1"
    assert not store.idem_delete("k", "r2")  # not the owner: nothing happens
    assert _state(store, "fp1", "r3") == "in_progress"
    assert idempotency.abandon(store, first)
    retry = idempotency.begin(store, "k", "fp1", claim_id="r4", ttl_s=DAY, lease_s=60)
    assert retry.state == "new"
    assert idempotency.finish(store, retry, {"id": "chatcmpl-1"}, ttl_s=DAY)
    replay = idempotency.begin(store, "k", "fp1", claim_id="r5", ttl_s=DAY, lease_s=60)
    assert replay.state == "replay" and replay.record["response"] == {"id": "chatcmpl-1"}
    assert _state(store, "fp2", "r6") == "conflict"
    assert not idempotency.abandon(store, first)  # a finished record is not abandoned
    assert not idempotency.finish(store, first, {"stale": True}, ttl_s=DAY)
    assert store.idem_get("k")["response"] == {"id": "chatcmpl-1"}


def test_idem_record_expires_after_ttl(store: Any) -> None:
    c = idempotency.begin(store, "k", "fp", claim_id="r1", ttl_s=0.3, lease_s=0.2)
    idempotency.finish(store, c, {"r": 1}, ttl_s=0.3)
    assert _state(store, "fp2", "r2") == "conflict"
    time.sleep(0.4)
    assert _state(store, "fp2", "r3") == "new"


def test_idem_put_and_replace(store: Any) -> None:
    store.idem_put("auto", {"claim_id": "a", "status": "in_flight", "fingerprint": "f"},
                   ttl_s=DAY)
    store.idem_put("auto", {"claim_id": "b", "status": "in_flight", "fingerprint": "f"},
                   ttl_s=DAY)
    assert store.idem_get("auto")["claim_id"] == "b"
    assert not store.idem_replace("auto", "a", {"claim_id": "c"}, ttl_s=DAY)
    assert store.idem_replace("auto", "b", {"claim_id": "c", "status": "done"}, ttl_s=DAY)
    assert store.idem_get("auto") == {"claim_id": "c", "status": "done"}
    # flush=False is the same compare-and-set, on every backend
    assert not store.idem_replace("auto", "b", {"claim_id": "d"}, ttl_s=DAY, flush=False)
    assert store.idem_replace("auto", "c", {"claim_id": "d"}, ttl_s=DAY, flush=False)
    assert store.idem_get("auto") == {"claim_id": "d"}
    assert store.idem_get("missing") is None


def _crashing_claimer(barrier: Any, results: Any, backend: StoreBackend) -> None:
    s = backend.open()
    barrier.wait()
    short = idempotency.begin(s, "short", "fp", claim_id="dead1", ttl_s=DAY, lease_s=0.3)
    idempotency.checkpoint(s, short, {"choices": []}, ttl_s=DAY)
    plain = idempotency.begin(s, "plain", "fp", claim_id="dead2", ttl_s=DAY, lease_s=3600)
    results.put((short.state, plain.state))
    results.close()
    results.join_thread()  # the report must leave before the crash
    os._exit(0)  # crash: no finish, no abandon, no close


def test_dead_holder_is_taken_over_with_its_checkpoint(store_backend: StoreBackend,
                                                       store: Any) -> None:
    [(short, plain)] = run_processes(_crashing_claimer, [(store_backend,)])
    assert (short, plain) == ("new", "new")
    # The holder's process is gone: its claim is taken over at once, lease or not.
    taken = idempotency.begin(store, "plain", "fp", claim_id="r1", ttl_s=DAY, lease_s=60)
    assert taken.state == "new" and taken.record["takeover_of"] == "dead2"
    # A checkpointed answer goes to the taker, never to a request with another body.
    assert idempotency.begin(store, "short", "other", claim_id="r2", ttl_s=DAY,
                             lease_s=60).state == "conflict"
    again = idempotency.begin(store, "short", "fp", claim_id="r3", ttl_s=DAY, lease_s=60)
    assert again.state == "takeover" and again.answer == {"choices": []}
    assert idempotency.begin(store, "short", "fp", claim_id="r4", ttl_s=DAY,
                             lease_s=60).state == "in_progress"


def test_live_holder_blocks_until_its_lease_ends(store: Any) -> None:
    claim = idempotency.begin(store, "k", "fp", claim_id="r1", ttl_s=DAY, lease_s=0.3)
    assert claim.state == "new"
    # Our own process holds it: alive, so only the lease can free it.
    assert _state(store, "fp", "r2") == "in_progress"
    time.sleep(0.4)
    assert _state(store, "fp", "r3") == "new"


def test_corrupt_idempotency_record_fails_closed(store: Any) -> None:
    store.idem_put("bad", {"what": "ever"}, ttl_s=DAY)
    with pytest.raises(AuthorityUnavailable):
        idempotency.begin(store, "bad", "fp", claim_id="r", ttl_s=DAY, lease_s=60)


# -- kill switch ------------------------------------------------------------------------------


def _read_kill_switch(barrier: Any, results: Any, backend: StoreBackend) -> None:
    s = backend.open()
    barrier.wait()
    results.put(s.kill_switch_state())
    s.close()


def test_kill_switch_scopes_and_visibility_across_processes(
        store_backend: StoreBackend, store: Any) -> None:
    assert store.kill_switch_state() == {}
    entry = store.set_kill_switch("*", True, reason="incident 7", actor="ops")
    assert entry["engaged"] is True and entry["reason"] == "incident 7"
    assert entry["actor"] == "ops" and isinstance(entry["ts"], float)
    store.set_kill_switch("prod", True, reason=None, actor="ops")
    store.set_kill_switch("*", False, reason="resolved", actor="lead")
    [seen] = run_processes(_read_kill_switch, [(store_backend,)])
    assert set(seen) == {"*", "prod"}
    assert seen["*"]["engaged"] is False and seen["*"]["actor"] == "lead"
    assert seen["prod"]["engaged"] is True
    with pytest.raises(ValueError):
        store.set_kill_switch("", True, reason=None, actor=None)


# -- approvals ----------------------------------------------------------------------------


def _approval(i: int, ttl: float = 3600) -> dict[str, Any]:
    return {"id": f"apr_{i}", "status": "pending", "expires_at": time.time() + ttl,
            "created_at": 1000.0 + i, "action_type": "issue_refund",
            "arguments": {"amount": i}}


def test_approval_lifecycle(store: Any) -> None:
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


def test_approval_list_pages_newest_first(store: Any) -> None:
    for i in range(7):
        store.approval_create(_approval(i))
    first = store.approval_list("pending", limit=3)
    assert [a["id"] for a in first] == ["apr_6", "apr_5", "apr_4"]
    second = store.approval_list("pending", limit=3, before=first[-1]["id"])
    assert [a["id"] for a in second] == ["apr_3", "apr_2", "apr_1"]
    assert [a["id"] for a in store.approval_list("pending", limit=3,
                                                 before="apr_1")] == ["apr_0"]
    assert [a["id"] for a in store.approval_list(limit=2)] == ["apr_6", "apr_5"]


def test_approval_guards_compare_the_time(store: Any) -> None:
    store.approval_create(_approval(1, ttl=-1))  # already overdue
    assert store.approval_transition("apr_1", "pending", "approved", guard="unexpired",
                                     now=time.time()) is None
    assert store.approval_transition("apr_1", "pending", "expired", guard="expired",
                                     now=time.time()) is not None
    store.approval_create(_approval(2, ttl=3600))
    assert store.approval_transition("apr_2", "pending", "expired", guard="expired",
                                     now=time.time()) is None
    assert store.approval_transition("apr_2", "pending", "approved", guard="unexpired",
                                     now=time.time()) is not None


def test_overdue_pending_approval_reads_expired(store: Any) -> None:
    store.approval_create(_approval(1, ttl=-1))
    store.approval_create(_approval(2, ttl=3600))
    got = approvals.get(store, "apr_1")
    assert got is not None and got["status"] == "expired"
    assert [a["id"] for a in approvals.listing(store, "pending")] == ["apr_2"]
    assert [a["id"] for a in approvals.listing(store, "expired")] == ["apr_1"]

    store.approval_create(_approval(3, ttl=0.2))
    time.sleep(0.3)
    assert [a["id"] for a in approvals.listing(store, "pending")] == ["apr_2"]
    assert [a["id"] for a in approvals.listing(store, "expired")] == ["apr_3", "apr_1"]
    # A decided approval never expires.
    store.approval_create(_approval(4, ttl=0.2))
    assert store.approval_transition("apr_4", "pending", "rejected") is not None
    time.sleep(0.3)
    got = approvals.get(store, "apr_4")
    assert got is not None and got["status"] == "rejected"


def _approver(barrier: Any, results: Any, backend: StoreBackend, name: str,
              ids: list[str]) -> None:
    s = backend.open()
    barrier.wait()
    won = [i for i in ids if s.approval_transition(i, "pending", "approved", approver=name)]
    s.close()
    results.put((name, won))


def test_approval_cas_two_processes_exactly_one_winner(store_backend: StoreBackend,
                                                       store: Any) -> None:
    ids = []
    for i in range(30):
        store.approval_create(_approval(i))
        ids.append(f"apr_{i}")
    results = dict(run_processes(_approver, [(store_backend, "a", ids),
                                             (store_backend, "b", ids)]))
    assert sorted(results["a"] + results["b"]) == sorted(ids)  # each won exactly once
    for name, won in results.items():
        for i in won:
            rec = store.approval_get(i)
            assert rec is not None and rec["status"] == "approved" and rec["approver"] == name


# -- execution journal -----------------------------------------------------------------------


def test_journal_begin_update_list(store: Any) -> None:
    assert store.journal_begin("act1", {"action_type": "send_email"}, ttl_s=DAY) is None
    existing = store.journal_begin("act1", {"action_type": "other"}, ttl_s=DAY)
    assert existing is not None
    assert existing["status"] == "started" and existing["action_type"] == "send_email"
    assert existing["action_key"] == "act1" and "started_at" in existing

    done = store.journal_update("act1", "started", {"status": "executed", "audited": False,
                                                    "result": {"id": "<x@y>"}}, ttl_s=DAY)
    assert done is not None and done["status"] == "executed"
    assert done["action_type"] == "send_email"
    assert store.journal_get("act1") == done
    assert [e["action_key"] for e in store.journal_list(unaudited=True)] == ["act1"]
    assert store.journal_update("act1", "started", {"status": "in_doubt"}, ttl_s=None) is None
    assert store.journal_update("act1", "executed", {"audited": True}, ttl_s=DAY) is not None
    assert store.journal_list(unaudited=True) == []

    assert store.journal_begin("act2", {"action_type": "issue_refund"}, ttl_s=DAY) is None
    assert [e["action_key"] for e in store.journal_list("started")] == ["act2"]
    marked = store.journal_update("act2", ("started", "other"),
                                  {"status": "in_doubt", "reason": "crash"}, ttl_s=None)
    assert marked is not None and marked["status"] == "in_doubt" and marked["reason"] == "crash"
    assert store.journal_list("started") == []
    assert [e["action_key"] for e in store.journal_list("in_doubt")] == ["act2"]
    assert {e["action_key"] for e in store.journal_list()} == {"act1", "act2"}
    assert [e["action_key"] for e in store.journal_list("executed")] == ["act1"]
    assert len(store.journal_list(limit=1)) == 1
    assert store.journal_get("missing") is None


def test_journal_ttl_and_entries_that_never_expire(store: Any) -> None:
    assert store.journal_begin("a", {}, ttl_s=0.3) is None
    assert store.journal_begin("b", {}, ttl_s=0.3) is None
    assert store.journal_update("b", "started", {"status": "in_doubt"}, ttl_s=None)
    time.sleep(0.4)
    assert store.journal_get("a") is None
    assert store.journal_get("b")["status"] == "in_doubt"
    assert [e["action_key"] for e in store.journal_list("in_doubt")] == ["b"]
    assert store.journal_begin("a", {}, ttl_s=DAY) is None


def _journal_racer(barrier: Any, results: Any, backend: StoreBackend, me: int,
                   keys: list[str]) -> None:
    s = backend.open()
    barrier.wait()
    owned = [k for k in keys if s.journal_begin(k, {"worker": me}, ttl_s=DAY) is None]
    s.close()
    results.put((me, owned))


def test_journal_begin_racing_processes_one_owner(store_backend: StoreBackend,
                                                  store: Any) -> None:
    keys = [f"act_{i}" for i in range(25)]
    results = run_processes(_journal_racer, [(store_backend, me, keys) for me in range(5)])
    owners = Counter(k for _, owned in results for k in owned)
    assert owners == dict.fromkeys(keys, 1)
    for me, owned in results:
        for k in owned:
            entry = store.journal_get(k)
            assert entry is not None and entry["worker"] == me


# -- dedupe, outbox, leases, audit head ----------------------------------------------------------


def test_dedupe_claim_release_list(store: Any) -> None:
    owner = {"action_key": "act1", "request_id": "req_1"}
    assert store.dedupe_claim("issue_refund:order-42", owner, ttl_s=DAY) is None
    assert store.dedupe_claim("issue_refund:order-42", {"action_key": "act2"},
                              ttl_s=DAY) == owner
    assert not store.dedupe_release("issue_refund:order-42", "act2")
    assert store.dedupe_list() == [("issue_refund:order-42", owner)]
    assert store.dedupe_release("issue_refund:order-42", "act1")
    assert store.dedupe_claim("issue_refund:order-42", {"action_key": "act2"},
                              ttl_s=DAY) is None
    assert store.dedupe_claim("short", owner, ttl_s=0.2) is None
    time.sleep(0.3)
    assert store.dedupe_claim("short", {"action_key": "act3"}, ttl_s=DAY) is None


def test_outbox_put_replaces_the_item_with_that_id(store: Any) -> None:
    # The notification worker re-puts an item with its attempt count and next try time.
    store.outbox_put("notify", "n1", {"attempts": 0})
    store.outbox_put("notify", "n2", {"attempts": 0})
    store.outbox_put("notify", "n1", {"attempts": 1, "next_at": 5.0})
    assert sorted(store.outbox_list("notify")) == [("n1", {"attempts": 1, "next_at": 5.0}),
                                                   ("n2", {"attempts": 0})]


def test_outbox_oldest_first(store: Any) -> None:
    store.outbox_put("audit", "b", {"n": 1})
    store.outbox_put("audit", "a", {"n": 2})
    store.outbox_put("notify", "a", {"n": 3})
    assert store.outbox_list("audit") == [("b", {"n": 1}), ("a", {"n": 2})]
    assert store.outbox_list("audit", limit=1) == [("b", {"n": 1})]
    assert store.outbox_delete("audit", "b")
    assert not store.outbox_delete("audit", "b")
    assert store.outbox_list("audit") == [("a", {"n": 2})]
    assert store.outbox_list("notify") == [("a", {"n": 3})]


def test_leases(store: Any) -> None:
    assert store.lease_acquire("worker", "p1", ttl_s=0.3)
    assert not store.lease_acquire("worker", "p2", ttl_s=10)
    assert store.lease_acquire("worker", "p1", ttl_s=0.3)  # renew
    assert store.lease_get("worker")["holder"] == "p1"
    time.sleep(0.4)
    assert store.lease_get("worker") is None
    assert store.lease_acquire("worker", "p2", ttl_s=10)
    store.lease_release("worker", "p1")  # not the holder
    assert store.lease_get("worker")["holder"] == "p2"
    store.lease_release("worker", "p2")
    assert store.lease_get("worker") is None


def test_audit_head_only_moves_forward(store: Any) -> None:
    assert store.get_audit_head() is None
    store.set_audit_head(41, "ab" * 32)
    store.set_audit_head(42, "cd" * 32)
    store.set_audit_head(40, "ef" * 32)  # a stale writer: ignored
    assert store.get_audit_head() == (42, "cd" * 32)


def test_lone_surrogates_round_trip(store: Any) -> None:
    weird = {"id": "apr_x", "status": "pending", "expires_at": time.time() + 60,
             "arguments": {"note": "\ud800 and \U0001f600"}}
    store.approval_create(weird)
    assert store.approval_get("apr_x")["arguments"] == weird["arguments"]


def test_everything_survives_reopen(store_backend: StoreBackend) -> None:
    s = store_backend.open()
    s.set_audit_head(42, "cd" * 32)
    s.set_kill_switch("prod", True, reason="r", actor="a")
    c = idempotency.begin(s, "k", "fp", claim_id="r1", ttl_s=DAY, lease_s=60)
    idempotency.finish(s, c, {"x": 1}, ttl_s=DAY)
    s.budget_reserve([("c", 10.0)], min_usd=1.0, max_usd=2.5, ttl_s=DAY)
    s.approval_create(_approval(1))
    s.journal_begin("act", {"t": 1}, ttl_s=DAY)
    s.dedupe_claim("d", {"action_key": "act"}, ttl_s=DAY)
    s.outbox_put("audit", "x", {"n": 1})
    s.close()

    r = store_backend.open()
    assert r.get_audit_head() == (42, "cd" * 32)
    assert r.kill_switch_state()["prod"]["engaged"] is True
    replay = idempotency.begin(r, "k", "fp", claim_id="r2", ttl_s=DAY, lease_s=60)
    assert replay.state == "replay" and replay.record["response"] == {"x": 1}
    assert r.budget_used("c") == 2.5
    assert [a["id"] for a in r.approval_list("pending")] == ["apr_1"]
    entry = r.journal_get("act")
    assert entry is not None and entry["status"] == "started"
    assert r.dedupe_claim("d", {"action_key": "other"}, ttl_s=DAY) == {"action_key": "act"}
    assert r.outbox_list("audit") == [("x", {"n": 1})]
    r.health()
    r.close()


async def _async_calls(store: Any) -> list[Any]:
    try:
        return [await store.aio.budget_reserve([("a", 1.0)], min_usd=0.1, max_usd=0.5,
                                               ttl_s=DAY),
                await store.aio.kill_switch_state(),
                await store.aio.budget_used("a")]
    finally:
        # A network store's async pool belongs to this loop: closed on it, as the proxy
        # does at shutdown (else the loop's teardown may wait on the pool's tasks).
        aclose = getattr(store.aio, "aclose", None)
        if aclose is not None:
            await aclose()


def test_async_facade_calls_the_same_primitives(store: Any) -> None:
    import asyncio

    assert asyncio.run(_async_calls(store)) == [0.5, {}, 0.5]

"""The audit sink contract: every sink of ``AUDIT_SINKS`` (tests/helpers.py) passes these.

Each test drives a real sink (the JSONL file today; PostgreSQL registers its own backend)
with a real state store as the head, real checkpoint files and real processes, and
reaches past the sink into its storage only the way an attacker or a failing disk would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import AuditSinkBackend

from authority_sdk.audit import (
    AuditSink,
    CheckpointFile,
    acknowledge,
    entry_hash,
    entry_mac,
    verify_sink,
)
from authority_sdk.errors import AuditIntegrityError, AuthorityUnavailable
from authority_sdk.store import DiskStore

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CTX = mp.get_context("fork")


@pytest.fixture
def head(tmp_path: Path) -> Iterator[DiskStore]:
    store = DiskStore(tmp_path / "state")
    yield store
    store.close()


def checkpoints(tmp_path: Path, key: bytes = KEY) -> CheckpointFile:
    return CheckpointFile(tmp_path / "elsewhere" / "audit.checkpoint", key)


def fill(sink: AuditSink, n: int, start: int = 0) -> list[dict[str, Any]]:
    return [sink.append("action", request_id=f"req_{i}", environment="prod",
                        decision="allow", reason=f"r{i} ✓", execution_result={"n": i})
            for i in range(start, start + n)]


def forge_next(last: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """A well-formed, correctly hashed entry after ``last``: all a forger without the key
    can make."""
    entry: dict[str, Any] = {
        "ts": "2030-01-01T00:00:00.000Z", "seq": last["seq"] + 1, "event": "action",
        "request_id": "req_forged", "environment": "prod", "model": None,
        "action_type": "issue_refund", "decision": "allow", "reason": "looks legit",
        "cost_estimate_usd": None, "cost_actual_usd": None, "approval_status": None,
        "execution_result": {"status": "executed"}, "actor": "gateway", "policy_hash": None,
        "prev_hash": last["hash"]}
    entry["hash"] = entry_hash(last["hash"], entry)
    if key is not None:
        entry["mac"] = entry_mac(key, entry["hash"])
    return entry


# --------------------------------------------------------------------------- appending


def test_entries_read_back_in_order_and_verify(audit_backend: AuditSinkBackend,
                                               head: DiskStore) -> None:
    sink = audit_backend.open(head=head)
    written = fill(sink, 25)
    sink.close()
    records = list(audit_backend.open().records())
    assert [r.entry for r in records] == written
    assert [e["seq"] for e in written] == list(range(1, 26))
    assert head.get_audit_head() == (25, written[-1]["hash"])
    newest_first = list(audit_backend.open().records_before(None))
    assert [r.entry["seq"] for r in newest_first if r.entry] == list(range(25, 0, -1))
    older = list(audit_backend.open().records_before(newest_first[4].position))
    assert [r.entry["seq"] for r in older if r.entry] == list(range(20, 0, -1))
    result = verify_sink(audit_backend.open(), head.get_audit_head())
    assert (result.ok, result.entries, result.last_hash) == (True, 25, written[-1]["hash"])


def test_append_many_is_one_contiguous_batch(audit_backend: AuditSinkBackend) -> None:
    sink = audit_backend.open()
    fill(sink, 2)
    batch = sink.append_many([("request", {"request_id": "r"}),
                              ("action", {"request_id": "r", "action_type": "a"})])
    assert [e["seq"] for e in batch] == [3, 4]
    assert batch[1]["prev_hash"] == batch[0]["hash"]
    assert sink.append_many([]) == []


def _writer(backend: AuditSinkBackend, state: Path, n: int, barrier: Any) -> None:
    store = DiskStore(state)
    sink = backend.open(head=store, key=KEY)
    barrier.wait()
    fill(sink, n)
    sink.close()
    store.close()


def test_concurrent_processes_keep_one_chain(audit_backend: AuditSinkBackend,
                                             tmp_path: Path) -> None:
    barrier = CTX.Barrier(4)
    procs = [CTX.Process(target=_writer, args=(audit_backend, tmp_path / "state", 40, barrier))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = DiskStore(tmp_path / "state")
    try:
        result = verify_sink(audit_backend.open(key=KEY), store.get_audit_head())
        assert (result.ok, result.last_seq) == (True, 160), result.reason
        assert store.get_audit_head() == (160, result.last_hash)
    finally:
        store.close()


# --------------------------------------------------------------------------- the key


def test_every_entry_carries_a_mac_under_the_key(audit_backend: AuditSinkBackend) -> None:
    written = fill(audit_backend.open(key=KEY), 3)
    assert all(e["mac"] == entry_mac(KEY, e["hash"]) for e in written)
    assert verify_sink(audit_backend.open(key=KEY)).ok
    wrong = verify_sink(audit_backend.open(key=OTHER_KEY))
    assert (wrong.ok, wrong.kind, wrong.first_bad_line) == (False, "tampered", 1)
    assert "MAC mismatch at seq 1" in (wrong.reason or "")


@pytest.mark.parametrize("forger_key", [None, OTHER_KEY], ids=["no-mac", "wrong-key"])
def test_a_forged_appended_entry_fails_when_keyed(audit_backend: AuditSinkBackend,
                                                  head: DiskStore,
                                                  forger_key: bytes | None) -> None:
    sink = audit_backend.open(head=head, key=KEY)
    written = fill(sink, 4)
    sink.close()
    audit_backend.append_raw(forge_next(written[-1], forger_key))
    # The hash chain alone cannot tell: the forgery is correctly linked and hashed.
    assert verify_sink(audit_backend.open()).ok
    result = verify_sink(audit_backend.open(key=KEY), head.get_audit_head())
    assert (result.ok, result.kind, result.first_bad_line) == (False, "tampered", 5)
    assert ("no MAC" if forger_key is None else "MAC mismatch") in (result.reason or "")
    with pytest.raises(AuditIntegrityError, match="not because of a recorded loss"):
        acknowledge(audit_backend.open(head=head, key=KEY), head, by="eve", reason="hide it")


# --------------------------------------------------------------------------- losses


def test_a_lost_tail_is_recorded_exactly_and_fails_until_acknowledged(
        audit_backend: AuditSinkBackend, head: DiskStore) -> None:
    sink = audit_backend.open(head=head, key=KEY)
    written = fill(sink, 9)
    sink.close()
    audit_backend.drop_last(3)  # entries 7..9 were synced and recorded in the head: lost
    before = verify_sink(audit_backend.open(key=KEY), head.get_audit_head())
    assert (before.ok, before.kind) == (False, "tampered")
    assert "truncated" in (before.reason or "")

    sink = audit_backend.open(head=head, key=KEY).open()  # a restart
    recovery = audit_backend.raw_entries()[-1]
    assert recovery["event"] == "recovery"
    assert recovery["details"]["problem"] == "lost_entries"
    assert recovery["details"]["lost"] == [7, 9]
    assert recovery["details"]["known_hash"] == written[-1]["hash"]
    assert (recovery["seq"], recovery["prev_hash"]) == (10, written[5]["hash"])
    after = fill(sink, 1, start=100)[0]
    assert after["seq"] == 11 and head.get_audit_head() == (11, after["hash"])
    result = verify_sink(audit_backend.open(key=KEY), head.get_audit_head())
    assert (result.ok, result.kind, result.first_bad_line) == (False, "lost", 7)
    assert "entries 7..9 lost" in (result.reason or "")

    losses, ack = acknowledge(sink, head, by="alice@ops", reason="restored disk; INC-42")
    assert [(loss.seq, loss.lost) for loss in losses] == [(10, (7, 9))]
    assert ack is not None
    assert (ack["actor"], ack["reason"]) == ("alice@ops", "restored disk; INC-42")
    assert ack["details"] == {"problem": "acknowledged", "acknowledges": [10],
                              "ranges": [[7, 9]]}
    assert ack["mac"] == entry_mac(KEY, ack["hash"])
    result = verify_sink(audit_backend.open(key=KEY), head.get_audit_head())
    assert result.ok, result.reason
    assert any("acknowledged by alice@ops" in w for w in result.warnings)


def test_a_forged_acknowledgement_does_not_settle_a_loss(audit_backend: AuditSinkBackend,
                                                         head: DiskStore) -> None:
    sink = audit_backend.open(head=head, key=KEY)
    fill(sink, 5)
    sink.close()
    audit_backend.drop_last(2)
    audit_backend.open(head=head, key=KEY).open()
    recovery = audit_backend.raw_entries()[-1]
    fake = forge_next(recovery, None)
    fake.update(event="recovery", actor="eve", details={"problem": "acknowledged",
                                                         "acknowledges": [recovery["seq"]]})
    fake["hash"] = entry_hash(fake["prev_hash"], fake)
    audit_backend.append_raw(fake)
    assert verify_sink(audit_backend.open()).ok  # unkeyed, the hash chain cannot tell
    result = verify_sink(audit_backend.open(key=KEY))
    assert (result.ok, result.kind) == (False, "tampered")


def test_a_torn_never_synced_write_is_not_a_loss(audit_backend: AuditSinkBackend,
                                                 head: DiskStore) -> None:
    """What a crash mid-append leaves is neither in the head nor the checkpoint: it is set
    aside and the log verifies."""
    cps = checkpoints(audit_backend.directory)
    sink = audit_backend.open(head=head, key=KEY, checkpoints=cps, checkpoint_every=2)
    fill(sink, 4)
    sink.close()
    if audit_backend.name == "file":
        with audit_backend.path.open("ab") as f:
            f.write(b'{"ts":"2030-01-01T00:00:00.000Z","seq":5,"event":"act')
    sink = audit_backend.open(head=head, key=KEY, checkpoints=cps).open()
    fill(sink, 1)
    result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps), head.get_audit_head())
    assert result.ok, result.reason
    assert result.unacknowledged == ()


# --------------------------------------------------------------------------- checkpoints


def test_deleting_the_log_and_the_head_together_is_caught_by_the_checkpoint(
        audit_backend: AuditSinkBackend, tmp_path: Path) -> None:
    cps = checkpoints(tmp_path)
    store = DiskStore(tmp_path / "state")
    sink = audit_backend.open(head=store, key=KEY, checkpoints=cps, checkpoint_every=5)
    written = fill(sink, 12)
    cp = cps.read_signed()
    assert cp is not None and (cp.seq, cp.hash) == (10, written[9]["hash"])
    sink.close()  # at shutdown the checkpoint catches up with every entry
    cp = cps.read_signed()
    assert cp is not None and (cp.seq, cp.hash) == (12, written[-1]["hash"])
    store.close()

    # The attacker removes the log and the whole state folder (the head with it).
    audit_backend.delete_all()
    for p in sorted((tmp_path / "state").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    fresh = DiskStore(tmp_path / "state")
    try:
        assert fresh.get_audit_head() is None
        result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps), None)
        assert (result.ok, result.kind) == (False, "tampered")
        assert "checkpoint" in (result.reason or "") and "deleted" in (result.reason or "")

        # Restarted on the empty state, the sink records the loss against the checkpoint…
        sink = audit_backend.open(head=fresh, key=KEY, checkpoints=cps).open()
        first = audit_backend.raw_entries()[0]
        assert first["details"]["lost"] == [1, 12] and first["seq"] == 13
        assert "checkpoint" in first["details"]["known_from"]
        fill(sink, 2)
        result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps),
                             fresh.get_audit_head())
        assert (result.ok, result.kind) == (False, "lost")
        # …and a person's acknowledgement settles it, on the record.
        acknowledge(sink, fresh, by="bob", reason="host rebuilt after INC-9")
        sink.close()
        result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps),
                             fresh.get_audit_head())
        assert result.ok, result.reason
        cp = cps.read_signed()
        assert cp is not None and cp.seq == result.last_seq
    finally:
        fresh.close()


def test_a_forged_or_stale_checkpoint_is_refused(audit_backend: AuditSinkBackend,
                                                 tmp_path: Path) -> None:
    cps = checkpoints(tmp_path)
    sink = audit_backend.open(key=KEY, checkpoints=cps, checkpoint_every=1)
    fill(sink, 3)
    sink.close()
    data = json.loads(cps.path.read_text())
    assert cps.write(2, "00" * 32) is False  # never moves back
    data["seq"] = 1  # an attacker rolling it back to match a shortened log
    cps.path.write_text(json.dumps(data))
    result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps))
    assert (result.ok, result.kind) == (False, "tampered")
    assert "not signed" in (result.reason or "")
    with pytest.raises(AuthorityUnavailable, match="not signed"):
        audit_backend.open(key=KEY, checkpoints=cps).open()
    assert CheckpointFile(cps.path, OTHER_KEY).read() is not None
    with pytest.raises(AuthorityUnavailable, match="not signed"):
        CheckpointFile(cps.path, OTHER_KEY).read_signed()


# --------------------------------------------------------------------------- values


def test_a_huge_value_is_capped_and_says_how_much_was_cut(
        audit_backend: AuditSinkBackend) -> None:
    sink = audit_backend.open(key=KEY)
    entry = sink.append("request", model="m" * 4_000_000, reason="bad model",
                        details={"lone": "x\ud800y", "deep": _nest(2000), "n": 10 ** 5000,
                                 "nan": float("nan"), "many": list(range(100_000))})
    assert entry["model"].endswith(f"…[+{4_000_000 - 4096} chars]")
    assert entry["details"]["lone"] == "x\\ud800y"
    assert entry["details"]["n"].startswith("[integer of")
    assert entry["details"]["nan"] == "nan"
    assert entry["details"]["many"][-1].startswith("…[+")
    assert len(json.dumps(entry)) < 100_000
    assert [r.entry for r in audit_backend.open().records()] == [entry]
    assert verify_sink(audit_backend.open(key=KEY)).ok


def _nest(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": [value]}
    return value


def test_a_loss_is_recorded_once_however_many_writers_knew_of_it(
        audit_backend: AuditSinkBackend, tmp_path: Path, head: DiskStore) -> None:
    """Two writers that both appended past the cut, and a checkpoint still pointing into
    the lost range after a crash: one recovery entry, not one per witness."""
    cps = checkpoints(tmp_path)
    a = audit_backend.open(head=head, key=KEY, checkpoints=cps, checkpoint_every=3)
    b = audit_backend.open(head=head, key=KEY, checkpoints=cps, checkpoint_every=3)
    fill(a, 4)
    fill(b, 2)  # b knows seq 6; the checkpoint is at 6
    audit_backend.drop_last(3)
    fill(a, 1)  # a notices first: lost 4..6, recovery at 7, then its entry at 8
    fill(b, 1)  # b knew seq 6: already accounted for
    # A crash: no close, so the checkpoint still names seq 6, inside the lost range.
    c = audit_backend.open(head=head, key=KEY, checkpoints=cps).open()
    fill(c, 1)
    recoveries = [e for e in audit_backend.raw_entries() if e["event"] == "recovery"]
    assert [r["details"]["lost"] for r in recoveries] == [[4, 6]]
    result = verify_sink(audit_backend.open(key=KEY, checkpoints=cps), head.get_audit_head())
    assert (result.ok, result.kind, len(result.losses)) == (False, "lost", 1)

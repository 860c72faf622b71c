"""The hash-chained audit log: chain integrity, tamper detection, concurrency, crash recovery."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from authority_sdk.audit import (
    FIELDS,
    GENESIS_HASH,
    REDACTED,
    AuditHead,
    AuditLog,
    acknowledge,
    entry_hash,
    redact,
    tail,
    verify,
)
from authority_sdk.cli.audit_cmd import app as audit_app
from authority_sdk.errors import AuthorityUnavailable

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FileHead:
    """An AuditHead kept in a JSON file, so it is shared by processes like the real store."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get_audit_head(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return data["seq"], data["hash"]

    def set_audit_head(self, seq: int, hash: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": seq, "hash": hash}))
        os.replace(tmp, self.path)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def fill(path: Path, n: int, head: AuditHead | None = None) -> list[dict[str, Any]]:
    log = AuditLog(path, fsync=False, head=head)
    events = ["request", "action", "approval", "kill_switch", "replay"]
    out = [log.append(events[i % len(events)], request_id=f"req_{i}", environment="prod",
                      model="gpt-4o-mini", decision=["allow", "deny", "error", None][i % 4],
                      reason=f"reason {i} — ünïcødé ✓", cost_estimate_usd=0.001 * i,
                      execution_result={"ok": True, "n": i, "items": [1, 2.5, None]},
                      actor="tester", policy_hash="ab" * 32, approval_id=f"apr_{i}")
           for i in range(n)]
    log.close()
    return out


# --------------------------------------------------------------------------- the chain


def test_chain_over_many_entries(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = fill(path, 300)
    parsed = [json.loads(line) for line in lines_of(path)]
    assert parsed == written
    prev = GENESIS_HASH
    for i, entry in enumerate(parsed, start=1):
        assert set(entry) == set(FIELDS) | {"details"}
        assert entry["seq"] == i
        assert entry["prev_hash"] == prev
        assert entry["hash"] == entry_hash(prev, entry)
        assert TS_RE.match(entry["ts"])
        prev = entry["hash"]
    assert parsed[7]["details"] == {"approval_id": "apr_7"}
    assert parsed[7]["reason"] == "reason 7 — ünïcødé ✓"
    result = verify(path)
    assert (result.ok, result.entries, result.last_seq, result.last_hash) == (True, 300, 300, prev)


def test_hash_is_sha256_of_prev_hash_and_canonical_json(tmp_path: Path) -> None:
    import hashlib

    entry = AuditLog(tmp_path / "a.jsonl", fsync=False).append("request", reason="é")
    body = {k: v for k, v in entry.items() if k != "hash"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert entry["hash"] == hashlib.sha256((GENESIS_HASH + canon).encode()).hexdigest()
    assert entry["prev_hash"] == GENESIS_HASH
    assert all(entry[k] is None for k in FIELDS if k not in ("ts", "seq", "event", "reason",
                                                             "prev_hash", "hash"))
    assert "details" not in entry


def test_fields_validation_and_details(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False)
    with pytest.raises(ValueError, match="unknown audit event"):
        log.append("bogus")
    with pytest.raises(ValueError, match="assigned by the audit log"):
        log.append("request", seq=5)
    with pytest.raises(ValueError, match="decision"):
        log.append("request", decision="maybe")
    with pytest.raises(ValueError, match="both"):
        log.append("action", mode="auto", details={"mode": "deny"})
    entry = log.append("action", action_key="ak", details={"status": "executed"},
                       execution_result=("a", 1), code=Path("/x"))
    assert entry["details"] == {"status": "executed", "action_key": "ak", "code": "/x"}
    assert entry["execution_result"] == ["a", 1]
    assert entry["seq"] == 1  # the rejected calls wrote nothing
    assert verify(log.path).ok


def test_values_json_cannot_represent_exactly_still_verify(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False)
    log.append("action", execution_result={3: "int key", "t": (1, 2)}, weird=object(),
               text="lone surrogate \ud800 and emoji 🎉")
    log.append("request", cost_estimate_usd=float("nan"))
    assert verify(log.path).ok


# --------------------------------------------------------------------------- tampering


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _forge(prev_hash: str, seq: int, **fields: Any) -> bytes:
    entry: dict[str, Any] = dict.fromkeys(FIELDS)
    entry.update(ts="2024-01-01T00:00:00.000Z", seq=seq, event="request", prev_hash=prev_hash,
                 **fields)
    entry["hash"] = entry_hash(prev_hash, entry)
    return (json.dumps(entry) + "\n").encode()


def test_intact_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    assert verify(path).ok


def test_edit_a_field_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    entry = json.loads(lines[4])
    entry["decision"] = "allow" if entry["decision"] != "allow" else "deny"
    lines[4] = (json.dumps(entry) + "\n").encode()
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert "altered" in (result.reason or "")


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    entry = json.loads(lines[4])
    entry["cost_estimate_usd"] = 0.0
    entry["hash"] = entry_hash(entry["prev_hash"], entry)
    lines[4] = (json.dumps(entry) + "\n").encode()
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert "prev_hash" in (result.reason or "")


def test_deleted_middle_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    del lines[5]
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert "gap" in (result.reason or "")


def test_inserted_forged_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    third = json.loads(lines[2])
    # A self-consistent entry chained onto line 3, slipped in before line 4.
    lines.insert(3, _forge(third["hash"], 4, reason="forged"))
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 5)
    assert "out of order" in (result.reason or "")


def test_swapped_lines_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    lines[6], lines[7] = lines[7], lines[6]
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line) == (False, 7)


def test_garbage_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 12)
    lines = lines_of(path)
    lines.insert(8, b"this is not json\n")
    _rewrite(path, lines)
    result = verify(path)
    assert (result.ok, result.first_bad_line, result.reason) == (False, 9, "not valid JSON")


def test_extra_or_missing_keys_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 3)
    lines = lines_of(path)
    entry = json.loads(lines[1])
    entry["sneaky"] = 1
    lines[1] = (json.dumps(entry) + "\n").encode()
    _rewrite(path, lines)
    assert verify(path).reason == "unknown fields: sneaky"


def test_truncation_is_detected_only_with_the_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    written = fill(path, 12, head=head)
    assert head.get_audit_head() == (12, written[-1]["hash"])
    assert verify(path, head.get_audit_head()).ok
    _rewrite(path, lines_of(path)[:9])
    assert verify(path).ok  # the chain alone cannot see a clean cut
    result = verify(path, head.get_audit_head())
    assert (result.ok, result.first_bad_line) == (False, 10)
    assert "truncated" in (result.reason or "")


def test_truncate_then_reforge_the_tail_is_detected_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    fill(path, 12, head=head)
    lines = lines_of(path)[:9]
    prev = json.loads(lines[-1])["hash"]
    for seq in (10, 11, 12):
        lines.append(_forge(prev, seq, reason="rewritten"))
        prev = json.loads(lines[-1])["hash"]
    _rewrite(path, lines)
    assert verify(path).ok
    result = verify(path, head.get_audit_head())
    assert (result.ok, result.first_bad_line) == (False, 12)
    assert "rewritten" in (result.reason or "")


def test_missing_file(tmp_path: Path) -> None:
    result = verify(tmp_path / "nope.jsonl")
    assert not result.ok
    assert "cannot read" in (result.reason or "")


# --------------------------------------------------------------------------- the head


def test_reopened_log_after_truncation_records_exactly_the_lost_range(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    written = fill(path, 10, head=head)
    _rewrite(path, lines_of(path)[:7])
    log = AuditLog(path, fsync=False, head=head)
    entry = log.append("request", request_id="after")
    recovery = json.loads(lines_of(path)[7])
    assert recovery["event"] == "recovery"
    assert recovery["details"] == {"problem": "lost_entries", "lost": [8, 10],
                                   "known_from": "the state store's head",
                                   "known_hash": written[-1]["hash"], "log_seq": 7,
                                   "log_hash": written[6]["hash"]}
    # The seq moves on past what was lost, so the forward-only head can follow.
    assert (recovery["seq"], recovery["prev_hash"]) == (11, written[6]["hash"])
    assert entry["seq"] == 12 and head.get_audit_head() == (12, entry["hash"])
    result = verify(path, head.get_audit_head())
    assert (result.ok, result.kind, result.first_bad_line) == (False, "lost", 8)
    assert "entries 8..10 lost" in (result.reason or "")

    losses, ack = acknowledge(log, head, by="alice", reason="disk replaced; see INC-7")
    assert [loss.lost for loss in losses] == [(8, 10)]
    assert ack is not None and ack["actor"] == "alice"
    assert ack["details"]["acknowledges"] == [11]
    result = verify(path, head.get_audit_head())
    assert result.ok, result.reason
    assert any("acknowledged by alice" in w for w in result.warnings)
    assert acknowledge(log, head, by="alice", reason="again") == ([], None)


def test_rewritten_log_behind_the_head_is_recorded_and_fails_until_acknowledged(
        tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    fill(path, 4, head=head)
    stored = head.get_audit_head()
    path.unlink()
    fill(path, 6)  # a different, self-consistent chain, longer than the head
    assert verify(path).ok
    result = verify(path, stored)
    assert (result.ok, result.kind) == (False, "tampered")
    assert "rewritten" in (result.reason or "")
    log = AuditLog(path, fsync=False, head=head)
    log.open()
    recovery = json.loads(lines_of(path)[-1])
    assert recovery["details"]["problem"] == "rewritten"
    assert recovery["details"]["known_seq"] == 4
    assert verify(path, head.get_audit_head()).kind == "lost"
    acknowledge(log, head, by="bob", reason="restored from backup")
    assert verify(path, head.get_audit_head()).ok


def test_log_one_entry_ahead_of_head_is_a_crash_window_not_tampering(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    fill(path, 5, head=head)
    AuditLog(path, fsync=False).append("request")  # wrote, but never recorded the head
    result = verify(path, head.get_audit_head())
    assert result.ok
    assert result.warnings and "after the head" in result.warnings[0]
    log = AuditLog(path, fsync=False, head=head)
    entry = log.append("request")
    assert entry["seq"] == 7
    assert [json.loads(x)["event"] for x in lines_of(path)].count("recovery") == 0
    assert head.get_audit_head() == (7, entry["hash"])


# --------------------------------------------------------------------------- concurrency


def _writer(path: str, head_path: str, writer: int, n: int, start: Any) -> None:
    log = AuditLog(path, fsync=False, head=FileHead(Path(head_path)))
    start.wait()
    for i in range(n):
        log.append("action", request_id=f"w{writer}", writer=writer, i=i, pad="x" * (i % 97))


def test_concurrent_appends_from_processes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head_path = tmp_path / "head.json"
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), str(head_path), w, 200, start))
             for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify(path, FileHead(head_path).get_audit_head())
    assert result.ok, result.reason
    assert result.entries == 800
    seen: dict[int, list[int]] = {w: [] for w in range(4)}
    for line in lines_of(path):
        details = json.loads(line)["details"]
        seen[details["writer"]].append(details["i"])
    assert all(seen[w] == list(range(200)) for w in range(4))


def test_concurrent_appends_from_threads(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False)
    threads = [threading.Thread(target=lambda w=w: [log.append("request", w=w, i=i)
                                                    for i in range(150)])
               for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify(log.path)
    assert (result.ok, result.entries) == (True, 600)


def test_two_logs_on_one_file_in_one_process_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    a, b = AuditLog(path, fsync=False), AuditLog(path, fsync=False)
    for i in range(20):
        (a if i % 3 else b).append("request", i=i)
    assert verify(path).entries == 20


# --------------------------------------------------------------------------- crash recovery


def test_torn_last_line_becomes_a_recovery_entry(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 6)
    good_size = path.stat().st_size
    half = b'{"ts":"2024-01-01T00:00:00.000Z","seq":7,"event":"req'
    with open(path, "ab") as f:
        f.write(half)
    broken = verify(path)
    assert (broken.ok, broken.first_bad_line) == (False, 7)

    log = AuditLog(path, fsync=True).open()
    assert path.stat().st_size > good_size
    recovery = json.loads(lines_of(path)[6])
    assert recovery["event"] == "recovery" and recovery["seq"] == 7
    assert recovery["details"] == {"problem": "torn_line", "offset": good_size,
                                   "length": len(half), "torn": half.decode(),
                                   "torn_truncated": False}
    log.append("request", request_id="next")
    result = verify(path)
    assert (result.ok, result.entries) == (True, 8)
    assert len(result.warnings) == 1


def test_process_killed_mid_write_holding_the_lock(tmp_path: Path) -> None:
    """A writer dies holding the lock with half a line written; the next opener recovers."""
    path = tmp_path / "a.jsonl"
    fill(path, 3)
    ctx = mp.get_context("fork")
    ready = ctx.Event()

    def die_mid_write() -> None:
        # What an append does, stopped half-way: take the sibling lock, write part of a line.
        with FileLock(str(path) + ".lock"), open(path, "ab", buffering=0) as f:
            f.write(b'{"ts":"2024-01-01T00:00:00.000Z","seq":4,"ev')
            ready.set()
            threading.Event().wait(60)

    child = ctx.Process(target=die_mid_write)
    child.start()
    assert ready.wait(30)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    entry = AuditLog(path, fsync=False).append("request", request_id="survivor")
    assert entry["seq"] == 5
    events = [json.loads(x)["event"] for x in lines_of(path)]
    assert events[3] == "recovery"
    assert verify(path).ok


def test_torn_line_after_a_huge_entry(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, fsync=False)
    big = log.append("action", execution_result={"blob": "é" * 300_000})
    log.close()
    with open(path, "ab") as f:
        f.write(b"x" * 10_000)
    entry = AuditLog(path, fsync=False).append("request")
    recovery = tail(path, 2)[0]
    assert recovery["details"]["length"] == 10_000
    assert recovery["details"]["torn_truncated"] is True
    assert len(recovery["details"]["torn"]) == 4096
    assert recovery["prev_hash"] == big["hash"]
    assert entry["seq"] == 3
    assert verify(path).ok


def test_garbage_complete_last_line_is_moved_aside_but_two_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    fill(path, 2)
    with open(path, "ab") as f:
        f.write(b"\x00\x00garbage\n")
    AuditLog(path, fsync=False).append("request")
    assert json.loads(lines_of(path)[2])["details"]["torn"] == "\x00\x00garbage\n"
    assert verify(path).ok

    with open(path, "ab") as f:
        f.write(b"junk one\njunk two\n")
    size = path.stat().st_size
    with pytest.raises(AuthorityUnavailable, match="corrupt"):
        AuditLog(path, fsync=False).append("request")
    assert path.stat().st_size == size  # nothing rewritten


# --------------------------------------------------------------------------- failures


def test_unwritable_path_raises_authority_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(AuthorityUnavailable, match="audit log unavailable"):
        AuditLog(blocker / "audit.jsonl").append("request")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    with pytest.raises(AuthorityUnavailable, match="audit log unavailable"):
        AuditLog(a_dir).append("request")


def test_log_removed_while_open_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, fsync=False)
    first = log.append("request")
    log.append("request")
    path.unlink()
    entry = log.append("request")
    # The process knows what it wrote: the new file starts by recording the two lost entries.
    recovery = json.loads(lines_of(path)[0])
    assert recovery["details"]["lost"] == [1, 2] and recovery["seq"] == 3
    assert recovery["prev_hash"] == GENESIS_HASH != first["hash"]
    assert entry["seq"] == 4
    result = verify(path)
    assert (result.ok, result.kind, result.last_seq) == (False, "lost", 4)


def test_head_store_failure_raises_authority_unavailable(tmp_path: Path) -> None:
    class BrokenHead:
        def get_audit_head(self) -> tuple[int, str] | None:
            return None

        def set_audit_head(self, seq: int, hash: str) -> None:
            raise OSError("disk gone")

    with pytest.raises(AuthorityUnavailable, match="head"):
        AuditLog(tmp_path / "a.jsonl", head=BrokenHead()).append("request")


# --------------------------------------------------------------------------- redaction


def test_redact_replaces_named_keys_at_any_depth() -> None:
    original = {
        "card_number": "4111", "amount": 5,
        "nested": {"Password": "hunter2", "list": [{"card_number": "x"}, ("a", {"password": 1})]},
        "arguments": json.dumps({"card_number": "4111", "order": 7}),
        "other": '{"not": "secret"}', "broken": "{card_number",
    }
    snapshot = json.loads(json.dumps(original))
    out = redact(original, ["card_number", "password"])
    assert out["card_number"] == REDACTED and out["amount"] == 5
    assert out["nested"]["Password"] == REDACTED
    assert out["nested"]["list"][0] == {"card_number": REDACTED}
    assert out["nested"]["list"][1] == ("a", {"password": REDACTED})
    assert json.loads(out["arguments"]) == {"card_number": REDACTED, "order": 7}
    assert out["other"] == '{"not": "secret"}' and out["broken"] == "{card_number"
    assert json.loads(json.dumps(original)) == snapshot  # pure
    assert redact(original, []) is original


def test_log_with_redaction_never_writes_the_secret(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", fsync=False, redact=["card_number"])
    log.append("action", action_type="pay",
               arguments=json.dumps({"card_number": "4111111111111111"}),
               execution_result={"echo": {"card_number": "4111111111111111"}})
    assert b"4111111111111111" not in log.path.read_bytes()
    assert verify(log.path).ok


# --------------------------------------------------------------------------- tail


def test_tail_reads_the_last_entries(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    written = fill(path, 50)
    assert tail(path, 5) == written[-5:]
    assert tail(path, 500) == written
    assert tail(path, 0) == []
    with open(path, "ab") as f:
        f.write(b'{"partial')
    last = tail(path, 2)
    assert last[0] == written[-1]
    assert last[1] == {"invalid_line": '{"partial', "offset": path.stat().st_size - 9}


# --------------------------------------------------------------------------- CLI


runner = CliRunner()


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    written = fill(path, 8)
    ok = runner.invoke(audit_app, ["verify", "--file", str(path)])
    assert ok.exit_code == 0, ok.output
    assert f"ok: 8 entries, head seq 8 hash {written[-1]['hash'][:16]}" in ok.stdout
    lines = lines_of(path)
    del lines[2]
    _rewrite(path, lines)
    bad = runner.invoke(audit_app, ["verify", "--file", str(path)])
    assert bad.exit_code == 1
    assert "line 3" in bad.stderr and "gap" in bad.stderr
    missing = runner.invoke(audit_app, ["verify", "--file", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1


def test_cli_verify_with_policy_uses_the_store_head(tmp_path: Path) -> None:
    store_mod = pytest.importorskip("authority_sdk.store")
    from authority_sdk.policy import load_policy

    policy_file = tmp_path / "authority.yaml"
    policy_file.write_text("version: 1\naudit: {path: audit.jsonl, fsync: false}\n"
                           "state: {path: state}\n")
    policy = load_policy(policy_file)
    store = store_mod.open_store(policy)
    try:
        log = AuditLog.for_policy(policy, head=store)
        for i in range(6):
            log.append("request", request_id=f"r{i}")
        log.close()
    finally:
        store.close()
    ok = runner.invoke(audit_app, ["verify", "--policy", str(policy_file)])
    assert ok.exit_code == 0, ok.output
    assert "ok: 6 entries" in ok.stdout and "checked: head" in ok.stdout

    _rewrite(policy.audit_path, lines_of(policy.audit_path)[:4])
    cut = runner.invoke(audit_app, ["verify", "--policy", str(policy_file)])
    assert cut.exit_code == 1
    assert "truncated" in cut.stderr
    # Naming the file alone cannot know the head, and says so.
    alone = runner.invoke(audit_app, ["verify", "--file", str(policy.audit_path)])
    assert alone.exit_code == 0 and "head, key and checkpoint not checked" in alone.stderr


def test_cli_tail(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    written = fill(path, 30)
    raw = runner.invoke(audit_app, ["tail", "--file", str(path), "-n", "3", "--json"])
    assert raw.exit_code == 0, raw.output
    assert [json.loads(x) for x in raw.stdout.splitlines()] == written[-3:]
    table = runner.invoke(audit_app, ["tail", "--file", str(path), "-n", "4"],
                          env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "req_29" in table.stdout and "req_25" not in table.stdout
    missing = runner.invoke(audit_app, ["tail", "--file", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1


def test_a_cut_tail_ending_in_a_torn_line_records_both_and_the_chain_holds(
        tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    head = FileHead(tmp_path / "head.json")
    written = fill(path, 8, head=head)
    _rewrite(path, lines_of(path)[:5])
    with open(path, "ab") as f:
        f.write(b'{"ts":"2030-01-01T00:00:00.000Z","seq":6,"ev')
    AuditLog(path, fsync=False, head=head).append("request", request_id="after")
    entries = [json.loads(x) for x in lines_of(path)]
    assert [(e["seq"], (e.get("details") or {}).get("problem")) for e in entries[5:]] == [
        (9, "lost_entries"), (10, "torn_line"), (11, None)]
    assert entries[5]["prev_hash"] == written[4]["hash"]
    result = verify(path, head.get_audit_head())
    assert (result.ok, result.kind, result.first_bad_line) == (False, "lost", 6)

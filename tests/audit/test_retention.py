"""Retention: archived files past the period are deleted after a retention entry and a
signed prune record say where the kept chain starts; verify then passes from the oldest
kept file, tells a pruned start from a deleted file, and refuses a forged record. Only
checkpointed and streamed entries go; a crash at each step (real SIGKILL) is recoverable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from authority_sdk.audit import FileSink, open_sink, verify_sink
from authority_sdk.audit.crashpoints import CRASH_ENV
from authority_sdk.audit.retention import prune
from authority_sdk.cli.audit_cmd import app
from authority_sdk.policy import Policy, load_policy
from authority_sdk.store import open_store

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
KEY = "retention-audit-key-0123456789"
LATER = 10 * 86400.0  # "now" for pruning: everything written is 10 days old


def _policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **audit: object) -> Policy:
    monkeypatch.setenv("RET_AUDIT_KEY", KEY)
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "state": {"path": "run/state"}, "audit": {
        "path": "run/audit.jsonl", "fsync": False, "rotate": {"max_bytes": 1500},
        "retention": "1d", "hmac_key_env": "RET_AUDIT_KEY", **audit}}))
    return load_policy(path)


def _fill(policy: Policy, n: int, start: int = 0) -> None:
    store = open_store(policy)
    s = open_sink(policy, store)
    for i in range(start, start + n):
        s.append("request", request_id=f"r{i}", decision="allow", reason="padding " * 6)
    s.close()
    store.close()


def _verify(policy: Policy) -> object:
    store = open_store(policy)
    try:
        return verify_sink(open_sink(policy), store.get_audit_head())
    finally:
        store.close()


def test_prune_then_verify_from_the_oldest_kept_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _policy(tmp_path, monkeypatch)
    _fill(policy, 40)
    s = open_sink(policy)
    assert isinstance(s, FileSink)
    archives = s.archives()
    result = prune(s, older_than_s=86400, now=time.time() + LATER)
    assert result.pruned_through == archives[-1].last
    assert list(result.deleted) == [a.name for a in archives]
    assert s.archives() == []
    record = s.prune_record()
    assert record is not None and record.seq == archives[-1].last
    assert record.signed_by(KEY.encode())
    retention = [r.entry for r in s.records() if r.entry and r.entry["event"] == "retention"]
    assert retention and retention[0]["details"]["pruned_through"] == record.seq
    assert "mac" in retention[0]
    verdict = _verify(policy)
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]
    assert any("deleted by retention" in w for w in verdict.warnings)  # type: ignore[attr-defined]
    _fill(policy, 30, 40)  # the chain goes on, rotates again, still verifies
    verdict = _verify(policy)
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]


def test_recent_files_and_unsafe_entries_are_kept(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _policy(tmp_path, monkeypatch)
    _fill(policy, 40)
    s = open_sink(policy)
    assert isinstance(s, FileSink)
    before = s.archives()
    assert prune(s, older_than_s=86400).deleted == ()  # nothing is a day old yet
    held = prune(s, older_than_s=86400, keep_after=before[1].last, now=time.time() + LATER)
    assert list(held.deleted) == [a.name for a in before[:2]]  # up to the safe seq, no further
    assert held.held_back and "not yet checkpointed or streamed" in held.held_back
    assert _verify(policy).ok  # type: ignore[attr-defined]


def test_pruning_waits_for_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from authority_sdk.audit.lifecycle import safe_seq

    policy = _policy(tmp_path, monkeypatch, checkpoint_path=str(tmp_path / "cp" / "audit.cp"),
                     checkpoint_every=10_000)
    _fill(policy, 5)  # the checkpoint is written at close: seq 5
    _fill(policy, 30, 5)
    s = open_sink(policy)
    assert safe_seq(policy, s) == 35
    # Checkpoint behind: nothing past it goes.
    policy2 = _policy(tmp_path, monkeypatch, checkpoint_path=str(tmp_path / "cp2" / "a.cp"))
    s2 = open_sink(policy2)
    assert safe_seq(policy2, s2) == 0
    assert prune(s2, older_than_s=1, keep_after=0, now=time.time() + LATER).deleted == ()


def test_a_deleted_oldest_file_is_not_mistaken_for_retention(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _policy(tmp_path, monkeypatch)
    _fill(policy, 60)
    s = open_sink(policy)
    assert isinstance(s, FileSink)
    a = s.archives()
    prune(s, older_than_s=86400, keep_after=a[0].last, now=time.time() + LATER)
    assert _verify(policy).ok  # type: ignore[attr-defined]
    s.archives()[0].path.unlink()  # deleted by hand: not what the record says
    verdict = _verify(policy)
    assert not verdict.ok  # type: ignore[attr-defined]
    assert "the prune record accounts only for entries up to seq" in verdict.reason  # type: ignore[attr-defined]


def test_a_forged_prune_record_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    policy = _policy(tmp_path, monkeypatch)
    _fill(policy, 40)
    s = open_sink(policy)
    assert isinstance(s, FileSink)
    first = s.archives()[0]
    first_entries = first.path.read_text().splitlines()
    last = json.loads(first_entries[-1])
    first.path.unlink()
    # Without the key: a record naming exactly the deleted file's end, but unsigned.
    s.prune_record_path.write_text(json.dumps({"seq": last["seq"], "hash": last["hash"],
                                               "ts": "2026-01-01T00:00:00Z", "files": []}))
    verdict = _verify(policy)
    assert not verdict.ok and "prune record is not signed" in verdict.reason  # type: ignore[attr-defined]
    # Signed by someone holding the key, but the chain has no retention entry confirming it.
    from authority_sdk.audit.pruned import write_prune_record

    write_prune_record(s.prune_record_path, last["seq"], last["hash"], "2026-01-01T00:00:00Z",
                       [], KEY.encode())
    verdict = _verify(policy)
    assert not verdict.ok and "not confirmed by a retention entry" in verdict.reason  # type: ignore[attr-defined]


def test_cli_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _policy(tmp_path, monkeypatch, retention="1s")
    _fill(policy, 30)
    time.sleep(1.1)
    pol_file = str(tmp_path / "authority.yaml")
    out = runner.invoke(app, ["prune", "--policy", pol_file])
    assert out.exit_code == 0, out.output
    assert "pruned through seq" in out.stdout
    ok = runner.invoke(app, ["verify", "--policy", pol_file])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("step", ["prune:after_entry", "prune:after_record",
                                  "prune:after_delete_one"])
def test_a_crash_at_each_prune_step_is_recoverable(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   step: str) -> None:
    policy = _policy(tmp_path, monkeypatch)
    _fill(policy, 60)
    code = ("import sys, time\n"
            "from authority_sdk.audit import open_sink\n"
            "from authority_sdk.audit.retention import prune\n"
            "from authority_sdk.policy import load_policy\n"
            "s = open_sink(load_policy(sys.argv[1]))\n"
            f"prune(s, older_than_s=86400, now=time.time() + {LATER})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), CRASH_ENV: step, "RET_AUDIT_KEY": KEY}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "authority.yaml")],
                          env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    verdict = _verify(policy)
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]
    s = open_sink(policy)
    assert isinstance(s, FileSink)
    prune(s, older_than_s=86400, now=time.time() + LATER)  # the next prune finishes the job
    _fill(policy, 5, 100)
    verdict = _verify(policy)
    assert verdict.ok, verdict.reason  # type: ignore[attr-defined]
    assert s.archives() == [] or s.archives()[0].first > (s.prune_record() or object()).seq  # type: ignore[attr-defined]


def test_postgres_table_retention(tmp_path: Path) -> None:
    """The table's oldest rows go in the transaction that appends the retention entry; that
    MAC'd entry is the prune record, and verify starts the chain right after it."""
    from helpers import PostgresAuditBackend

    from authority_sdk.audit.checkpoint import CheckpointFile

    backend = PostgresAuditBackend(tmp_path)
    try:
        key = KEY.encode()
        checkpoints = CheckpointFile(tmp_path / "cp" / "audit.cp", key)
        sink = backend.open(key=key, checkpoints=checkpoints, checkpoint_every=6)
        for i in range(10):
            sink.append("request", request_id=f"r{i}")
        assert prune(sink, older_than_s=86400).deleted == ()  # nothing a day old yet
        result = prune(sink, older_than_s=86400, keep_after=6, now=time.time() + LATER)
        assert result.pruned_through == 6 and result.held_back
        rows = backend.raw_entries()
        assert [e["seq"] for e in rows] == list(range(7, 12))
        assert rows[-1]["event"] == "retention" and rows[-1]["details"]["pruned_through"] == 6
        verdict = verify_sink(sink)
        assert verdict.ok, verdict.reason
        assert any("deleted by retention" in w for w in verdict.warnings)
        # A new writer compares the checkpoint (seq 6, now deleted) with the retention
        # entry's record of it: no false loss.
        assert checkpoints.read() is not None and checkpoints.read().seq == 6  # type: ignore[union-attr]
        again = backend.open(key=key, checkpoints=checkpoints, checkpoint_every=6)
        again.open()
        again.append("request", request_id="after")
        assert not [e for e in backend.raw_entries() if e["event"] == "recovery"]
        assert verify_sink(again).ok
        # Rows deleted by hand past what retention recorded: the chain starts too late.
        backend._sql("DELETE FROM authority_audit WHERE seq = 7")
        verdict = verify_sink(again)
        assert not verdict.ok
        assert "accounts only for entries up to seq 6" in (verdict.reason or "")
        again.close()
        sink.close()
    finally:
        backend.cleanup()


def test_the_worker_rotates_prunes_and_streams_on_its_own(
        write_policy: Any, tmp_path: Path) -> None:
    """Only the lease holder runs the lifecycle; one tick rotates an aged file, compresses,
    prunes what is past retention and streamed, and sends the rest."""
    from servers import HttpReceiver

    from authority_sdk.engine import Engine
    from authority_sdk.worker import Worker

    with HttpReceiver() as rx:
        eng = Engine(write_policy({"audit": {
            "rotate": {"max_bytes": 1200, "compress": True}, "retention": "1s",
            "stream": [{"kind": "http", "url": rx.url("/audit"), "name": "siem"}]}}))
        try:
            for i in range(20):
                eng.audit.append("request", request_id=f"r{i}", reason="padding " * 6)
            sink = eng.audit
            assert isinstance(sink, FileSink) and len(sink.archives()) >= 3
            worker = Worker(eng)
            worker._lifecycle.prune_every_s = 0  # every tick (the default waits minutes)
            first = worker.tick()  # streams everything; nothing is a second old yet
            assert first["leader"] and "pruned" not in first["audit_lifecycle"]
            assert all(a.compressed for a in sink.archives())
            time.sleep(1.1)
            report = worker.tick()["audit_lifecycle"]
            assert report["pruned"]["pruned_through"] >= 1
            assert sink.prune_record() is not None
            verdict = verify_sink(sink, eng.store.get_audit_head())
            assert verdict.ok, verdict.reason
            got = [e["seq"] for req in rx.requests for e in json.loads(req.body)["entries"]]
            assert got == list(range(1, len(got) + 1)) and len(got) >= 20
        finally:
            eng.close()


@pytest.mark.parametrize(("audit", "message"), [
    ({"retention": "30d"}, "retention deletes archived files: it needs rotate"),
    ({"backend": "postgres", "rotate": {"max_bytes": 10}}, "rotate and archive_dir apply to"),
    ({"rotate": {}}, "rotate needs max_bytes, every, or both"),
    ({"rotate": {"every": "1 day"}}, "is not a duration"),
    ({"stream": [{"kind": "syslog", "address": "siem"}]}, "give host:port"),
    ({"stream": [{"kind": "http", "url": "http://a", "name": "x"},
                 {"kind": "http", "url": "http://b", "name": "x"}]}, "share a name"),
])
def test_the_policy_refuses_lifecycle_settings_that_cannot_work(
        audit: dict[str, Any], message: str) -> None:
    from authority_sdk.policy import AuditConfig

    with pytest.raises(ValueError, match=message):
        AuditConfig(**audit)

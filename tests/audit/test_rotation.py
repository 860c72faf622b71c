"""Rotation of the JSONL audit log: the chain runs on across archived files, and verify
(the CLI included) checks it across them; tampering with an archived file, a missing
middle file, a crash at each step of a rotation (real SIGKILL), and two processes
appending across rotations."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from authority_sdk.audit import FileSink, open_sink, verify_sink
from authority_sdk.audit.crashpoints import CRASH_ENV
from authority_sdk.cli.audit_cmd import app
from authority_sdk.policy import AuditRotate, Policy, load_policy
from authority_sdk.store import open_store

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def sink(directory: Path, max_bytes: int = 1500, **kw: object) -> FileSink:
    return FileSink(directory / "audit.jsonl", fsync=False,
                    rotate=AuditRotate(max_bytes=max_bytes), **kw)  # type: ignore[arg-type]


def fill(s: FileSink, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        s.append("request", request_id=f"r{i}", environment="dev", decision="allow",
                 reason="padding " * 6)


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 62)  # not a multiple of a file: the active file holds some
    archives = s.archives()
    assert len(archives) >= 5
    # Contiguous, named after what they hold, the active file continues after the last.
    for a, b in itertools.pairwise(archives):
        assert b.first == a.last + 1
    first_active = json.loads(s.path.read_text().splitlines()[0])
    assert first_active["seq"] == archives[-1].last + 1
    last_archived = json.loads(archives[-1].path.read_text().splitlines()[-1])
    assert first_active["prev_hash"] == last_archived["hash"]

    result = verify_sink(s)
    assert result.ok, result.reason
    assert result.last_seq == 62
    seqs = [r.entry["seq"] for r in s.records() if r.entry]
    assert seqs == list(range(1, 63))
    # Newest first across files, and a page cursor taken in an archive goes on from there.
    newest = list(s.records_before(None))
    assert [r.entry["seq"] for r in newest if r.entry] == list(range(62, 0, -1))
    mid = newest[45]
    assert [r.entry["seq"] for r in s.records_before(mid.position) if r.entry][:2] == [
        mid.entry["seq"] - 1, mid.entry["seq"] - 2]  # type: ignore[index]


def test_compressed_archives_read_and_verify_the_same(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 40)
    positions = [r.position for r in s.records()]
    assert s.compress_archives() == len(s.archives())
    assert all(a.compressed for a in s.archives())
    assert [r.position for r in s.records()] == positions  # cursors survive compression
    assert verify_sink(s).ok
    fill(s, 5, 40)  # a writer reopening finds its tail through the archive
    fresh = sink(tmp_path)
    fresh.append("request", request_id="after")
    result = verify_sink(fresh)
    assert result.ok and result.last_seq == 46, result.reason


def test_tampering_with_an_archived_file_is_detected(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 40)
    target = s.archives()[1]
    lines = target.path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[2])
    entry["decision"] = "deny"
    lines[2] = json.dumps(entry, separators=(",", ":")) + "\n"
    target.path.write_text("".join(lines))
    result = verify_sink(s)
    assert not result.ok and result.kind == "tampered"
    assert f"hash mismatch at seq {entry['seq']}" in (result.reason or "")
    assert f"[{target.name}, line 3]" in (result.reason or "")


def test_a_tampered_compressed_archive_is_detected(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 30)
    s.compress_archives()
    target = s.archives()[0]
    text = gzip.decompress(target.path.read_bytes()).replace(b'"r1"', b'"rX"')
    target.path.write_bytes(gzip.compress(text))
    result = verify_sink(s)
    assert not result.ok and "hash mismatch at seq 2" in (result.reason or "")


def test_a_missing_middle_file_is_named(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 50)
    archives = s.archives()
    gone = archives[2]
    gone.path.unlink()
    result = verify_sink(s)
    assert not result.ok and result.kind == "tampered"
    assert (f"{archives[1].name} ends at seq {archives[1].last} but {archives[3].name} starts "
            f"at seq {archives[3].first}: a file holding seqs {gone.first}..{gone.last} is "
            "missing") in (result.reason or "")


def test_a_missing_oldest_file_without_a_prune_record_fails(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 30)
    first = s.archives()[0]
    first.path.unlink()
    result = verify_sink(s)
    assert not result.ok
    assert (f"the chain starts at seq {first.last + 1}, not 1: entries 1..{first.last} are "
            "missing") in (result.reason or "")


def test_swapped_archive_names_are_detected(tmp_path: Path) -> None:
    s = sink(tmp_path)
    fill(s, 30)
    a, b = s.archives()[:2]
    tmp = a.path.with_name("swap")
    a.path.rename(tmp)
    b.path.rename(a.path)
    tmp.rename(b.path)
    result = verify_sink(s)
    assert not result.ok
    assert (f"{a.name} starts at seq {b.first} but its name says {a.first}..{a.last}"
            in (result.reason or ""))


def test_a_cut_active_file_after_rotation_is_a_recorded_loss(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    store = open_store(policy)
    s = open_sink(policy, store)
    assert isinstance(s, FileSink)
    fill(s, 30)
    s.close()
    s.path.unlink()  # the active file deleted: the head in the store knows better
    s2 = open_sink(policy, store)
    s2.open()
    result = verify_sink(s2, store.get_audit_head())
    assert result.kind == "lost", result.reason
    store.close()


def _policy(tmp_path: Path, **audit: object) -> Policy:
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "state": {"path": "run/state"}, "audit": {
        "path": "run/audit.jsonl", "fsync": False, "rotate": {"max_bytes": 1500}, **audit}}))
    return load_policy(path)


def test_cli_rotate_verify_tail_export_across_files(tmp_path: Path) -> None:
    policy = _policy(tmp_path, rotate={"max_bytes": 10 ** 9, "compress": True})
    pol_file = str(tmp_path / "authority.yaml")
    store = open_store(policy)
    s = open_sink(policy, store)
    fill(s, 5)  # type: ignore[arg-type]
    s.close()
    store.close()
    not_due = runner.invoke(app, ["rotate", "--policy", pol_file])
    assert not_due.exit_code == 0 and "nothing to rotate" in not_due.stdout
    forced = runner.invoke(app, ["rotate", "--force", "--policy", pol_file])
    assert forced.exit_code == 0, forced.output
    assert "rotated: seqs 1..5" in forced.stdout and "compressed 1" in forced.stdout
    store = open_store(policy)
    s = open_sink(policy, store)
    fill(s, 3, 5)  # type: ignore[arg-type]
    s.close()
    store.close()
    ok = runner.invoke(app, ["verify", "--policy", pol_file])
    assert ok.exit_code == 0, ok.output
    assert "ok: 8 entries" in ok.stdout
    tail = runner.invoke(app, ["tail", "-n", "6", "--json", "--policy", pol_file])
    assert [json.loads(x)["seq"] for x in tail.stdout.splitlines()] == [3, 4, 5, 6, 7, 8]
    out = tmp_path / "export.jsonl"
    exp = runner.invoke(app, ["export", "--policy", pol_file, "-o", str(out)])
    assert exp.exit_code == 0, exp.output
    assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == list(range(1, 9))
    status = runner.invoke(app, ["status", "--json", "--policy", pol_file])
    info = json.loads(status.stdout)
    assert info["last_seq"] == 8 and info["archives"][0]["compressed"]


# -- crashes and concurrency (real processes) --------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    from authority_sdk.audit import FileSink
    from authority_sdk.policy import AuditRotate
    path, n, tag, max_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    s = FileSink(path, fsync=True, rotate=AuditRotate(max_bytes=max_bytes))
    for i in range(n):
        s.append("request", request_id=f"{tag}-{i}", reason="padding " * 6)
""")


def _writer(path: Path, n: int, tag: str, max_bytes: int, crash_at: str | None = None
            ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n), tag,
                             str(max_bytes)], env=env, stderr=subprocess.PIPE)


@pytest.mark.parametrize("step", ["rotate:before_rename", "rotate:after_rename",
                                  "rotate:after_create", "compress:after_gz"])
def test_a_crash_at_each_rotation_step_leaves_a_verifiable_chain(tmp_path: Path,
                                                                  step: str) -> None:
    path = tmp_path / "audit.jsonl"
    if step.startswith("compress"):
        s = sink(tmp_path)
        fill(s, 20)
        code = (f"from authority_sdk.audit import FileSink; "
                f"FileSink({str(path)!r}).compress_archives()")
        env = {**os.environ, "PYTHONPATH": str(ROOT), CRASH_ENV: step}
        proc = subprocess.run([sys.executable, "-c", code], env=env, check=False)
        assert proc.returncode == -signal.SIGKILL
        names = sorted(os.listdir(tmp_path / "archive"))
        assert any(n.endswith(".gz") for n in names) and any(n.endswith(".jsonl") for n in names)
        expected = 20
    else:
        proc2 = _writer(path, 40, "w", 1500, crash_at=step)
        proc2.communicate(timeout=60)
        assert proc2.returncode == -signal.SIGKILL
        s = sink(tmp_path)
        expected = max(r.entry["seq"] for r in s.records() if r.entry)
    result = verify_sink(s)
    assert result.ok, result.reason
    # Whoever writes next continues the chain with nothing lost or duplicated.
    after = sink(tmp_path)
    fill(after, 25, 1000)
    s.compress_archives()
    result = verify_sink(after)
    assert result.ok, result.reason
    seqs = [r.entry["seq"] for r in after.records() if r.entry]
    assert seqs == list(range(1, expected + 26))


def test_two_processes_appending_across_rotations_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    procs = [_writer(path, 150, tag, 4000) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    s = sink(tmp_path, max_bytes=4000)
    result = verify_sink(s)
    assert result.ok, result.reason
    assert len(s.archives()) >= 10
    ids = [r.entry["request_id"] for r in s.records() if r.entry]
    assert len(ids) == 300
    assert sorted(ids) == sorted([f"a-{i}" for i in range(150)] + [f"b-{i}" for i in range(150)])



def test_a_checkpoint_inside_an_archived_file_is_found_there(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A writer reopening the log compares the checkpoint with the entry it names even when
    that entry has moved into a (compressed) archive: no false 'rewritten' record."""
    monkeypatch.setenv("ROT_KEY", "rotation-audit-key-0123456789")
    policy = _policy(tmp_path, hmac_key_env="ROT_KEY",
                     checkpoint_path=str(tmp_path / "cp" / "audit.cp"), checkpoint_every=7,
                     rotate={"max_bytes": 1500, "compress": True})
    store = open_store(policy)
    s = open_sink(policy, store)
    assert isinstance(s, FileSink)
    fill(s, 40)
    s.compress_archives()
    checkpoint = s.checkpoints.read() if s.checkpoints else None
    assert checkpoint is not None and checkpoint.seq == 35
    assert any(a.first <= 35 <= a.last for a in s.archives())
    reopened = open_sink(policy, store)
    reopened.open()
    reopened.append("request", request_id="after-reopen")
    entries = [r.entry for r in reopened.records() if r.entry]
    assert not [e for e in entries if e["event"] == "recovery"]
    result = verify_sink(reopened, store.get_audit_head())
    assert result.ok, result.reason
    store.close()


def test_rotation_by_age(tmp_path: Path) -> None:
    s = FileSink(tmp_path / "audit.jsonl", fsync=False, rotate=AuditRotate(every="1s"))
    fill(s, 3)
    assert s.rotate() is None  # younger than a second
    import time

    time.sleep(1.1)
    rotated = s.rotate()
    assert rotated is not None and (rotated.first, rotated.last) == (1, 3)
    fill(s, 2, 3)
    fresh = FileSink(tmp_path / "audit.jsonl", fsync=False, rotate=AuditRotate(every="1s"))
    assert fresh.rotate() is None  # the new file's first entry is new
    assert verify_sink(fresh).ok


def test_a_long_archive_is_read_one_file_at_a_time(tmp_path: Path) -> None:
    """Verify and tail over more archived files than the process may hold descriptors."""
    s = sink(tmp_path, max_bytes=1)  # one entry per file
    fill(s, 120)
    assert len(s.archives()) == 120
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        from authority_sdk.audit import FileSink, verify_sink
        s = FileSink({str(s.path)!r}, fsync=False)
        r = verify_sink(s)
        assert r.ok and r.last_seq == 120, r.reason
        assert [x.entry["seq"] for x in s.records_before(None)][:3] == [120, 119, 118]
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_long_compressed_archive_reads_within_few_descriptors(tmp_path: Path) -> None:
    s = sink(tmp_path, max_bytes=1)
    fill(s, 80)
    s.compress_archives()
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        from authority_sdk.audit import FileSink, verify_sink
        s = FileSink({str(s.path)!r}, fsync=False)
        for _ in range(3):  # each pass opens every archive, one at a time
            assert verify_sink(s).ok
            assert [x.entry["seq"] for x in s.records_before(None)][-1] == 1
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr

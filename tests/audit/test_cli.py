"""``authority audit verify`` and ``acknowledge`` on real files, with the policy's key,
state store and checkpoint (the exit codes the README's table lists)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from authority_sdk.audit import entry_hash, open_sink
from authority_sdk.cli.audit_cmd import app
from authority_sdk.policy import Policy, load_policy
from authority_sdk.store import open_store

runner = CliRunner()


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Policy]:
    monkeypatch.setenv("CLI_AUDIT_KEY", "cli-audit-key-0123456789")
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "state": {"path": "run/state"}, "audit": {
        "path": "run/audit.jsonl", "fsync": False, "hmac_key_env": "CLI_AUDIT_KEY",
        "checkpoint_path": "checkpoints/audit.cp", "checkpoint_every": 3}}))
    yield load_policy(path)


def write(policy: Policy, n: int) -> None:
    store = open_store(policy)
    sink = open_sink(policy, store)
    for i in range(n):
        sink.append("request", request_id=f"r{i}", environment="dev", decision="allow")
    sink.close()
    store.close()


def test_verify_then_a_loss_then_acknowledge(policy: Policy) -> None:
    write(policy, 7)
    ok = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert ok.exit_code == 0, ok.output
    assert "checked: head, MACs, checkpoint" in ok.stdout

    lines = policy.audit_path.read_bytes().splitlines(keepends=True)
    policy.audit_path.write_bytes(b"".join(lines[:5]))
    cut = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert cut.exit_code == 1 and "truncated" in cut.stderr

    write(policy, 1)  # the next writer records exactly what is gone
    lost = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert lost.exit_code == 3, lost.output
    assert "entries 6..7 lost" in lost.stderr

    no_reason = runner.invoke(app, ["acknowledge", "--by", "ann", "--policy",
                                    f"{policy.base_dir}/authority.yaml"])
    assert no_reason.exit_code == 2  # who and why are both required
    ack = runner.invoke(app, ["acknowledge", "--by", "ann", "--reason", "restored",
                              "--policy", f"{policy.base_dir}/authority.yaml"])
    assert ack.exit_code == 0, ack.output
    assert "acknowledged: entries 6..7 lost" in ack.stdout
    again = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert again.exit_code == 0, again.output
    assert "acknowledged by ann" in again.stderr
    nothing = runner.invoke(app, ["acknowledge", "--by", "ann", "--reason", "again",
                                  "--policy", f"{policy.base_dir}/authority.yaml"])
    assert nothing.exit_code == 0 and "nothing to acknowledge" in nothing.stdout


def test_tampering_cannot_be_acknowledged(policy: Policy) -> None:
    write(policy, 3)
    lines = policy.audit_path.read_bytes().splitlines()
    entry = json.loads(lines[1])
    entry["reason"] = "edited"
    entry["hash"] = entry_hash(entry["prev_hash"], entry)
    lines[1] = json.dumps(entry).encode()
    policy.audit_path.write_bytes(b"\n".join(lines) + b"\n")
    bad = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert bad.exit_code == 1
    assert "line 2" in bad.stderr and "MAC mismatch" in bad.stderr
    ack = runner.invoke(app, ["acknowledge", "--by", "eve", "--reason", "x",
                              "--policy", f"{policy.base_dir}/authority.yaml"])
    assert ack.exit_code == 1 and "not because of a recorded loss" in ack.stderr


def test_a_missing_key_fails_closed(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    write(policy, 1)
    monkeypatch.delenv("CLI_AUDIT_KEY")
    out = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert out.exit_code == 1 and "$CLI_AUDIT_KEY, which is not set" in out.stderr


def test_an_sdk_process_that_never_closes_still_checkpoints_at_exit(policy: Policy) -> None:
    """"At shutdown" holds for an SDK app too: it rarely closes its engine."""
    import subprocess
    import sys

    script = ("import sys\nfrom authority_sdk.engine import Engine\n"
              "gw = Engine(sys.argv[1])\n"
              "for i in range(3):\n    gw.audit_event('kill_switch', reason=f'r{i}', actor='t')\n")
    done = subprocess.run([sys.executable, "-c", script,
                           f"{policy.base_dir}/authority.yaml"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    checkpoint = json.loads((Path(policy.base_dir or ".") / "checkpoints/audit.cp").read_text())
    assert checkpoint["seq"] == 3  # checkpoint_every is 3 here: the periodic one…
    done = subprocess.run([sys.executable, "-c", script.replace("range(3)", "range(2)"),
                           f"{policy.base_dir}/authority.yaml"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    checkpoint = json.loads((Path(policy.base_dir or ".") / "checkpoints/audit.cp").read_text())
    assert checkpoint["seq"] == 5  # …and the one at exit, past the last period
    ok = runner.invoke(app, ["verify", "--policy", f"{policy.base_dir}/authority.yaml"])
    assert ok.exit_code == 0, ok.output

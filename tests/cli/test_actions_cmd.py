"""``authority actions list|resolve``: locally on the state files, and against a running
proxy with ``--url``/``--key``, with the same output and exit codes. The executions in
doubt come from real processes SIGKILLed mid-execution."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import typer
from in_doubt import POLICY, audit_lines, crash
from typer.testing import CliRunner

from authority_sdk.cli import actions_cmd
from authority_sdk.demo.processes import ProxyProcess

APPROVER_KEY = "sk-actions-approver-0123"
ADMIN_KEY = "sk-actions-admin-0123"
AGENT_KEY = "sk-actions-agent-0123"


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(actions_cmd.actions_app, name="actions")
    app.command("noop")(lambda: None)  # two commands, so "actions" stays a group
    return app


CLI = _cli()
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(CLI, list(args), env=env)


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_local_list_and_resolve(write_policy: Callable[..., Path], tmp_path: Path,
                                procs: list[BaseProcess]) -> None:
    policy = write_policy(POLICY)
    p = str(policy)
    key = crash(policy, tmp_path, procs)["auto"].action_key

    listed = run("actions", "list", "--status", "in_doubt", "--json", "--policy", p)
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.stdout)
    assert (entry["action_key"], entry["status"]) == (key, "in_doubt")
    assert entry["arguments"]["password"] == "[REDACTED]"
    table = run("actions", "list", "--policy", p, env={"COLUMNS": "250"})
    assert table.exit_code == 0 and key in table.stdout and "in_doubt" in table.stdout
    assert "hunter2" not in table.stdout

    ok = run("actions", "resolve", key, "--as", "failed", "--reason", "not in the ledger",
             "--policy", p)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == f"resolved {key} (write_note, prod): failed"
    after = json.loads(run("actions", "list", "--json", "--policy", p).stdout)
    assert [(e["action_key"], e["status"], e["resolution_reason"]) for e in after] == [
        (key, "failed", "not in the ledger")]
    assert json.loads(run("actions", "list", "-s", "in_doubt", "--json", "--policy",
                          p).stdout) == []
    resolved_table = run("actions", "list", "--policy", p, env={"COLUMNS": "250"})
    assert "resolved by cli:" in resolved_table.stdout

    again = run("actions", "resolve", key, "--as", "executed", "--policy", p)
    assert again.exit_code == 1 and "[execution_not_in_doubt]" in again.stderr
    assert "is failed, not in_doubt" in again.stderr
    missing = run("actions", "resolve", "act_missing", "--as", "failed", "--policy", p)
    assert missing.exit_code == 1 and "[not_found]" in missing.stderr
    bad_status = run("actions", "list", "--status", "lost", "--policy", p)
    assert bad_status.exit_code == 1 and "[invalid_request]" in bad_status.stderr
    bad_outcome = run("actions", "resolve", key, "--as", "maybe", "--policy", p)
    assert bad_outcome.exit_code == 2
    no_outcome = run("actions", "resolve", key, "--policy", p)
    assert no_outcome.exit_code == 2

    mine = [e for e in audit_lines(tmp_path / "audit.jsonl")
            if e["event"] == "action" and str(e.get("actor", "")).startswith("cli:")]
    assert [(e["decision"], (e.get("execution_result") or {}).get("status")) for e in mine] \
        == [("allow", "failed"), ("deny", None)]


@pytest.fixture
def remote(write_policy: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    policy = write_policy({**POLICY, "keys": [
        {"name": "agent", "secret_env": "ACTIONS_AGENT_KEY", "environment": "prod"},
        {"name": "approver", "secret_sha256": _sha(APPROVER_KEY), "roles": ["approver"]},
        {"name": "admin", "secret_sha256": _sha(ADMIN_KEY), "roles": ["admin"]},
    ]})
    proc = ProxyProcess(policy, env={"ACTIONS_AGENT_KEY": AGENT_KEY},
                        log_path=tmp_path / "proxy.log").start()
    yield proc.url, policy
    proc.stop()


def test_remote_list_and_resolve_with_url_and_key(
        remote: tuple[str, Path], tmp_path: Path, procs: list[BaseProcess]) -> None:
    url, policy = remote
    key = crash(policy, tmp_path, procs)["auto"].action_key
    as_approver = ["--url", url, "--key", APPROVER_KEY]

    listed = run("actions", "list", "--status", "in_doubt", "--json", *as_approver)
    assert listed.exit_code == 0, listed.output
    assert [e["action_key"] for e in json.loads(listed.stdout)] == [key]
    local = run("actions", "list", "--status", "in_doubt", "--json", "--policy", str(policy))
    [here], [there] = json.loads(local.stdout), json.loads(listed.stdout)
    # One journal, two doors (the API also names the fields not set, as null).
    assert here == {k: v for k, v in there.items() if k in here}
    assert all(v is None for k, v in there.items() if k not in here)
    as_admin = run("actions", "list", "-s", "in_doubt", "--json", "--url", url, "--key",
                   ADMIN_KEY)
    assert as_admin.exit_code == 0 and json.loads(as_admin.stdout) == json.loads(listed.stdout)

    for wrong in (AGENT_KEY, ADMIN_KEY):
        refused = run("actions", "resolve", key, "--as", "executed", "--url", url,
                      "--key", wrong)
        assert refused.exit_code == 1 and "[insufficient_role]" in refused.stderr
    ok = run("actions", "resolve", key, "--as", "executed", "-r", "the note exists",
             env={"AUTHORITY_URL": url, "AUTHORITY_KEY": APPROVER_KEY})
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == f"resolved {key} (write_note, prod): executed"
    again = run("actions", "resolve", key, "--as", "failed", *as_approver)
    assert again.exit_code == 1 and "[execution_not_in_doubt]" in again.stderr
    missing = run("actions", "resolve", "act_missing", "--as", "failed", *as_approver)
    assert missing.exit_code == 1 and "[not_found]" in missing.stderr

    [entry] = json.loads(run("actions", "list", "--json", *as_approver).stdout)
    assert (entry["status"], entry["resolved_by"], entry["resolution_reason"]) == (
        "executed", "approver", "the note exists")
    no_key = run("actions", "list", "--url", url)
    assert no_key.exit_code == 2 and "--key" in no_key.stderr


def test_the_console_entry_point_has_the_actions_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "authority_sdk.cli", "actions", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "list" in out.stdout and "resolve" in out.stdout

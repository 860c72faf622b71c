"""``authority approvals|kill-switch|budget``: locally on the state files, and against a
running proxy with ``--url``/``--key``, with the same output and exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import yaml
from helpers import BASE_POLICY, ScriptedServer, deep_merge, tool, user
from typer.testing import CliRunner

from authority_sdk.cli import control_cmd
from authority_sdk.client import AuthorityClient
from authority_sdk.demo.processes import ProxyProcess

AGENT_KEY = "sk-cli-agent-0123"
HYBRID_KEY = "sk-cli-hybrid-0123"
APPROVER_KEY = "sk-cli-approver-0123"
ADMIN_KEY = "sk-cli-admin-0123"
TOOLS = [tool("send_note", {"text": {"type": "string"}})]


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(control_cmd.approvals_app, name="approvals")
    app.add_typer(control_cmd.kill_switch_app, name="kill-switch")
    app.command("budget")(control_cmd.budget)
    return app


CLI = _cli()
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(CLI, list(args), env=env)


def write(upstream: ScriptedServer, directory: Path, over: dict[str, Any] | None = None) -> Path:
    data = deep_merge(BASE_POLICY, {
        "upstream": {"base_url": upstream.base_url, "timeout_s": 10},
        "state": {"path": str(directory / "state")},
        "audit": {"path": str(directory / "audit.jsonl"), "fsync": False},
        "actions": {"send_note": {"executor": "dry", "mode": "require_human_approval"}},
        "environments": {"prod": {"budget": {"usd": 2.0, "period": "day"}}},
        "keys": [
            {"name": "sdk-app", "secret_sha256": _sha("unused"), "environment": "prod",
             "budget": {"usd": 0.5, "period": "hour"}},
            {"name": "agent", "secret_env": "CLI_AGENT_KEY", "environment": "prod"},
            {"name": "hybrid", "secret_env": "CLI_HYBRID_KEY", "roles": ["agent", "approver"]},
            {"name": "approver", "secret_sha256": _sha(APPROVER_KEY), "roles": ["approver"]},
            {"name": "admin", "secret_sha256": _sha(ADMIN_KEY), "roles": ["admin"]},
        ],
    })
    data = deep_merge(data, over or {})
    path = directory / "authority.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pending_via_sdk(policy: Path, n: int = 1) -> list[str]:
    client = AuthorityClient(policy=str(policy), caller="sdk-app", max_retries=0)
    ids = []
    for i in range(n):
        resp = client.chat.completions.create(
            model="gpt-4o-mini", tools=TOOLS,
            messages=user(f'CALL send_note {{"text": "note {i}"}}'))
        ids.append((resp.model_extra or {})["authority"]["actions"][0]["approval_id"])
    client.gateway.close()
    return ids


def err(result: Any) -> str:
    return str(result.stderr)


def test_local_approve_reject_and_every_refusal(upstream: ScriptedServer,
                                                tmp_path: Path) -> None:
    policy = write(upstream, tmp_path)
    p = str(policy)
    a1, a2, a3 = pending_via_sdk(policy, 3)

    listed = run("approvals", "list", "--status", "pending", "--json", "--policy", p)
    assert listed.exit_code == 0, listed.output
    assert {a["id"] for a in json.loads(listed.stdout)} == {a1, a2, a3}
    table = run("approvals", "list", "--policy", p, env={"COLUMNS": "200"})
    assert table.exit_code == 0 and a1 in table.stdout and "send_note" in table.stdout
    shown = run("approvals", "show", a1, "--policy", p)
    assert shown.exit_code == 0 and "note 0" in shown.stdout and "sdk-app" in shown.stdout

    ok = run("approvals", "approve", a1, "--reason", "fine", "--policy", p)
    assert ok.exit_code == 0, err(ok)
    assert f"approved {a1} (send_note, prod): executed" in ok.stdout
    again = run("approvals", "approve", a1, "--policy", p)
    assert again.exit_code == 1 and "[approval_executed]" in err(again)

    rej = run("approvals", "reject", a2, "-r", "no", "--policy", p)
    assert rej.exit_code == 0 and f"rejected {a2}" in rej.stdout
    late = run("approvals", "approve", a2, "--policy", p)
    assert late.exit_code == 1 and "[approval_rejected]" in err(late)

    on = run("kill-switch", "on", "--reason", "drill", "--policy", p)
    assert on.exit_code == 0 and "ENGAGED" in on.stdout and "drill" in on.stdout
    status = json.loads(run("kill-switch", "status", "--json", "--policy", p).stdout)
    assert status["global"]["engaged"] is True
    assert status["global"]["actor"].startswith("cli:")
    blocked = run("approvals", "approve", a3, "--policy", p)
    assert blocked.exit_code == 1 and "[kill_switch_engaged]" in err(blocked)
    assert run("kill-switch", "off", "--policy", p).exit_code == 0
    assert "off" in run("kill-switch", "status", "--policy", p).stdout

    write(upstream, tmp_path, {"actions": {"send_note": {"mode": "deny"}}})
    denied = run("approvals", "approve", a3, "--policy", p)
    assert denied.exit_code == 1 and "[approval_denied_by_policy]" in err(denied)
    assert json.loads(run("approvals", "show", a3, "--json", "--policy", p).stdout)[
        "status"] == "pending"
    missing = run("approvals", "approve", "apr_missing", "--policy", p)
    assert missing.exit_code == 1 and "[not_found]" in err(missing)
    bad_env = run("kill-switch", "on", "-e", "nowhere", "--policy", p)
    assert bad_env.exit_code == 1 and "[invalid_request]" in err(bad_env)

    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    actors = {e["actor"] for e in audit if e["event"] in ("approval", "kill_switch")}
    assert actors and all(a.startswith("cli:") for a in actors)


def test_an_expired_approval_cannot_be_approved(upstream: ScriptedServer,
                                                tmp_path: Path) -> None:
    policy = write(upstream, tmp_path, {"defaults": {"approval_ttl_s": 0.3}})
    (apr,) = pending_via_sdk(policy)
    time.sleep(0.5)
    out = run("approvals", "approve", apr, "--policy", str(policy))
    assert out.exit_code == 1 and "[approval_expired]" in err(out)


def test_budget_shows_spend_against_each_limit(upstream: ScriptedServer,
                                              tmp_path: Path) -> None:
    policy = write(upstream, tmp_path)
    before = json.loads(run("budget", "--json", "--policy", str(policy)).stdout)
    assert {(r["scope"], r["name"]): r["used_usd"] for r in before} == {
        ("environment", "prod"): 0.0, ("key", "sdk-app"): 0.0}
    pending_via_sdk(policy)
    rows = {(r["scope"], r["name"]): r for r in
            json.loads(run("budget", "--json", "--policy", str(policy)).stdout)}
    env, key = rows[("environment", "prod")], rows[("key", "sdk-app")]
    assert env["limit_usd"] == 2.0 and env["period"] == "day"
    assert key["limit_usd"] == 0.5 and key["period"] == "hour"
    assert env["used_usd"] > 0 and env["used_usd"] == key["used_usd"]
    assert env["remaining_usd"] == pytest.approx(2.0 - env["used_usd"])
    table = run("budget", "--policy", str(policy), env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "sdk-app" in table.stdout


@pytest.fixture(scope="module")
def remote(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[ProxyProcess, Path]]:
    d = tmp_path_factory.mktemp("remote")
    policy = write(upstream, d)
    proc = ProxyProcess(policy, env={"CLI_AGENT_KEY": AGENT_KEY, "CLI_HYBRID_KEY": HYBRID_KEY},
                        log_path=d / "proxy.log").start()
    yield proc, policy
    proc.stop()


def _pending_over_http(url: str, key: str, text: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                   json={"model": "gpt-4o-mini", "tools": TOOLS,
                         "messages": user(f'CALL send_note {{"text": "{text}"}}')}, timeout=30)
    return str(r.json()["authority"]["actions"][0]["approval_id"])


def test_remote_approvals_with_url_and_key(remote: tuple[ProxyProcess, Path]) -> None:
    proc, _ = remote
    url = proc.url
    apr = _pending_over_http(url, AGENT_KEY, "remote one")
    own = _pending_over_http(url, HYBRID_KEY, "my own")
    as_approver = ["--url", url, "--key", APPROVER_KEY]

    listed = run("approvals", "list", "--status", "pending", "--json", *as_approver)
    assert listed.exit_code == 0, err(listed)
    assert {apr, own} <= {a["id"] for a in json.loads(listed.stdout)}
    assert "remote one" in run("approvals", "show", apr, *as_approver).stdout

    wrong = run("approvals", "approve", apr, "--url", url, "--key", AGENT_KEY)
    assert wrong.exit_code == 1 and "[insufficient_role]" in err(wrong)
    selfish = run("approvals", "approve", own, "--url", url, "--key", HYBRID_KEY)
    assert selfish.exit_code == 1 and "[self_approval_forbidden]" in err(selfish)
    bad = run("approvals", "list", "--url", url, "--key", "sk-wrong")
    assert bad.exit_code == 1 and "[invalid_api_key]" in err(bad)

    ok = run("approvals", "approve", apr, "--reason", "remote ok", *as_approver)
    assert ok.exit_code == 0, err(ok)
    assert f"approved {apr} (send_note, prod): executed" in ok.stdout
    again = run("approvals", "approve", apr, *as_approver)
    assert again.exit_code == 1 and "[approval_executed]" in err(again)
    # The same through the environment variables.
    rej = run("approvals", "reject", own, env={"AUTHORITY_URL": url,
                                               "AUTHORITY_KEY": APPROVER_KEY})
    assert rej.exit_code == 0 and f"rejected {own}" in rej.stdout
    shown = json.loads(run("approvals", "show", apr, "--json", *as_approver).stdout)
    assert shown["decided_by"] == "approver" and shown["decision_reason"] == "remote ok"

    no_key = run("approvals", "list", "--url", url)
    assert no_key.exit_code == 2 and "--key" in err(no_key)
    down = run("approvals", "list", "--url", "http://127.0.0.1:9", "--key", APPROVER_KEY)
    assert down.exit_code == 1 and "cannot reach" in err(down)


def test_remote_kill_switch_with_url_and_key(remote: tuple[ProxyProcess, Path]) -> None:
    proc, policy = remote
    admin = ["--url", proc.url, "--key", ADMIN_KEY]
    wrong = run("kill-switch", "on", "--url", proc.url, "--key", APPROVER_KEY)
    assert wrong.exit_code == 1 and "[insufficient_role]" in err(wrong)
    on = run("kill-switch", "on", "-e", "prod", "--reason", "remote drill", *admin)
    assert on.exit_code == 0 and "kill switch prod: ENGAGED (remote drill)" in on.stdout
    try:
        r = httpx.post(proc.url + "/v1/chat/completions",
                       headers={"authorization": f"Bearer {AGENT_KEY}"},
                       json={"model": "gpt-4o-mini", "messages": user("SAY hi")})
        assert r.status_code == 403 and r.json()["error"]["code"] == "kill_switch_engaged"
        remote_status = json.loads(run("kill-switch", "status", "--json", *admin).stdout)
        local_status = json.loads(run("kill-switch", "status", "--json", "--policy",
                                      str(policy)).stdout)
        assert remote_status == local_status  # one state, two ways to read it
        assert remote_status["prod"]["engaged"] is True
        assert remote_status["prod"]["actor"] == "admin"
        only = json.loads(run("kill-switch", "status", "-e", "prod", "--json", *admin).stdout)
        assert set(only) == {"global", "prod"}
    finally:
        off = run("kill-switch", "off", "-e", "prod", *admin)
    assert off.exit_code == 0 and "kill switch prod: released" in off.stdout


def test_the_console_entry_point_has_the_commands(write_policy: Callable[..., Path]) -> None:
    policy = write_policy()
    help_text = subprocess.run([sys.executable, "-m", "authority_sdk.cli", "--help"],
                               capture_output=True, text=True).stdout
    for name in ("serve", "approvals", "kill-switch", "budget"):
        assert name in help_text
    out = subprocess.run([sys.executable, "-m", "authority_sdk.cli", "kill-switch", "status",
                          "--json", "--policy", str(policy)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["global"]["engaged"] is False

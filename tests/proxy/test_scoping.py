"""A key bound to an environment reads and acts only there (issue 10, G5; THREATS 8).

One real proxy with dev and prod both asking for approval, keys scoped to one
environment and unscoped ones. The same decisions through HTTP, the CLI against
the proxy (``--url``) and the CLI on the local state files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from helpers import ScriptedServer, tool, user
from proxy_env import (
    ADMIN_KEY,
    AGENT_KEY,
    APPROVER_KEY,
    DEV_ADMIN,
    DEV_APPROVER,
    DEV_KEY,
    PROD_ADMIN,
    SCOPED_KEYS,
    RunningProxy,
    start_proxy,
)
from typer.testing import CliRunner

from authority_sdk.cli import control_cmd
from authority_sdk.policy import load_policy
from proxy.auth import KeyRing

TOOLS = [tool("send_note", {"text": {"type": "string"}})]

# dev asks for approval too (no forced simulation), so both environments have approvals.
OVERRIDES: dict[str, Any] = {"environments": {"dev": {"force_mode": None}},
                             "keys": SCOPED_KEYS}


@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("scoping"), overrides=OVERRIDES) as rp:
        yield rp


def pending(px: RunningProxy, key: str, text: str) -> str:
    r = px.http("POST", "/v1/chat/completions", key, json={
        "model": "gpt-4o-mini", "tools": TOOLS,
        "messages": user(f"CALL send_note {json.dumps({'text': text})}")})
    assert r.status_code == 200, r.text
    action = r.json()["authority"]["actions"][0]
    assert action["status"] == "pending_approval", action
    return str(action["approval_id"])


def ids(r: Any) -> set[str]:
    assert r.status_code == 200, r.text
    return {a["id"] for a in r.json()["data"]}


def err(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


# -- approvals -----------------------------------------------------------------------------


def test_a_dev_approver_neither_sees_nor_approves_prod(px: RunningProxy) -> None:
    prod = pending(px, AGENT_KEY, "prod refund")
    dev = pending(px, DEV_KEY, "dev refund")

    seen = ids(px.http("GET", "/authority/approvals", DEV_APPROVER))
    assert dev in seen and prod not in seen
    assert {a["environment"] for a in px.http(
        "GET", "/authority/approvals", DEV_APPROVER).json()["data"]} == {"dev"}
    assert {prod, dev} <= ids(px.http("GET", "/authority/approvals", APPROVER_KEY))

    err(px.http("GET", f"/authority/approvals/{prod}", DEV_APPROVER), 404, "not_found")
    # Not found, exactly as an id that does not exist: its existence is not revealed.
    missing = px.http("GET", "/authority/approvals/apr_000000000000000000000000", DEV_APPROVER)
    assert missing.json()["error"]["message"].replace("apr_000000000000000000000000", prod) \
        == px.http("GET", f"/authority/approvals/{prod}", DEV_APPROVER).json()["error"][
            "message"]

    for verb in ("approve", "reject"):
        err(px.http("POST", f"/authority/approvals/{prod}/{verb}", DEV_APPROVER,
                    json={"reason": "not mine"}), 404, "not_found")
    shown = px.http("GET", f"/authority/approvals/{prod}", APPROVER_KEY).json()
    assert shown["status"] == "pending"  # nothing ran
    journal = px.http("GET", "/authority/actions", APPROVER_KEY).json()["data"]
    assert prod not in {e.get("approval_id") for e in journal}
    refused = [e for e in px.audit_entries() if e["event"] == "approval"
               and e["actor"] == "dev-approver" and e["details"]["approval_id"] == prod]
    assert len(refused) == 2 and {e["decision"] for e in refused} == {"deny"}
    assert all("may act only in environment 'dev'" in e["reason"] for e in refused)

    ok = px.http("POST", f"/authority/approvals/{dev}/approve", DEV_APPROVER, json={})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "executed" and ok.json()["decided_by"] == "dev-approver"


def test_actions_list_and_resolve_are_scoped(px: RunningProxy) -> None:
    prod = pending(px, AGENT_KEY, "prod journal")
    dev = pending(px, DEV_KEY, "dev journal")
    assert px.http("POST", f"/authority/approvals/{prod}/approve", APPROVER_KEY).status_code \
        == 200
    assert px.http("POST", f"/authority/approvals/{dev}/approve", APPROVER_KEY).status_code \
        == 200
    everything = px.http("GET", "/authority/actions", APPROVER_KEY).json()["data"]
    by_approval = {e["approval_id"]: e for e in everything}
    assert {prod, dev} <= by_approval.keys()
    scoped = px.http("GET", "/authority/actions", DEV_APPROVER).json()["data"]
    assert {e["environment"] for e in scoped} == {"dev"}
    assert dev in {e["approval_id"] for e in scoped}

    prod_key = by_approval[prod]["action_key"]
    err(px.http("POST", f"/authority/actions/{prod_key}/resolve", DEV_APPROVER,
                json={"outcome": "failed"}), 404, "not_found")
    assert any(e["event"] == "action" and e["actor"] == "dev-approver"
               and e["details"]["action_key"] == prod_key and e["decision"] == "deny"
               for e in px.audit_entries())
    # In scope, the ordinary answer: it is executed, not in doubt.
    dev_key = by_approval[dev]["action_key"]
    err(px.http("POST", f"/authority/actions/{dev_key}/resolve", DEV_APPROVER,
                json={"outcome": "failed"}), 409, "execution_not_in_doubt")


# -- the kill switch -------------------------------------------------------------------------


def test_a_prod_admin_switches_only_prod(px: RunningProxy) -> None:
    status = px.http("GET", "/authority/kill-switch", PROD_ADMIN).json()
    assert set(status["environments"]) == {"prod"} and "global" in status
    before = len(px.audit_entries())
    for body in ({"engaged": True, "environment": "dev"}, {"engaged": True},
                 {"engaged": True, "environment": None}):
        err(px.http("POST", "/authority/kill-switch", PROD_ADMIN, json=body), 403,
            "environment_forbidden")
    full = px.http("GET", "/authority/kill-switch", ADMIN_KEY).json()
    assert full["global"]["engaged"] is False
    assert full["environments"]["dev"]["engaged"] is False
    refusals = [e for e in px.audit_entries()[before:] if e["event"] == "kill_switch"]
    assert len(refusals) == 3
    assert all(e["decision"] == "deny" and e["actor"] == "prod-admin" for e in refusals)

    on = px.http("POST", "/authority/kill-switch", PROD_ADMIN,
                 json={"engaged": True, "environment": "prod", "reason": "prod drill"})
    try:
        assert on.status_code == 200 and on.json()["scope"] == "prod"
        # Only prod stopped: dev still answers.
        assert px.http("POST", "/v1/chat/completions", DEV_KEY, json={
            "model": "gpt-4o-mini", "messages": user("SAY dev runs")}).status_code == 200
    finally:
        off = px.http("POST", "/authority/kill-switch", PROD_ADMIN,
                      json={"engaged": False, "environment": "prod"})
        assert off.status_code == 200
    # An unscoped admin holds the global switch.
    glob = px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": False})
    assert glob.status_code == 200 and glob.json()["scope"] == "global"


# -- the audit log ---------------------------------------------------------------------------


def test_a_scoped_key_reads_only_its_environments_audit_entries(px: RunningProxy) -> None:
    pending(px, AGENT_KEY, "prod for the audit")
    pending(px, DEV_KEY, "dev for the audit")
    px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": False})  # global
    scoped = px.http("GET", "/authority/audit", DEV_APPROVER, params={"limit": 1000})
    assert scoped.status_code == 200, scoped.text
    data = scoped.json()["data"]
    assert data and {e.get("environment") for e in data} == {"dev"}
    assert not any(e.get("invalid_line") for e in data)
    everything = px.http("GET", "/authority/audit", APPROVER_KEY,
                         params={"limit": 1000}).json()["data"]
    assert {"prod", "dev", None} <= {e.get("environment") for e in everything}
    on_file = {e["seq"] for e in px.audit_entries() if e.get("environment") == "dev"}
    assert {e["seq"] for e in data} <= on_file


def test_verify_gives_a_scoped_key_the_verdict_without_other_data(px: RunningProxy) -> None:
    scoped = px.http("GET", "/authority/audit/verify", DEV_APPROVER).json()
    full = px.http("GET", "/authority/audit/verify", APPROVER_KEY).json()
    assert scoped["ok"] is True
    assert {k: v for k, v in scoped.items() if k != "warnings"} == \
        {k: v for k, v in full.items() if k != "warnings"}
    # A torn line left by a crash is quoted in the warnings: only unscoped keys read it.
    log = px.directory / "audit.jsonl"
    original = log.read_bytes()
    try:
        with log.open("ab") as f:
            f.write(b'{"prod secret": "card 4111"')
        full = px.http("GET", "/authority/audit", APPROVER_KEY, params={"limit": 1}).json()
        assert "prod secret" in full["data"][-1]["invalid_line"]
        tail = px.http("GET", "/authority/audit", DEV_APPROVER, params={"limit": 5}).json()
        assert not any(e.get("invalid_line") for e in tail["data"])
        bad = px.http("GET", "/authority/audit/verify", DEV_APPROVER).json()
        assert bad["ok"] is False and "prod secret" not in json.dumps(bad)
    finally:
        log.write_bytes(original)


# -- two notions of a key's environment --------------------------------------------------------


def test_an_unscoped_key_chats_in_the_default_environment_but_manages_all(
        px: RunningProxy) -> None:
    ring = KeyRing(load_policy(px.policy_path),
                   environ={"PX_AGENT_KEY": AGENT_KEY, "PX_DEV_KEY": DEV_KEY})
    approver = ring.authenticate(f"Bearer {APPROVER_KEY}")
    assert approver.caller.environment == "prod"  # the policy's default, for chat
    assert approver.scope.unscoped  # every environment, for management
    dev = ring.authenticate(f"Bearer {DEV_ADMIN}")
    assert dev.caller.environment == "dev" and dev.scope.environment == "dev"


# -- the CLI agrees ----------------------------------------------------------------------------


def test_the_cli_remote_and_local_agree_with_http(px: RunningProxy) -> None:
    prod = pending(px, AGENT_KEY, "cli prod")
    dev = pending(px, DEV_KEY, "cli dev")
    runner = CliRunner()
    app = typer.Typer()
    app.add_typer(control_cmd.approvals_app, name="approvals")
    app.add_typer(control_cmd.kill_switch_app, name="kill-switch")

    def cli(*args: str) -> Any:
        return runner.invoke(app, list(args))

    remote = cli("approvals", "list", "--status", "pending", "--json", "--limit", "500",
                 "--url", px.url, "--key", DEV_APPROVER)
    assert remote.exit_code == 0, remote.stderr
    listed = {a["id"] for a in json.loads(remote.stdout)}
    assert dev in listed and prod not in listed
    approve = cli("approvals", "approve", prod, "--url", px.url, "--key", DEV_APPROVER)
    assert approve.exit_code == 1 and "[not_found]" in approve.stderr
    glob = cli("kill-switch", "on", "--url", px.url, "--key", PROD_ADMIN)
    assert glob.exit_code == 1 and "[environment_forbidden]" in glob.stderr

    local = cli("approvals", "list", "--status", "pending", "--json", "--limit", "500",
                "--policy", str(px.policy_path))
    assert local.exit_code == 0, local.stderr
    assert {dev, prod} <= {a["id"] for a in json.loads(local.stdout)}

"""``POST /authority/policy/evaluate`` (issue 17, point 2): a dry run of one action against
the policy in force, admin only and scoped, the same answer as ``authority policy explain``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import ScriptedServer
from proxy_env import ADMIN_KEY, AGENT_KEY, APPROVER_KEY, DEV_ADMIN, SCOPED_KEYS, start_proxy

REFUNDS: dict[str, Any] = {"keys": SCOPED_KEYS, "actions": {"issue_refund": {
    "mode": "require_human_approval",
    "rules": [{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
              {"if": {"amount": {"gt": 1000}}, "mode": "deny"}]}}}


def _explain(policy: Path, action: str, args: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "authority_sdk.cli", "policy", "explain",
                          "--policy", str(policy), "--action", action, "--args", args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(":", 1) for line in out.stdout.splitlines()[:7] if ":" in line)
    return {k.strip(): v.strip() for k, v in rows.items()}


def test_evaluate_matches_explain_and_runs_nothing(upstream: ScriptedServer,
                                                   tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides=REFUNDS) as px:
        before = len(px.audit_entries())
        for amount, mode, rule in ((10, "auto_execute", "rule[0]"), (5000, "deny", "rule[1]"),
                                   (200, "require_human_approval", "action_mode")):
            r = px.http("POST", "/authority/policy/evaluate", ADMIN_KEY,
                        json={"action": "issue_refund", "arguments": {"amount": amount}})
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got["mode"], got["decided_by"], got["environment"]) == (mode, rule, "prod")
            cli = _explain(px.policy_path, "issue_refund", f'{{"amount": {amount}}}')
            assert (cli["mode"], cli["decided by"]) == (got["mode"], got["decided_by"])
        assert len(px.audit_entries()) == before  # a dry run records nothing

        px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": True})
        off = px.http("POST", "/authority/policy/evaluate", ADMIN_KEY,
                      json={"action": "issue_refund", "arguments": {"amount": 10}}).json()
        assert (off["mode"], off["decided_by"]) == ("deny", "kill_switch")
        px.http("POST", "/authority/kill-switch", ADMIN_KEY, json={"engaged": False})


def test_evaluate_is_admin_only_scoped_and_strict(upstream: ScriptedServer,
                                                  tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides=REFUNDS) as px:
        body = {"action": "issue_refund", "arguments": {"amount": 10}}
        for key in (AGENT_KEY, APPROVER_KEY):
            r = px.http("POST", "/authority/policy/evaluate", key, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
        assert px.http("POST", "/authority/policy/evaluate", json=body).status_code == 401
        # A key bound to dev evaluates in dev by default, and cannot look into prod.
        dev = px.http("POST", "/authority/policy/evaluate", DEV_ADMIN, json=body).json()
        assert dev["environment"] == "dev"
        prod = px.http("POST", "/authority/policy/evaluate", DEV_ADMIN,
                       json={**body, "environment": "prod"})
        assert prod.status_code == 404
        for bad in ({**body, "extra": 1}, {"action": ""}, {"action": "x", "arguments": [1]},
                    {**body, "environment": "nowhere"}):
            r = px.http("POST", "/authority/policy/evaluate", ADMIN_KEY, json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_request"

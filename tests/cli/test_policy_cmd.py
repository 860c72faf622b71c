"""`authority policy check|schema` on real files, through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TYPO_POLICY = """
version: 1
default_environment: prod
environments:
  prod:
    models: ["gpt-4o-mini"]
    ceilings: {per_requst_usd: 0.05}
    budget: {usd: 10, period: weekly}
actions:
  issue_refund:
    executor: billing
    rules:
      - if: {amount: {lte: 50}}
        mode: auto_exec
executors:
  billing: {type: webhook, url: "http://127.0.0.1:9/refunds"}
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authority_sdk.cli", *args],
                          capture_output=True, text=True)


def test_check_names_the_exact_path_of_each_typo(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(TYPO_POLICY)
    out = run("policy", "check", "--policy", str(p))
    assert out.returncode == 1
    assert "environments.prod.ceilings.per_requst_usd: unknown field" in out.stderr
    assert "environments.prod.budget.period" in out.stderr
    assert "actions.issue_refund.rules.0.mode" in out.stderr


def test_check_accepts_a_good_policy_and_reports_its_hash(tmp_path: Path) -> None:
    p = tmp_path / "good.yaml"
    p.write_text(TYPO_POLICY.replace("per_requst_usd", "per_request_usd")
                 .replace("weekly", "day").replace("auto_exec", "auto_execute"))
    out = run("policy", "check", "--policy", str(p))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "policy_hash" in out.stdout


def test_check_rejects_broken_yaml_and_cross_references(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("version: 1\nenvironments: [unclosed\n")
    out = run("policy", "check", "--policy", str(p))
    assert out.returncode == 1 and "not valid YAML" in out.stderr
    p.write_text("version: 1\ndefault_environment: prod\nenvironments: {prod: {}}\n"
                 "actions: {refund: {executor: nowhere}}\n")
    out = run("policy", "check", "--policy", str(p))
    assert out.returncode == 1
    assert "actions.refund.executor: unknown executor 'nowhere'" in out.stderr


def test_schema_is_valid_json_schema_of_the_policy() -> None:
    out = run("policy", "schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert {"environments", "actions", "executors", "keys", "pricing", "redact"} <= set(
        schema["properties"])
    assert "base_dir" not in schema["properties"]


def test_explain_names_the_rule_that_decides_a_request(tmp_path: Path) -> None:
    """Which glob admits a model, which ceiling or budget refuses a request."""
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "default_environment": "prod",
        "state": {"path": str(tmp_path / "state")},
        "environments": {"prod": {"models": ["gpt-4o-mini", "gpt-4.1-*"],
                                  "ceilings": {"per_request_usd": 0.01},
                                  "budget": {"usd": 1.0, "period": "day"}}}}))

    def explain(*args: str) -> str:
        result = run("policy", "explain", "--policy", str(path), *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = explain("-m", "gpt-4o")
    assert "deny (model_not_allowed)" in out and "environments.prod.models" in out
    out = explain("-m", "gpt-4.1-mini")
    assert "allowed by glob 'gpt-4.1-*'" in out and "decision:    allow" in out
    assert "budget:env:prod:day" in out
    out = explain("-m", "gpt-4o-mini", "--max-tokens", "100000")
    assert "deny (cost_ceiling_exceeded)" in out
    assert "environments.prod.ceilings.per_request_usd" in out
    assert not (tmp_path / "state").exists()  # explaining changes nothing

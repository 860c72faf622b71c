"""``authority policy diff --against NEW.yaml``: the decisions on record, replayed under a
new policy (issue 17, point 2). Real decisions made by the gateway write the log; the
command reads it as an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from helpers import tool, user

from authority_sdk import AuthorityClient
from authority_sdk.engine import Engine

REFUNDS: dict[str, Any] = {"actions": {"issue_refund": {
    "mode": "require_human_approval",
    "rules": [{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
              {"if": {"amount": {"gt": 1000}}, "mode": "deny"}]}},
    "redact": ["card_number"]}
TOOLS = [tool("issue_refund", {"amount": {"type": "number"}, "order": {"type": "string"},
                               "card_number": {"type": "string"}})]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authority_sdk.cli", *args],
                          capture_output=True, text=True, timeout=120)


def _record(path: Path, refunds: list[dict[str, Any]]) -> None:
    eng = Engine(path)
    try:
        client = AuthorityClient(gateway=eng, max_retries=0)
        for args in refunds:
            client.chat.completions.create(
                model="gpt-4o-mini", tools=TOOLS,
                messages=user(f"CALL issue_refund {json.dumps(args)}"))
    finally:
        eng.close()


def test_diff_counts_what_would_change_with_examples_and_never_guesses(
        write_policy: Callable[..., Path], tmp_path: Path) -> None:
    old = write_policy(REFUNDS)
    _record(old, [{"amount": 10, "order": "A"}, {"amount": 30, "order": "B"},
                  {"amount": 45, "order": "C"}, {"amount": 500, "order": "D"},
                  {"amount": 5000, "order": "E"},
                  {"amount": 40, "order": "F", "card_number": "4111"}])
    data = yaml.safe_load(old.read_text())
    data["actions"]["issue_refund"]["rules"][0]["if"]["amount"]["lte"] = 20  # stricter
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(data))

    out = run("policy", "diff", "--policy", str(old), "--against", str(new))
    assert out.returncode == 0, out.stderr
    assert "6 recorded action(s): 2 would be decided differently, 1 cannot tell" in out.stdout
    assert "2 of 6 issue_refund: auto_execute -> require_human_approval" in out.stdout
    assert '"order": "B"' in out.stdout and '"order": "C"' in out.stdout
    assert "cannot tell (arguments redacted on record)" in out.stdout

    as_json = json.loads(run("policy", "diff", "--policy", str(old), "--against", str(new),
                             "--json").stdout)
    [change] = as_json["by_action"]["issue_refund"]["would_change"]
    assert (change["from"], change["to"], change["count"]) == (
        "auto_execute", "require_human_approval", 2)

    # The same policy changes nothing; a window before everything sees nothing.
    same = run("policy", "diff", "--policy", str(old), "--against", str(old))
    assert "0 would be decided differently" in same.stdout
    bad = run("policy", "diff", "--policy", str(old), "--against", str(new), "--since", "7x")
    assert bad.returncode == 2 and "--since takes a number" in bad.stderr


def test_diff_against_a_broken_policy_names_the_error(write_policy: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    old = write_policy(REFUNDS)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nenvironments: {prod: {}}\nactions: {x: {mode: sometimes}}\n")
    out = run("policy", "diff", "--policy", str(old), "--against", str(broken))
    assert out.returncode != 0 and "actions.x.mode" in out.stderr
